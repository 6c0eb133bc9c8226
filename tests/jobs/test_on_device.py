"""Every command's ``--device gpu`` path, end to end on the strict CuPy stand-in
(omh_ref.core.strict_device): the same numbers as the NumPy run (the arithmetic is NumPy's, so
identical), and the host conversions of the per-step and per-batch paths bounded."""
import collections
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from omh_ref.core import backend
from omh_ref.core import strict_device as sd
from omh_ref.features import synthetic
from omh_ref_cli.main import main
from tests import builders, layouts

REPO = Path(__file__).resolve().parents[2]


def run(args, device, code=0):
    """``omh-ref ARGS --device DEVICE`` in-process (the stand-in as the GPU for ``gpu``) ->
    (output, the host conversions it made, as a Counter of (what, file:line)); the exit code must
    be ``code``."""
    with backend.strict_device() if device == "gpu" else _nothing():
        sd.reset_conversions()
        res = CliRunner().invoke(main, [str(a) for a in args] + ["--device", device])
        conv = collections.Counter(sd.conversions())
    assert res.exit_code == code, (device, res.output, res.exception)
    return res.output, conv


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def sites(conv, path_part):
    """How many conversions were made in files whose path contains ``path_part``."""
    return sum(n for (_, site), n in conv.items() if path_part in site)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The tiny demo (train three methods, evaluate, probe, k-means on the STEGO code) on each device."""
    d = tmp_path_factory.mktemp("demo")
    out = {}
    for device in ("cpu", "gpu"):
        args = ["demo", "--out", d / device, "--n-train", 24, "--n-val", 8, "--steps", 6, "--seeds", 0,
                "--probe-epochs", 2, "--batch-size", 4, "--quiet"]
        out[device] = (d / device, *run(args, device))
    return out


def test_the_demo_on_the_device_gives_the_numpy_report(demo_runs):
    (cpu, _, _), (gpu, _, conv) = demo_runs["cpu"], demo_runs["gpu"]
    a, b = (json.loads((d / "report.json").read_text()) for d in (cpu, gpu))
    assert a["methods"] == b["methods"] and a["levels"] == b["levels"]
    assert sites(conv, "/train/loop.py") <= 3 * 6    # at most one read per logged step (every step here)


def test_train_and_resume_on_the_device_are_the_numpy_run(tmp_path, demo_runs):
    feats = demo_runs["cpu"][0] / "data" / "train" / "feats.npy"
    logs = {}
    for device in ("cpu", "gpu"):
        out = tmp_path / device
        common = ["--features", feats, "--out", out, "--batch-size", 4, "--levels", "8,4", "--log-every", 4, "--quiet"]
        _, first = run(["train", *common, "--steps", 8, "--ckpt-every", 8], device)
        _, conv = run(["train", "--resume", out / "ckpt.npz", "--steps", 12, "--quiet"], device)
        logs[device] = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
        if device == "gpu":
            # one read per logged step (2 of steps 1-8), the rest are the checkpoint's arrays
            assert sites(first, "/train/loop.py") == 2, first
            assert all("checkpoint.py" in site or "loop.py" in site for (_, site) in first), first
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in logs["cpu"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in logs["gpu"]]
    assert [r["step"] for r in logs["gpu"]] == [4, 8, 12]


def test_eval_on_the_device_writes_the_numpy_scores_masks_and_match(tmp_path, demo_runs):
    root = demo_runs["cpu"][0]
    ckpt, val = root / "runs" / "OMH-seed0" / "ckpt.npz", root / "data" / "val" / "feats.npy"
    for device in ("cpu", "gpu"):
        d = tmp_path / device
        _, conv = run(["eval", "--checkpoint", ckpt, "--features", val, "--json", d / "scores.json",
                       "--save-masks", d / "masks", "--save-match", d / "match.json", "--out", d / "pics",
                       "--probe-epochs", 2], device)
    a, b = (json.loads((tmp_path / dev / "scores.json").read_text()) for dev in ("cpu", "gpu"))
    a.pop("seconds", None), b.pop("seconds", None)
    assert a == b
    assert (tmp_path / "cpu" / "match.json").read_text() == (tmp_path / "gpu" / "match.json").read_text()
    masks = sorted((tmp_path / "cpu" / "masks").rglob("*.png"))
    assert masks
    for m in masks:
        twin = tmp_path / "gpu" / m.relative_to(tmp_path / "cpu")
        assert np.array_equal(np.asarray(Image.open(m)), np.asarray(Image.open(twin))), m
    n_batches = -(-8 // 16)
    # per evaluated batch: its predictions and its probe codes come back, nothing read per pixel or per class
    assert sites(conv, "/evaluate/predict.py") <= 4 * n_batches, conv
    assert sites(conv, "/evaluate/probe.py") <= 2 * 2 * n_batches + 2, conv


def test_seeds_on_the_device_gives_the_numpy_table(tmp_path, demo_runs):
    root = demo_runs["cpu"][0] / "data"
    for device in ("cpu", "gpu"):
        run(["seeds", "--features", root / "train" / "feats.npy", "--val-features", root / "val" / "feats.npy",
             "--out", tmp_path / device, "--seeds", "0,1", "--steps", 4, "--batch-size", 4, "--levels", "18,9",
             "--probe-epochs", 1, "--quiet"], device)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cpu", "gpu"))
    assert a["summary"] == b["summary"] and a["config"] == b["config"]
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in x["runs"]] for x in (a, b)]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 2


def test_gradcheck_on_the_device_passes():
    out, _ = run(["gradcheck"], "gpu")
    assert "0 failed" in out and "gpu" in out.splitlines()[-1]


def test_segment_on_the_device_writes_the_numpy_masks(tmp_path):
    from tests.builders import colour_ckpt, pooled_onnx, write_worlds

    model, ckpt = pooled_onnx(tmp_path / "dyn.onnx"), colour_ckpt(tmp_path / "colour.npz")
    write_worlds(tmp_path / "imgs")
    for device in ("cpu", "gpu"):
        run(["segment", "--model", model, "--checkpoint", ckpt, "--images", tmp_path / "imgs", "--out",
             tmp_path / device, "--resolution", 64, "--levels", "all", "--overlay", "--quiet"], device)
    pngs = sorted(Path(tmp_path / "cpu").glob("*.png"))
    assert any(p.name.endswith(".clusters.png") for p in pngs)
    for p in pngs:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "gpu" / p.name))), p


# ---- every training variant, divergence, every eval output and a recipe, on tiny synthetic data --
def _timeless(records):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def _log(folder):
    path = Path(folder) / "log.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else None


def _same_checkpoint(a, b, roots=None):
    """Two checkpoints hold the same arrays (parameters, Adam moments, data order) and the same
    step, generator state, config and records, but for the options that name the run's device
    and folder (and the paths below the two runs' ``roots``, when given)."""
    with np.load(a) as za, np.load(b) as zb:
        assert sorted(za.files) == sorted(zb.files)
        arrays = {k: (za[k], zb[k]) for k in za.files if k != "meta"}
        texts = [bytes(z["meta"]).decode() for z in (za, zb)]
    assert any(k.startswith("param/") for k in arrays)
    for k, (x, y) in arrays.items():
        assert x.dtype == y.dtype and np.array_equal(x, y), (a, k)
    if roots is not None:
        texts = [t.replace(json.dumps(str(r))[1:-1], "RUN") for t, r in zip(texts, roots)]
    metas = [json.loads(t) for t in texts]
    for m in metas:
        for k in ("device", "out", "resume"):
            m["info"].get("options", {}).pop(k, None)
    assert metas[0] == metas[1], a


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Synthetic train (16 images) and val (6) splits of a 6x6 grid of 24 channels, labels at 24 px
    in three granularities (18 parts, 9 classes, 3 superclasses); beside val the pictures its
    feats.json lists (for the CRF and the overlays) and its mirrored features."""
    d = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 16), ("val", 6)):
        synthetic.write(synthetic.SynthSpec(n_images=n, grid=6, patch=4, dim=24), d / split, split=split)
    val = d / "val"
    names = json.loads((val / "feats.json").read_text())["images"]
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (256, 3))
    for name, lab in zip(names, np.load(val / "labels.npy")):
        rgb = np.clip(colours[lab] + rng.integers(-40, 41, lab.shape + (3,)), 0, 255).astype(np.uint8)
        Image.fromarray(rgb).save(val / name, format="PNG")
    np.save(val / "feats_flip.npy", np.ascontiguousarray(np.load(val / "feats.npy")[:, :, ::-1]))
    return d


TINY_MODEL = ["--levels", "18,9,3", "--dim", 8, "--feature-samples", 3, "--batch-size", 4]
TRAIN_CASES = {
    "stego+omh, relaxed": ["--base", "stego", "--omh", "--cluster-target", "relaxed"],
    "stego alone": ["--base", "stego", "--no-omh"],
    "balanced, uniform marginals": ["--cluster-target", "balanced", "--marginals", "uniform"],
    "hard, implicit backward": ["--cluster-target", "hard", "--sinkhorn-backward", "implicit"],
    "relaxed, implicit, small eps": ["--sinkhorn-backward", "implicit", "--eps", 0.02, "--marginals", "uniform"],
    "validated, best kept": ["--eval-level", 1, "--val-features", "{val}", "--val-every", 3, "--keep-best"],
    "smooseg alone (teacher moving average)": ["--base", "smooseg", "--no-omh"],
    "omh on smooseg, knn pairs": ["--base", "smooseg", "--weight-inter", 0.5],
}


@pytest.mark.parametrize("extra", TRAIN_CASES.values(), ids=TRAIN_CASES.keys())
def test_every_training_variant_on_the_device_is_the_numpy_run(tmp_path, tiny, extra):
    """The log (every loss part, validation scores), the checkpoint (and best.npz) of the NumPy
    run, with one host read per logged step in the loop and none in the step itself."""
    extra = [str(tiny / "val" / "feats.npy") if a == "{val}" else a for a in extra]
    convs = {}
    for device in ("cpu", "gpu"):
        _, convs[device] = run(["train", "--features", tiny / "train" / "feats.npy", "--out", tmp_path / device,
                                "--steps", 6, "--log-every", 2, *TINY_MODEL, *extra, "--quiet"], device)
    cpu, gpu = _log(tmp_path / "cpu"), _log(tmp_path / "gpu")
    assert cpu and _timeless(cpu) == _timeless(gpu)
    for name in ("ckpt.npz",) + (("best.npz",) if "--keep-best" in extra else ()):
        _same_checkpoint(tmp_path / "cpu" / name, tmp_path / "gpu" / name)
    conv = convs["gpu"]
    assert sites(conv, "/train/loop.py") <= len(gpu), conv       # at most one read per logged step
    validated = "--val-features" in extra
    allowed = ("/train/loop.py", "/train/checkpoint.py") + (("/evaluate/predict.py",) if validated else ())
    assert all(site.split(":")[0].endswith(allowed) for (_, site) in conv), conv   # the step reads nothing
    if validated:   # one read per validation batch (one batch of 6 images, at steps 3 and 6)
        assert "val_miou" in gpu[-1] and sites(conv, "/evaluate/predict.py") <= sum("val_miou" in r for r in gpu)


def _nan_gradient_at_call(n):
    """A wrapper of model.loss_and_grads whose ``n``-th call returns a NaN in one gradient entry
    (the loss stays finite), on either device."""
    from omh_ref.core import model

    real, calls = model.loss_and_grads, []

    def flaky(*a, **k):
        loss, parts, grads = real(*a, **k)
        calls.append(1)
        if len(calls) == n:
            g = grads["W3"].copy()
            g[1, 2] = np.nan
            grads = dict(grads, W3=g)
        return loss, parts, grads
    return flaky


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("how", ["huge lr", "nan gradient"])
def test_a_divergence_on_the_device_stops_as_the_numpy_run_does(tmp_path, tiny, monkeypatch, how):
    """A run that diverges between two looks (a huge lr: a non-finite loss; a NaN gradient at step
    3: non-finite gradients) stops on the device at the same look, with the same one-line error
    naming the same step, and the same diverged.npz (the state before that step); the look is the
    loop's one read. Resumed from it, both continue to the same checkpoint."""
    from omh_ref.core import model
    from omh_ref.train.checkpoint import step_of

    flags = ["--lr", 1e30, "--lr-clusters", 1e30] if how == "huge lr" else []
    said, convs = {}, {}
    for device in ("cpu", "gpu"):
        if how == "nan gradient":
            monkeypatch.setattr(model, "loss_and_grads", _nan_gradient_at_call(3))
        out, convs[device] = run(["train", "--features", tiny / "train" / "feats.npy", "--out", tmp_path / device,
                                  "--steps", 8, "--log-every", 4, *TINY_MODEL, *flags, "--quiet"], device, code=2)
        monkeypatch.undo()
        said[device] = [ln.replace(str(tmp_path / device), "RUN") for ln in out.splitlines() if ln.startswith("error:")]
    assert said["cpu"] == said["gpu"] and len(said["gpu"]) == 1, said
    found = re.search(r"training diverged at step (\d+) \(non-finite (loss|gradients)\)", said["gpu"][0])
    step = int(found[1])
    assert step % 4 != 0          # between two looks: found at the next one, the state kept from before it
    assert (found[2] == "gradients") == (how == "nan gradient")
    assert step_of(tmp_path / "gpu" / "diverged.npz") == step - 1
    for name in ("ckpt.npz", "log.jsonl"):
        assert (tmp_path / "cpu" / name).exists() == (tmp_path / "gpu" / name).exists()
    assert _log(tmp_path / "cpu") == _log(tmp_path / "gpu")
    _same_checkpoint(tmp_path / "cpu" / "diverged.npz", tmp_path / "gpu" / "diverged.npz")
    conv = convs["gpu"]
    assert sites(conv, "/train/loop.py") == 1, conv               # the look that found it
    assert all(site.split(":")[0].endswith(("/train/loop.py", "/train/checkpoint.py")) for (_, site) in conv), conv
    if how == "nan gradient":   # the state before the step resumes, on the device as on NumPy
        for device in ("cpu", "gpu"):
            run(["train", "--resume", tmp_path / device / "diverged.npz", "--steps", 8, "--quiet"], device)
        _same_checkpoint(tmp_path / "cpu" / "ckpt.npz", tmp_path / "gpu" / "ckpt.npz")
        assert _timeless(_log(tmp_path / "cpu")) == _timeless(_log(tmp_path / "gpu"))


@pytest.fixture(scope="module")
def tiny_ckpts(tiny, tmp_path_factory):
    """Two checkpoints trained (on NumPy) on the tiny data: OMH with levels 18/9/3 (the eval level
    the 9 classes') and the STEGO base alone (one level of 9)."""
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, extra in (("omh", ["--eval-level", 1]), ("stego", ["--no-omh", "--eval-level", 1])):
        run(["train", "--features", tiny / "train" / "feats.npy", "--out", d / name, "--steps", 6, *TINY_MODEL,
             *extra, "--quiet"], "cpu")
        out[name] = d / name / "ckpt.npz"
    return out


EVAL_CASES = {
    "crf, masks, match, pictures, probe": (
        "omh", ["--crf", "--crf-workers", 1, "--save-masks", "{d}/masks", "--save-match", "{d}/match.json",
                "--out", "{d}/pics", "--probe-epochs", 2]),
    "flipped, chosen level labels, uncached probe": (
        "omh", ["--flipped-features", "{val}/feats_flip.npy", "--level-labels", "parts,classes,superclasses",
                "--probe-cache", "none", "--probe-epochs", 1]),
    "the base alone, masks": ("stego", ["--save-masks", "{d}/masks", "--probe-epochs", 1]),
}


@pytest.mark.parametrize("case", EVAL_CASES.values(), ids=EVAL_CASES.keys())
def test_eval_on_the_device_gives_the_numpy_scores_for_every_output(tmp_path, tiny, tiny_ckpts, case):
    """Cluster and linear-probe scores, every level against its label granularity (parts,
    classes, superclasses) with the hierarchy's consistency, the CRF's scores and masks (the CRF
    handed host arrays), the matching and the pictures: the NumPy run's. Host reads: a constant
    per evaluated batch and per probe step, never per pixel or per class."""
    which, extra = case
    B, n_val, n_train = 4, 6, 16
    for device in ("cpu", "gpu"):
        d = tmp_path / device
        args = [str(a).replace("{d}", str(d)).replace("{val}", str(tiny / "val")) for a in extra]
        _, conv = run(["eval", "--checkpoint", tiny_ckpts[which], "--features", tiny / "val" / "feats.npy",
                       "--train-features", tiny / "train" / "feats.npy", "--batch-size", B,
                       "--json", d / "scores.json", *args, "--quiet"], device)
    a, b = (json.loads((tmp_path / dev / "scores.json").read_text()) for dev in ("cpu", "gpu"))
    assert a == b and "linear" in b and b["crf"] == ("--crf" in extra)
    levels = b["levels"]
    if which == "omh":   # every level scored, each against its own granularity
        assert [e["granularity"] for e in levels["levels"]] == [g["name"] for g in levels["granularities"]] == \
            ["parts", "classes", "superclasses"]
        assert all(c["consistency"] is not None for c in levels["consistency"])
    files = sorted(p.relative_to(tmp_path / "cpu") for p in (tmp_path / "cpu").rglob("*")
                   if p.is_file() and p.suffix in (".png", ".json"))
    for rel in files:
        assert (tmp_path / "gpu" / rel).read_bytes() == (tmp_path / "cpu" / rel).read_bytes(), rel
    if "--save-masks" in extra:
        kinds = {p.parts[1] for p in files if p.parts[0] == "masks" and p.suffix == ".png"}
        assert kinds == ({"clusters", "crf"} if "--crf" in extra else {"clusters"}), files
    # host reads, per file: a constant per evaluated batch / probe step (n levels at most per batch)
    n_levels = len(levels["levels"])
    epochs = int(extra[extra.index("--probe-epochs") + 1])
    n_eval = math.ceil(n_val / B) * (2 if "--flipped-features" in extra else 1)
    n_probe = epochs * math.ceil(n_train / B)
    assert sites(conv, "/evaluate/predict.py") <= 2 * n_eval, conv          # the predictions; the CRF's logits
    assert sites(conv, "/evaluate/granular.py") <= n_levels * n_eval, conv
    assert sites(conv, "/evaluate/hierarchy.py") <= n_levels * n_eval + n_levels, conv
    assert sites(conv, "/evaluate/probe.py") + sites(conv, "/core/optim.py") <= \
        2 * (n_probe + math.ceil(n_train / B) + n_eval) + epochs + 2, conv
    per_batch = ("/evaluate/predict.py", "/evaluate/granular.py", "/evaluate/hierarchy.py", "/evaluate/probe.py",
                 "/core/optim.py")
    rest = sum(n for (_, site), n in conv.items() if not site.split(":")[0].endswith(per_batch))
    assert rest <= 12 * n_levels, conv                     # per run: the hierarchy plans' Sinkhorn checks


def test_segment_with_windows_crf_and_flip_on_the_device_writes_the_numpy_masks(tmp_path):
    """segment's overlapping windows, its mirrored pass and its CRF hand-off (host logits and
    images) on the device."""
    model, ckpt = builders.pooled_onnx(tmp_path / "dyn.onnx"), builders.colour_ckpt(tmp_path / "colour.npz")
    builders.write_worlds(tmp_path / "imgs", sizes=builders.SIZES[:2])
    for device in ("cpu", "gpu"):
        run(["segment", "--model", model, "--checkpoint", ckpt, "--images", tmp_path / "imgs", "--out",
             tmp_path / device, "--resolution", 32, "--windows", "always", "--flip", "--crf", "--crf-workers", 1,
             "--quiet"], device)
    pngs = sorted(Path(tmp_path / "cpu").glob("*.png"))
    assert len(pngs) == 2
    for p in pngs:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "gpu" / p.name))), p


