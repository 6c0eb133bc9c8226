"""Dense-CRF refinement (STEGO's parameters), image crops and overlays in eval."""
import json

import numpy as np
import pytest
from PIL import Image

from omh_ref.evaluate import crf
from omh_ref.extract.images import image_paths, load_rgb, stego_crop
from omh_ref.core.errors import InputError

needs_crf = pytest.mark.skipif(not crf.available(), reason="pydensecrf2 (omh-ref[crf]) not installed")


def two_region_world(seed=0, H=24, W=24, noise=0.45):
    """A left-red / right-blue image and noisy logits that mostly (not always) say so."""
    rng = np.random.default_rng(seed)
    img = np.zeros((H, W, 3), np.uint8)
    img[:, : W // 2] = (220, 30, 30)
    img[:, W // 2:] = (30, 30, 220)
    truth = (np.arange(W)[None, :] >= W // 2).repeat(H, 0).astype(int)
    logits = np.stack([1 - truth, truth], -1).astype(np.float64) * 0.6 - 0.3
    flip = rng.random((H, W)) < noise / 2
    logits[flip] *= -1
    return img, logits, truth


@needs_crf
def test_crf_cleans_salt_and_pepper_noise_along_image_edges():
    img, logits, truth = two_region_world()
    raw = logits.argmax(-1)
    refined = crf.refine(img, crf.probs_from_logits(logits)).argmax(0)
    assert (refined == truth).mean() > (raw == truth).mean() + 0.1
    assert (refined == truth).mean() > 0.97


@needs_crf
def test_parallel_equals_serial_and_timeout_never_hangs():
    worlds = [two_region_world(s) for s in range(3)]
    imgs = np.stack([w[0] for w in worlds])
    logits = np.stack([w[1] for w in worlds])
    serial = crf.refine_batch(imgs, logits, workers=1)
    parallel = crf.refine_batch(imgs, logits, workers=2, timeout=120)
    assert np.array_equal(serial, parallel)
    with pytest.raises(InputError, match="not refined within"):
        crf.refine_batch(imgs, logits, workers=2, timeout=1e-3)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(crf, "available", lambda: False)
    with pytest.raises(InputError, match=r"omh-ref\[crf\]"):
        crf.refine_batch(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 4, 2)))


def test_stego_crop_resizes_the_short_side_and_centres():
    arr = np.zeros((6, 12, 3), np.uint8)        # H=6, W=12: left third red, middle green, right blue
    arr[:, :4] = (255, 0, 0)
    arr[:, 4:8] = (0, 255, 0)
    arr[:, 8:] = (0, 0, 255)
    out = np.asarray(stego_crop(Image.fromarray(arr), 3))
    assert out.shape == (3, 3, 3)
    assert (out[:, 1] == (0, 255, 0)).all()    # the centre column is the middle third


def test_image_paths_and_load(tmp_path):
    Image.fromarray(np.full((10, 14, 3), 7, np.uint8)).save(tmp_path / "a.png")
    meta = {"images": ["a.png", "missing.png"]}
    paths = image_paths(meta, tmp_path / "feats.npy")
    assert paths == [tmp_path / "a.png", tmp_path / "missing.png"]
    assert load_rgb(paths[0], 8).shape == (8, 8, 3) and load_rgb(paths[1], 8) is None
    assert image_paths({"images": ["nope.png"]}, tmp_path / "feats.npy") is None
    assert image_paths({}, tmp_path / "feats.npy") is None


@needs_crf
def test_eval_cli_with_crf_and_overlays(tmp_path):
    from click.testing import CliRunner

    from omh_ref.core import model
    from omh_ref.train import checkpoint
    from omh_ref.core.optim import adam_init
    from omh_ref_cli.main import main
    from tests.builders import identity_params, known_world

    store, protos = known_world(tmp_path, N=4)
    lab = np.load(tmp_path / "labels.npy")
    palette = np.array([(200, 40, 40), (40, 200, 40), (40, 40, 200)], np.uint8)
    names = []
    for i in range(store.N):
        Image.fromarray(palette[np.minimum(lab[i], 2)]).save(tmp_path / f"img{i}.png")
        names.append(f"img{i}.png")
    (tmp_path / "feats.json").write_text(json.dumps({"images": names, "n_classes": 3}))
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = identity_params(cfg, protos, np.array([0, 1, 2]))
    ck = tmp_path / "ckpt.npz"
    checkpoint.save(ck, params, adam_init(params), 0, np.random.default_rng(0), cfg)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(ck), "--features", str(store.path), "--labels",
                                    str(tmp_path / "labels.npy"), "--crf", "--crf-workers", "2",
                                    "--out", str(tmp_path / "pics"), "--json", str(tmp_path / "s.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["crf"] is True and saved["cluster"]["miou"] > 90
    grid = np.asarray(Image.open(tmp_path / "pics" / "predictions.png"))
    assert grid.shape[1] > 4 * 8 * 2   # image, labels, prediction, overlay columns


@needs_crf
def test_cluster_eval_scores_what_the_crf_returns(tmp_path, monkeypatch):
    """The CRF's refined maps, not the raw predictions, are what gets scored (a bypass of the CRF
    in cluster_eval would pass the end-to-end test above: its world scores 100 either way)."""
    from omh_ref.core import model
    from omh_ref.evaluate import crf, predict
    from omh_ref.jobs.evaluate import crf_images
    from tests.builders import identity_params, known_world

    store, protos = known_world(tmp_path, N=4)
    lab = np.load(tmp_path / "labels.npy")
    for i in range(store.N):
        Image.fromarray(np.full(lab.shape[1:] + (3,), 60 * i, np.uint8)).save(tmp_path / f"img{i}.png")
    (tmp_path / "feats.json").write_text(json.dumps({"images": [f"img{i}.png" for i in range(store.N)]}))
    store = type(store)(store.path, labels=tmp_path / "labels.npy")
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = identity_params(cfg, protos, np.array([0, 1, 2]))
    seen = []

    def fake(images, logits, workers, timeout):
        seen.append((np.stack(images).shape, logits.shape))
        return np.zeros(logits.shape[:-1], np.int64)          # (N, H, W): every pixel cluster 0

    monkeypatch.setattr(crf, "refine_batch", fake)
    clu, _ = predict.cluster_eval(params, cfg, store, 3, 4, crf_workers=1, crf_images=crf_images(store))
    assert seen and seen[0][0] == (4,) + lab.shape[1:] + (3,)
    conf = np.asarray(clu["confusion"])                     # (clusters, classes)
    assert seen[0][1][-1] == 3 and conf.sum() == (lab != 255).sum()
    assert conf[1:].sum() == 0 and (conf[0] == np.bincount(lab[lab != 255].ravel(), minlength=3)).all()