TINY_RECIPE = {"model": {"dim": 16, "feature_samples": 4, "levels": [54, 27]},
               "train": {"steps": 3, "batch_size": 4, "ckpt_every": 1},
               "recipe": {"train_resolution": 32, "eval_resolution": 48, "knn_k": 2, "probe_crops": 40}}


def test_a_recipe_on_the_device_gives_the_numpy_results(tmp_path):
    """``omh-ref recipe`` (extract, knn, train and eval per seed with the flipped features, the
    probe) on the COCO-Stuff fixture, with a ViT-S/8-shaped ONNX backbone (no torch, no export)
    and the shipped recipe with a small code, two levels, tiny loop and crop settings (a recipe file of its own): the
    features, the logs and results.json of the NumPy run."""
    import tomllib      # Python 3.11 (as the package's TOML reading)

    layouts.coco(tmp_path / "data", "train", n=4, seed=1)
    layouts.coco(tmp_path / "data", "val", n=3, seed=2)
    model = builders.patch_conv_onnx(tmp_path / "vits8.onnx", dim=384, patch=8)
    tables = tomllib.loads((REPO / "configs" / "cocostuff27_vits8.toml").read_text())
    for table, values in TINY_RECIPE.items():
        tables[table].update(values)
    recipe_file = tmp_path / "cocostuff27_tiny.json"
    recipe_file.write_text(json.dumps(tables))
    for device in ("cpu", "gpu"):
        run(["recipe", recipe_file, "--root", tmp_path / "data", "--weights", model, "--out", tmp_path / device,
             "--seeds", "0,1", "--quiet"], device)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cpu", "gpu"))
    assert a["summary"] == b["summary"] and a["config"] == b["config"] and a["n_seeds"] == b["n_seeds"] == 2
    assert _timeless(a["runs"]) == _timeless(b["runs"]) and "linear" in b["runs"][0]
    for split, key in (("train", "train_resolution"), ("val", "eval_resolution")):   # at the recipe's sizes
        assert json.loads((tmp_path / "gpu" / "feats" / split / "feats.json").read_text())["resolution"] == \
            TINY_RECIPE["recipe"][key]
        for name in ("feats.npy", "labels.npy") + (("feats_flip.npy",) if split == "val" else ()):
            assert (tmp_path / "gpu" / "feats" / split / name).read_bytes() == \
                (tmp_path / "cpu" / "feats" / split / name).read_bytes(), (split, name)
    for seed in (0, 1):
        assert _timeless(_log(tmp_path / "cpu" / f"seed{seed}")) == _timeless(_log(tmp_path / "gpu" / f"seed{seed}"))
        _same_checkpoint(tmp_path / "cpu" / f"seed{seed}" / "ckpt.npz", tmp_path / "gpu" / f"seed{seed}" / "ckpt.npz",
                         roots=(tmp_path / "cpu", tmp_path / "gpu"))
