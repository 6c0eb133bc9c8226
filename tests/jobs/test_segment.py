"""``omh-ref segment`` and its API (omh_ref.jobs.segmenter): whole images of any size in, masks
at their own size out.

Two kinds of backbone are built here: a hand-made ONNX graph whose features are known (each
patch's mean normalised colour, C = 3), with a checkpoint whose head is the identity and whose
centroids are the colours of the test images' regions, so the right masks are known; and a
randomly initialised ViT-S/16 exported by omh-ref export, whose features mix the whole
window (so stitching, flipping and padding mistakes show).
"""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from omh_ref.core import fixtures, model as core_model
from omh_ref.core.config import Config
from omh_ref.core.errors import InputError
from omh_ref.core.ops import resize
from omh_ref.evaluate import crf as crf_mod
from omh_ref.evaluate import metrics, pictures
from omh_ref.jobs import segmenter as sg
from omh_ref.jobs import segment as segment_job
from omh_ref_cli.main import main
from tests.builders import PATCH, SIZES, colour_ckpt, colour_world, pooled_onnx, save_ckpt, write_worlds

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

THRESHOLD = 95.0                              # Hungarian mIoU (x100) the colour masks must reach


# ---- backbones and checkpoints made here (the colour ones: tests/builders.py) ---------------------
def random_ckpt(path, C, levels=(6, 4, 3), seed=0):
    cfg = fixtures.small_config(in_dim=C, levels=levels)
    return save_ckpt(path, core_model.init_params(cfg, np.random.default_rng(seed)), cfg)


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    d = tmp_path_factory.mktemp("pooled")
    return {"dynamic": pooled_onnx(d / "dyn.onnx"), "fixed": pooled_onnx(d / "fix32.onnx", size=32),
            "ckpt": colour_ckpt(d / "colour.npz")}


def _export_script():
    from omh_ref.extract import export_dino

    return export_dino


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A random-init ViT-S/16 exported at 32 px (fixed input: windows) and a random checkpoint."""
    torch = pytest.importorskip("torch")
    ed = _export_script()
    d = tmp_path_factory.mktemp("vit")
    torch.manual_seed(5)
    path = ed.export(ed.build_vit("vit_small", 16), 32, d)
    return {"model": str(path), "ckpt": random_ckpt(d / "ckpt.npz", 384, seed=1)}


# ---- images with known regions -------------------------------------------------------------------
def miou(pred, truth, K=4):
    """Hungarian-matched mIoU x100 (STEGO's cluster metric); a mask of another shape scores 0."""
    if pred.shape != truth.shape:
        return 0.0
    conf = np.zeros((K, truth.max() + 1))
    np.add.at(conf, (pred.astype(np.int64).ravel(), truth.ravel()), 1)
    return metrics.scores(conf, metrics.hungarian(conf))["miou"]


def read_png(path):
    return np.asarray(Image.open(path))


def cli(args):
    return CliRunner().invoke(main, ["segment", "--quiet"] + [str(a) for a in args])


def one_line_error(res, pattern):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    line = res.output.strip().splitlines()[-1]
    assert line.lower().startswith("error: ") and re.search(pattern, line), line


def hex_rgb(h):
    return tuple(int(h[i:i + 2], 16) for i in (1, 3, 5))


def png_palette(path, n):
    """The first ``n`` colours of a palette PNG (and its mode)."""
    img = Image.open(path)
    return img.mode, [tuple(c) for c in np.asarray(img.getpalette()[:3 * n], np.uint8).reshape(-1, 3)]


def region_edges(ids):
    """Pixels with a 4-neighbour of another id (computed here, not by the code under test)."""
    e = np.zeros(ids.shape, bool)
    dx, dy = ids[:, 1:] != ids[:, :-1], ids[1:] != ids[:-1]
    e[:, 1:] |= dx
    e[:, :-1] |= dx
    e[1:] |= dy
    e[:-1] |= dy
    return e


def assert_overlay_wears_the_mask_colours(path, ids, pal):
    """The overlay: the picture at the image's size, the regions' edges in exactly the mask's
    palette colours, and a legend under it with a swatch of every id present and dark text."""
    ov = read_png(path)
    H, W = ids.shape
    pal = np.asarray(pal, np.uint8)
    edge = region_edges(ids)
    assert edge.any() and np.array_equal(ov[:H, :W][edge], pal[ids[edge]])
    strip = ov[H:]
    for k in np.unique(ids):
        assert (strip == pal[k]).all(-1).sum() >= 50, (path, k)          # a 10x10 swatch interior
    assert (strip.max(-1) < 90).sum() > 20                               # the names' text



# ---- the masks recover known regions -------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_masks_recover_the_colour_regions_at_the_images_own_size(tmp_path, pooled, kind):
    """Non-square images through the command: a mask per image at its original size, the eval
    level's clusters on the four regions and level 1's on their two parents, above the threshold.
    The fixed 32 px model needs windows in both directions at --resolution 64; the dynamic one
    takes each canvas in one pass."""
    truths = write_worlds(tmp_path / "imgs")
    res = cli(["--model", pooled[kind], "--checkpoint", pooled["ckpt"], "--images", tmp_path / "imgs",
               "--out", tmp_path / "out", "--resolution", 64, "--levels", "all", "--overlay"])
    assert res.exit_code == 0, res.output
    for name, truth in truths.items():
        mask = read_png(tmp_path / "out" / f"{name}.clusters.png")
        assert mask.shape == truth.shape and mask.dtype == np.uint8
        assert miou(mask, truth) >= THRESHOLD, (name, miou(mask, truth))
        assert np.array_equal(read_png(tmp_path / "out" / f"{name}.L0.png"), mask)
        parents = np.array([0, 0, 1, 1])[truth]
        assert miou(read_png(tmp_path / "out" / f"{name}.L1.png"), parents, K=2) >= THRESHOLD
        for f in (f"{name}.overlay.png", f"{name}.L0.overlay.png", f"{name}.L1.overlay.png"):
            ov = read_png(tmp_path / "out" / f)
            assert ov.shape[0] > truth.shape[0] and ov.shape[1] >= truth.shape[1] and ov.shape[2] == 3   # + legend


def test_a_smooseg_base_alone_segments_with_its_teacher_centres(tmp_path, pooled):
    """SmooSeg alone predicts with its teacher G, not its student M0: with the region colours as G
    and a student that knows nothing, the masks are the regions'; the same checkpoint with the
    roles swapped is not."""
    from omh_ref.core.config import with_base_defaults
    from omh_ref.train import checkpoint

    colour = checkpoint.load(pooled["ckpt"])["params"]
    cfg = Config(**with_base_defaults({"base": "smooseg", "omh": False, "in_dim": 3, "dim": 3, "levels": (4,),
                                       "head_activation": "relu"}))
    student = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    params = {**{k: colour[k] for k in ("W1", "b1", "W2", "b2", "W3", "b3")}, "M0": student, "G": colour["M0"]}
    good = save_ckpt(tmp_path / "teacher.npz", params, cfg)
    swapped = save_ckpt(tmp_path / "student.npz", {**params, "M0": colour["M0"], "G": student}, cfg)
    for H, W in SIZES:
        rgb, truth = colour_world(H, W)
        assert miou(sg.Segmenter(pooled["fixed"], good, resolution=64).segment(rgb).clusters, truth) >= THRESHOLD
        assert miou(sg.Segmenter(pooled["fixed"], swapped, resolution=64).segment(rgb).clusters, truth) < THRESHOLD


def test_the_threshold_fails_shifted_transposed_cropped_or_coarsely_upsampled_masks(tmp_path, pooled):
    """The mIoU threshold above has teeth: the right masks pass it, and each of these mistakes,
    made on the same logits, fails it on every test image."""
    seg = sg.Segmenter(pooled["fixed"], pooled["ckpt"], resolution=64)
    for H, W in SIZES:
        rgb, truth = colour_world(H, W)
        mask = seg.segment(rgb).clusters
        assert miou(mask, truth) >= THRESHOLD
        z = seg.codes(rgb)                                     # (Gh, Gw, 3) patch-grid code
        grid_ids = (z @ np.asarray(seg.centroids[0]).T).argmax(-1).astype(np.uint8)
        short = min(H, W)
        top, left = (H - short) // 2, (W - short) // 2
        wrong = {
            "shifted": np.roll(mask, W // 25, axis=1),
            "transposed": mask.T,
            "transposed, resized back": np.asarray(Image.fromarray(mask.T).resize((W, H), Image.NEAREST)),
            "centre crop stretched": np.asarray(Image.fromarray(mask[top:top + short, left:left + short])
                                                .resize((W, H), Image.NEAREST)),
            "grid argmax, nearest upsampling": np.asarray(Image.fromarray(grid_ids).resize((W, H), Image.NEAREST)),
        }
        for what, m in wrong.items():
            assert miou(m, truth) < THRESHOLD, (what, (H, W), miou(m, truth))


def test_upsampling_lands_the_patch_grid_on_the_image_not_on_its_padding():
    """The canvas is padded to whole patches; the upsampling maps patch centres to where they lie
    on the original image. A linear function of position sampled at patch centres comes back as
    the same linear function at every interior pixel; stretching the padded grid over the image
    (plain resize) does not."""
    for size, res, patch in (((90, 157), 64, 4), ((171, 83), 48, 16), ((50, 70), 48, 16)):
        lay = sg.layout(size, res, patch, None)
        (H, W), (h, w), (Gh, Gw) = lay.size, lay.resized, lay.grid
        assert w % patch or h % patch                        # these layouts are padded
        Rh, Rw = lay.upsample_matrices(np, np.float64)
        centres_w = (np.arange(Gw) + 0.5) * patch            # resized-image px
        x = (np.arange(W) + 0.5) * w / W                     # each original pixel centre, in resized px
        inner = (x >= centres_w[0]) & (x <= centres_w[-1])
        assert inner.mean() > 0.5
        assert np.allclose((Rw @ (3 * centres_w + 1))[inner], (3 * x + 1)[inner], atol=1e-9)
        centres_h = (np.arange(Gh) + 0.5) * patch
        y = (np.arange(H) + 0.5) * h / H
        inner_h = (y >= centres_h[0]) & (y <= centres_h[-1])
        assert np.allclose((Rh @ centres_h)[inner_h], y[inner_h], atol=1e-9)
        stretched = resize.resize_matrix(W, Gw, np, np.float64)
        if w % patch:
            assert np.abs((stretched @ centres_w)[inner] - x[inner]).max() > 0.5
    # without padding the matrix is the plain resize (torch's align_corners=False, tested in test_ops)
    lay = sg.layout((64, 128), 64, 4, None)
    assert np.array_equal(lay.upsample_matrices(np, np.float64)[1], resize.resize_matrix(128, 32, np, np.float64))


# ---- windows -------------------------------------------------------------------------------------
def test_window_offsets_cover_the_canvas_and_the_ramps_cross_fade():
    for G in range(8, 80):
        for g in (8, 14, 28):
            if G < g:
                continue
            off = sg.window_offsets(G, g)
            assert off[0] == 0 and off[-1] == G - g and list(off) == sorted(set(off))
            covered = np.zeros(G, int)
            for o in off:
                covered[o:o + g] += 1
            assert covered.min() >= 1
            assert all(a + g - b >= g // 4 for a, b in zip(off, off[1:]))       # overlaps >= a quarter window
            if len(off) > 1:
                assert len(sg.window_offsets(G, g)) <= -(-(G - g // 4) // (g - g // 4)) + 1
            w = sg.ramps(off, g)
            assert (w > 0).all() and (w <= 1).all()
            total = np.zeros(G)
            for o, wi in zip(off, w):
                total[o:o + g] += wi
            if (covered <= 2).all():   # where at most two windows meet, a cross-fade sums to 1 exactly
                assert np.allclose(total, 1)
    assert sg.window_offsets(28, 28) == (0,)
    with pytest.raises(ValueError):
        sg.window_offsets(27, 28)


def test_stitched_windows_equal_a_single_pass(pooled):
    """The pooled-colour backbone is local, so windows and one pass see the same patches: the fixed
    32 px model (windows), the dynamic one forced into windows, and the dynamic one in one pass
    give the same blended code and the same masks (different window layouts at 48 and 80 px)."""
    for H, W in SIZES + [(40, 40), (37, 300)]:
        rgb, _ = colour_world(H, W)
        rgb = rgb.copy()
        rgb[::3, ::5] = (90, 90, 90)   # texture, so that blending different values would show
        for res in (48, 80):
            one = sg.Segmenter(pooled["dynamic"], pooled["ckpt"], resolution=res)
            assert one.layout((H, W)).window is None
            ref, ref_mask = one.codes(rgb), one.segment(rgb).clusters
            for model, mode in ((pooled["fixed"], "auto"), (pooled["dynamic"], "always")):
                win = sg.Segmenter(model, pooled["ckpt"], resolution=res, windows=mode)
                lay = win.layout((H, W))
                assert lay.window is not None and (len(lay.windows) > 1 or H == W == res or mode == "always")
                assert np.abs(win.codes(rgb) - ref).max() <= 1e-6
                assert np.array_equal(win.segment(rgb).clusters, ref_mask)


def test_a_square_image_at_the_models_size_is_the_plain_crop_computation(vit):
    """One window, no resize, no padding: the masks are the eval path's (backbone, head, cosine
    logits, bilinear resize, argmax) computed here from the bare onnxruntime forward."""
    import onnxruntime as ort

    from omh_ref.evaluate.predict import cluster_logits, code
    from omh_ref.extract.backbone import normalize

    seg = sg.Segmenter(vit["model"], vit["ckpt"])
    rgb = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    sess = ort.InferenceSession(vit["model"], providers=["CPUExecutionProvider"])
    f = sess.run(None, {sess.get_inputs()[0].name: normalize(rgb[None])})[0]
    want = cluster_logits(seg.params, seg.cfg, code(seg.params, f, seg.cfg), (32, 32))[0]
    got = seg.logits(rgb)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5
    assert (seg.segment(rgb).clusters == want.argmax(-1)).mean() > 0.999


# ---- flip ----------------------------------------------------------------------------------------
def test_flip_averaging_is_symmetric(vit):
    """Segmenting the mirror image gives the mirrored logits and masks, exactly, with windows in both
    directions and a padded canvas; without the averaging the ViT's output is not symmetric (so the
    comparison can fail)."""
    rng = np.random.default_rng(7)
    for H, W in ((50, 70), (81, 40)):
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        mirror = np.ascontiguousarray(rgb[:, ::-1])
        seg = sg.Segmenter(vit["model"], vit["ckpt"], resolution=48, flip=True, levels="all")
        lay = seg.layout((H, W))
        assert len(lay.rows) > 1 and len(lay.cols) > 1 and lay.canvas != lay.resized
        a, b = seg.logits(rgb), seg.logits(mirror)
        assert np.array_equal(b, a[:, ::-1])
        ma, mb = seg.segment(rgb), seg.segment(mirror)
        assert np.array_equal(mb.clusters, ma.clusters[:, ::-1])
        assert all(np.array_equal(y, x[:, ::-1]) for x, y in zip(ma.levels, mb.levels))
        plain = sg.Segmenter(vit["model"], vit["ckpt"], resolution=48)
        assert np.abs(plain.logits(mirror) - plain.logits(rgb)[:, ::-1]).max() > 1e-3


# ---- the command end to end ----------------------------------------------------------------------
def test_vit_end_to_end_on_non_square_images(tmp_path, vit):
    """A random-init ViT: every image of a nested folder gets its mask at its own size, per-level
    masks and overlays; segment.json records settings, hashes, palettes and the images done."""
    from omh_ref.core.files import file_sha256

    rng = np.random.default_rng(0)
    sizes = {"a.png": (50, 70), "sub/b.jpg": (81, 40), "sub/c.png": (33, 120)}
    for name, (H, W) in sizes.items():
        (tmp_path / "imgs" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(tmp_path / "imgs" / name)
    res = cli(["--model", vit["model"], "--checkpoint", vit["ckpt"], "--images", tmp_path / "imgs",
               "--out", tmp_path / "out", "--levels", "all", "--overlay", "--batch-size", 3])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    for name, (H, W) in sizes.items():
        stem = out / Path(name).with_suffix("")
        mask = read_png(stem.with_name(stem.name + ".clusters.png"))
        assert mask.shape == (H, W) and mask.dtype == np.uint8 and mask.max() < 3
        for lvl, K in enumerate((6, 4, 3)):
            m = read_png(stem.with_name(f"{stem.name}.L{lvl}.png"))
            assert m.shape == (H, W) and m.max() < K
            assert read_png(stem.with_name(f"{stem.name}.L{lvl}.overlay.png")).shape[0] > H
        assert np.array_equal(read_png(stem.with_name(f"{stem.name}.L2.png")), mask)
    rec = json.loads((out / "segment.json").read_text())
    assert rec["complete"] and rec["skipped"] == []
    assert [d["image"] for d in rec["images"]] == sorted(sizes)
    assert rec["settings"]["checkpoint_sha256"] == file_sha256(vit["ckpt"])
    assert rec["settings"]["backbone_sha256"] == file_sha256(vit["model"])
    assert rec["settings"]["resolution"] == 32 and rec["backbone"]["input"] == 32
    assert [len(rec["palette"][f"L{i}"]) for i in range(3)] == [6, 4, 3]
    assert rec["format"] == 2 and rec["files"] == {"mask": "<name>.clusters.png", "levels": "<name>.L<level>.png",
                                                   "overlay": "<name>.overlay.png",
                                                   "level_overlays": "<name>.L<level>.overlay.png"}
    assert [d["mask"] for d in rec["images"]] == ["a.clusters.png", "sub/b.clusters.png", "sub/c.clusters.png"]


def test_palettes_give_children_their_parents_colour_family():
    levels = (6, 4, 2)
    plans = [np.eye(4)[[0, 0, 1, 2, 3, 3]] * 0.9 + 0.025, np.eye(2)[[0, 1, 1, 0]] * 0.8 + 0.1]
    pals = pictures.hierarchy_palettes(levels, plans)
    assert [p.shape for p in pals] == [(6, 3), (4, 3), (2, 3)]
    import colorsys

    def hue(c):
        return colorsys.rgb_to_hsv(*(np.asarray(c) / 255.0))[0]

    def dist(a, b):
        d = abs(a - b) % 1.0
        return min(d, 1 - d)

    for lvl, A in enumerate(plans):
        parent = A.argmax(1)
        for child, par in enumerate(parent):
            assert dist(hue(pals[lvl][child]), hue(pals[lvl + 1][par])) <= 0.035
        for par in range(A.shape[1]):
            kids = [tuple(pals[lvl][k]) for k in np.flatnonzero(parent == par)]
            assert len(set(kids)) == len(kids)                  # siblings differ
    assert dist(hue(pals[-1][0]), hue(pals[-1][1])) > 0.2       # families differ
    assert all(np.array_equal(a, b) for a, b in zip(pals, pictures.hierarchy_palettes(levels, plans)))


def test_masks_are_palette_pngs_in_the_colours_of_the_overlays_with_legends(tmp_path, pooled):
    """Every mask keeps its ids as pixel values (mode P) and its palette is the level's palette of
    segment.json; every overlay draws the same id in the same RGB, with a legend of the ids."""
    write_worlds(tmp_path / "imgs", SIZES[:2])
    res = cli(["--model", pooled["fixed"], "--checkpoint", pooled["ckpt"], "--images", tmp_path / "imgs",
               "--out", tmp_path / "out", "--resolution", 64, "--levels", "all", "--overlay"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    rec = json.loads((out / "segment.json").read_text())
    pals = {lvl: [hex_rgb(h) for h in rec["palette"][lvl]] for lvl in ("L0", "L1")}
    assert rec["mask_png"]["mask"].startswith("P ")
    for name in ("w0", "w1"):
        mask = read_png(out / f"{name}.clusters.png")
        assert png_palette(out / f"{name}.clusters.png", 4) == ("P", pals["L0"])   # the eval level is L0
        assert sorted(np.unique(mask)) == [0, 1, 2, 3]
        for lvl, K in (("L0", 4), ("L1", 2)):
            assert png_palette(out / f"{name}.{lvl}.png", K) == ("P", pals[lvl])
            assert_overlay_wears_the_mask_colours(out / f"{name}.{lvl}.overlay.png", read_png(out / f"{name}.{lvl}.png"),
                                                  pals[lvl])
        assert_overlay_wears_the_mask_colours(out / f"{name}.overlay.png", mask, pals["L0"])
        assert Image.open(out / f"{name}.clusters.png").convert("RGB").getpixel((0, 0)) == pals["L0"][mask[0, 0]]


# ---- resume --------------------------------------------------------------------------------------
def _count_forwards(monkeypatch):
    calls = []
    real = sg.run

    def counting(sess, bb, x):
        calls.append(len(x))
        return real(sess, bb, x)

    monkeypatch.setattr(sg, "run", counting)
    return calls


def test_resume_skips_done_images_and_redoes_missing_or_newer_ones(tmp_path, pooled, monkeypatch):
    write_worlds(tmp_path / "imgs")
    args = ["--model", pooled["fixed"], "--checkpoint", pooled["ckpt"], "--images", tmp_path / "imgs",
            "--out", tmp_path / "out", "--batch-size", 1, "--levels", "all"]
    assert cli(args).exit_code == 0
    out = tmp_path / "out"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    calls = _count_forwards(monkeypatch)
    res = cli(args)
    assert res.exit_code == 0 and calls == [] and "3 of 3 image(s) already segmented" in res.output
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "segment.json"} == \
        {k: v for k, v in before.items() if k != "segment.json"}
    (out / "w1.L1.png").unlink()                              # an image with an output missing
    img = tmp_path / "imgs" / "w2.png"                         # an image newer than its mask
    os.utime(img, ns=(img.stat().st_atime_ns, (out / "w2.clusters.png").stat().st_mtime_ns + 1))
    res = cli(args)
    assert res.exit_code == 0 and "1 of 3 image(s) already segmented" in res.output
    n_windows = sum(len(sg.layout((H, W), 32, PATCH, 32).windows) for H, W in SIZES[1:])
    assert sum(calls) == n_windows
    assert (out / "w1.L1.png").is_file()
    rec = json.loads((out / "segment.json").read_text())
    assert rec["complete"] and [d["image"] for d in rec["images"]] == ["w0.png", "w1.png", "w2.png"]
    # other settings: refused in one line, then replaced with --overwrite
    one_line_error(cli(args + ["--flip"]), r"holds masks made with other settings \(flip differ\); pass --overwrite")
    calls.clear()
    assert cli(args + ["--flip", "--overwrite"]).exit_code == 0
    assert sum(calls) == 2 * sum(len(sg.layout(size, 32, PATCH, 32).windows) for size in SIZES)   # and mirrored
    assert json.loads((out / "segment.json").read_text())["settings"]["flip"] is True
    calls.clear()
    assert cli(args + ["--flip", "--overwrite"]).exit_code == 0 and sum(calls) == 2 * n_windows + 2 * len(
        sg.layout(SIZES[0], 32, PATCH, 32).windows)            # same settings: --overwrite still starts over


def test_a_folder_of_the_first_naming_is_refused_in_one_line_and_redone_with_overwrite(tmp_path, pooled):
    """A folder written by the first naming (b.png, segment.json format 1) is not resumed beside
    new names: a rerun is refused in one line; --overwrite removes the old masks and redoes every
    image, and never removes an input image (here --out is the images' folder, where the first
    naming's mask name is the image's own)."""
    write_worlds(tmp_path / "imgs", SIZES[:2])
    out = tmp_path / "out"
    args = ["--model", pooled["fixed"], "--checkpoint", pooled["ckpt"], "--images", tmp_path / "imgs", "--out", out]
    assert cli(args).exit_code == 0
    rec = json.loads((out / "segment.json").read_text())
    (out / "segment.json").write_text(json.dumps({**rec, "format": 1, "files": {"mask": "<name>.png"}}))
    for name in ("w0", "w1"):                                  # the first naming's masks
        os.replace(out / f"{name}.clusters.png", out / f"{name}.png")
    one_line_error(cli(args), r"holds masks of an older omh-ref segment \(format 1: <name>\.png, now "
                              r"<name>\.clusters\.png or <name>\.classes\.png\); pass --overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["segment.json", "w0.png", "w1.png"]   # untouched
    res = cli(args + ["--overwrite"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["segment.json", "w0.clusters.png", "w1.clusters.png"]
    assert json.loads((out / "segment.json").read_text())["format"] == 2
    # the images' own folder as --out: w0.png is the image there, and stays
    inplace = args[:-1] + [tmp_path / "imgs", "--overwrite"]
    before = (tmp_path / "imgs" / "w0.png").read_bytes()
    assert cli(inplace).exit_code == 0
    assert (tmp_path / "imgs" / "w0.png").read_bytes() == before and (tmp_path / "imgs" / "w0.clusters.png").is_file()


def test_an_interrupted_run_leaves_a_resumable_folder(tmp_path, pooled, monkeypatch):
    write_worlds(tmp_path / "imgs")
    opts = segment_job.SegmentOptions(model=pooled["fixed"], checkpoint=pooled["ckpt"], images=[str(tmp_path / "imgs")],
                                      out=str(tmp_path / "out"), batch_size=1, progress=False)
    real = sg.Segmenter.segment_batch
    seen = []

    def dies_on_second(self, images):
        seen.append(1)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(sg.Segmenter, "segment_batch", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        segment_job.run(opts, log=lambda *_: None)
    rec = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert not rec["complete"] and [d["image"] for d in rec["images"]] == ["w0.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["segment.json", "w0.clusters.png"]   # no temp files
    monkeypatch.undo()
    logs = []
    rec = segment_job.run(opts, log=logs.append)
    assert rec["complete"] and len(rec["images"]) == 3 and "1 of 3 image(s) already segmented" in logs[0]


def test_a_full_disk_during_a_mask_says_what_is_intact_and_a_second_writer_is_refused(tmp_path, pooled, monkeypatch):
    import errno

    from omh_ref.core import files
    from omh_ref.core.errors import InputError

    write_worlds(tmp_path / "imgs")
    out = tmp_path / "out"
    opts = segment_job.SegmentOptions(model=pooled["fixed"], checkpoint=pooled["ckpt"], images=[str(tmp_path / "imgs")],
                                      out=str(out), batch_size=1, progress=False)
    real, calls = files._fsync_file, []

    def full(path):
        if str(path).endswith(".png") or ".png.tmp-" in str(path):
            calls.append(path)
            if len(calls) == 2:                                  # the second image's mask
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(files, "_fsync_file", full)
    with pytest.raises(InputError, match=(rf"^{out / 'w1.clusters.png'}: cannot write the masks of w1.png \(No space left on "
                                          rf"device\); the 1 image\(s\) segmented in {out} are intact; run the same "
                                          r"command again to continue$")):
        segment_job.run(opts, log=lambda *_: None)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["segment.json", "w0.clusters.png"]   # no temp or lock file left
    from tests.helpers import lock_holder

    p = lock_holder(out, "segment")
    try:
        with pytest.raises(InputError, match=rf"^{out}: another omh-ref segment \(pid {p.pid} on "):
            segment_job.run(opts, log=lambda *_: None)
    finally:
        p.kill()
        p.wait()
    logs = []
    rec = segment_job.run(opts, log=logs.append)               # the dead holder's lock is taken over
    assert rec["complete"] and len(rec["images"]) == 3 and any("taking over the lock" in m for m in logs)


# ---- bad input -----------------------------------------------------------------------------------
def test_unreadable_images_are_skipped_and_listed_or_fail_in_one_line(tmp_path, pooled):
    truths = write_worlds(tmp_path / "imgs", SIZES[:2])
    data = (tmp_path / "imgs" / "w0.png").read_bytes()
    (tmp_path / "imgs" / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "imgs" / "garbage.jpg").write_bytes(b"not an image at all")
    (tmp_path / "imgs" / "empty.png").write_bytes(b"")
    Image.fromarray(np.zeros((2, 100, 3), np.uint8)).save(tmp_path / "imgs" / "sliver.png")
    args = ["--model", pooled["fixed"], "--checkpoint", pooled["ckpt"], "--images", tmp_path / "imgs"]
    res = cli(args + ["--out", tmp_path / "out"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert [d["image"] for d in rec["images"]] == ["w0.png", "w1.png"]
    skipped = {s["image"]: s["error"] for s in rec["skipped"]}
    assert sorted(skipped) == ["empty.png", "garbage.jpg", "sliver.png", "truncated.png"]
    assert "truncated.png: cannot read image" in skipped["truncated.png"]
    assert "garbage.jpg: cannot read image" in skipped["garbage.jpg"]
    assert "too elongated" in skipped["sliver.png"]
    for name in truths:
        assert (tmp_path / "out" / f"{name}.clusters.png").is_file()
    res = cli(args + ["--out", tmp_path / "out2", "--on-error", "fail"])
    one_line_error(res, r"empty\.png: cannot read image .*\(--on-error fail")


def test_grayscale_rgba_palette_and_16_bit_images_are_converted_as_extraction_does(tmp_path, pooled):
    rgb, _ = colour_world(70, 110)
    rng = np.random.default_rng(1)
    gray = (rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)
    deep = (gray.astype(np.uint16) * 3)                         # 16-bit values beyond 255 clip
    pal = Image.fromarray(rgb).quantize(6)
    rgba = np.dstack([rgb, rng.integers(0, 256, (70, 110), dtype=np.uint8)])
    d = tmp_path / "imgs"
    d.mkdir()
    Image.fromarray(gray, "L").save(d / "gray.png")
    Image.fromarray(deep).save(d / "deep.png")
    pal.save(d / "pal.png")
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    assert Image.open(d / "deep.png").mode == "I;16" and Image.open(d / "pal.png").mode == "P"
    expected = {"gray": np.repeat(gray[..., None], 3, 2), "deep": np.repeat(np.clip(deep, 0, 255).astype(np.uint8)[..., None], 3, 2),
                "pal": np.asarray(pal.getpalette(), np.uint8).reshape(-1, 3)[np.asarray(pal)], "rgba": rgb}
    res = cli(["--model", pooled["dynamic"], "--checkpoint", pooled["ckpt"], "--images", d, "--out", tmp_path / "out",
               "--resolution", 48])
    assert res.exit_code == 0, res.output
    seg = sg.Segmenter(pooled["dynamic"], pooled["ckpt"], resolution=48)
    for name, arr in expected.items():
        assert np.array_equal(read_png(tmp_path / "out" / f"{name}.clusters.png"), seg.segment(arr).clusters), name
    # the API takes the same modes as arrays
    assert np.array_equal(seg.segment(gray).clusters, seg.segment(expected["gray"]).clusters)
    assert np.array_equal(seg.segment(rgba).clusters, seg.segment(rgb).clusters)
    assert np.array_equal(seg.segment(d / "pal.png").clusters, seg.segment(expected["pal"]).clusters)
    for bad in (rgb.astype(np.float32), rgb[..., :2], np.zeros((0, 5, 3), np.uint8)):
        with pytest.raises(InputError, match="image 0: "):
            seg.segment(bad)


def test_bad_arguments_are_one_line_errors_before_any_image_is_read(tmp_path, pooled, vit, monkeypatch):
    write_worlds(tmp_path / "imgs", SIZES[:1])
    write_worlds(tmp_path / "solo", SIZES[:1])
    os.replace(tmp_path / "solo" / "w0.png", tmp_path / "solo" / "w0.clusters.png")   # an image named like a mask
    write_worlds(tmp_path / "solo", SIZES[:1])
    (tmp_path / "afile").write_text("x")
    Image.fromarray(colour_world(20, 30)[0]).save(tmp_path / "imgs" / "w0.jpg")   # same output as w0.png
    other = random_ckpt(tmp_path / "other.npz", 3, levels=(4,))
    (tmp_path / "m.json").write_text("{}")

    def no_reading(*a, **k):
        raise AssertionError("an image was read")

    monkeypatch.setattr(segment_job, "read_rgb", no_reading)
    base = ["--model", pooled["fixed"], "--checkpoint", pooled["ckpt"], "--out", tmp_path / "out"]
    imgs = ["--images", tmp_path / "imgs" / "w0.png"]
    cases = [
        (["--model", vit["model"], "--checkpoint", pooled["ckpt"], "--out", tmp_path / "o"] + imgs,
         r"colour\.npz: its head takes C=3 features, but .* gives C=384"),
        (["--model", tmp_path / "none.onnx", "--checkpoint", pooled["ckpt"], "--out", tmp_path / "o"] + imgs,
         r"none\.onnx: no such file \(expected --model"),
        (["--model", pooled["fixed"], "--checkpoint", tmp_path / "none.npz", "--out", tmp_path / "o"] + imgs,
         r"none\.npz: no such file \(expected --checkpoint"),
        (base + imgs + ["--resolution", 16], r"--resolution 16: smaller than the 32 px input"),
        (base + imgs + ["--resolution", 0], r"--resolution: expected a positive number"),
        (base + ["--images", tmp_path / "nope"], r"nope: no such file or folder"),
        (base[:-1] + [tmp_path / "afile"] + imgs, r"afile: is a file \(expected --out to be a folder"),
        (base + ["--images", tmp_path / "imgs"], r"w0\.clusters\.png: both .*imgs/w0\.jpg and .*imgs/w0\.png would write it"),
        (base[:-2] + ["--out", tmp_path / "solo", "--images", tmp_path / "solo" / "w0.png",
                      "--images", tmp_path / "solo" / "w0.clusters.png"],
         r"w0\.clusters\.png: an output of .*solo/w0\.png would replace this image"),
        (base + imgs + ["--match", tmp_path / "m.json"], r"--match .*m\.json: not a match file"),
        (base + imgs + ["--match", tmp_path / "none.json"], r"--match .*none\.json: no such file"),
        (base + imgs + ["--device", "gpu"], r"--device gpu: "),
        (base + imgs + ["--batch-size", 0], r"Invalid value for '--batch-size'"),
    ]
    from omh_ref.evaluate import matching

    rec = matching.record(metrics.hungarian(np.eye(4)), list("abcd"), other, "f" * 64, 0)
    matching.save(tmp_path / "foreign.json", rec)
    cases.append((base + imgs + ["--match", tmp_path / "foreign.json"], r"made for another checkpoint"))
    for args, pattern in cases:
        one_line_error(cli(args), pattern)
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()
    assert sorted(p.name for p in (tmp_path / "solo").iterdir()) == ["w0.clusters.png", "w0.png"]


# ---- the match: eval --save-match / --save-masks, segment --match ---------------------------------
def test_eval_saves_the_match_and_the_masks_and_segment_maps_clusters_to_classes(tmp_path, pooled):
    """Labelled colour images -> extract (fixed pooled model) -> eval --save-match --save-masks ->
    segment --match: the class masks equal the labels on the regions (no matching left to do)."""
    truths = write_worlds(tmp_path / "imgs")
    (tmp_path / "labels").mkdir()
    perm = np.array([2, 0, 3, 1])            # class ids that are not the cluster ids
    for name, truth in truths.items():
        Image.fromarray(perm[truth].astype(np.uint8), "L").save(tmp_path / "labels" / f"{name}.png")
    run = CliRunner().invoke
    res = run(main, ["extract", "--model", pooled["fixed"], "--images", str(tmp_path / "imgs"), "--labels",
                     str(tmp_path / "labels"), "--out", str(tmp_path / "feats"), "--quiet"])
    assert res.exit_code == 0, res.output
    names = tmp_path / "names.txt"
    names.write_text("sky\nsand\ngrass\nsea\n")
    res = run(main, ["eval", "--checkpoint", pooled["ckpt"], "--features", str(tmp_path / "feats" / "feats.npy"),
                     "--n-classes", "4", "--class-names", str(names), "--save-match", str(tmp_path / "match.json"),
                     "--save-masks", str(tmp_path / "masks"), "--quiet"])
    assert res.exit_code == 0, res.output
    match = json.loads((tmp_path / "match.json").read_text())
    assert match["cluster_to_class"] == perm.tolist() and match["class_names"] == ["sky", "sand", "grass", "sea"]
    assert match["n_clusters"] == 4 and match["miou"] > 90
    # --save-masks: every row's cluster prediction at label resolution, named after its image
    from omh_ref.evaluate.predict import cluster_logits, code
    from omh_ref.features.store import FeatureStore
    from omh_ref.train.checkpoint import load_params

    params, cfg = load_params(pooled["ckpt"])
    store = FeatureStore(tmp_path / "feats" / "feats.npy")
    f = np.asarray(store.feats, np.float32)
    want = cluster_logits(params, cfg, code(params, f, cfg), (32, 32)).argmax(-1)   # labels are 32 px crops
    index = json.loads((tmp_path / "masks" / "masks.json").read_text())
    assert index["rows"] == ["w0.png", "w1.png", "w2.png"] and index["match"]["cluster_to_class"] == perm.tolist()
    for i, row in enumerate(index["rows"]):
        assert np.array_equal(read_png(tmp_path / "masks" / "clusters" / row), want[i])
    from omh_ref.evaluate.pictures import palette

    png = Image.open(tmp_path / "masks" / "clusters" / index["rows"][0])   # ids kept, colours visible
    assert png.mode == "P" and np.array_equal(np.array(png.getpalette()[:12]).reshape(4, 3), palette(4))
    # segment --match: class ids, the names in segment.json
    res = cli(["--model", pooled["fixed"], "--checkpoint", pooled["ckpt"], "--images", tmp_path / "imgs",
               "--out", tmp_path / "out", "--resolution", 64, "--match", tmp_path / "match.json", "--levels", "all",
               "--overlay"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert rec["class_names"] == ["sky", "sand", "grass", "sea"] and rec["mask"] == "class ids"
    assert rec["files"]["mask"] == "<name>.classes.png" and not list((tmp_path / "out").glob("*.clusters.png"))
    # the classes' colours: eval's pictures' (pictures.palette), in the mask's palette and the overlay
    class_pal = [tuple(int(v) for v in c) for c in pictures.palette(4)]
    assert [hex_rgb(h) for h in rec["class_palette"]] == class_pal
    for name, truth in truths.items():
        classes = read_png(tmp_path / "out" / f"{name}.classes.png")
        assert (classes == perm[truth]).mean() > 0.97
        assert np.array_equal(classes, perm[read_png(tmp_path / "out" / f"{name}.L0.png")])
        assert png_palette(tmp_path / "out" / f"{name}.classes.png", 4) == ("P", class_pal)
        assert_overlay_wears_the_mask_colours(tmp_path / "out" / f"{name}.overlay.png", classes, class_pal)


def test_more_than_256_clusters_give_16_bit_masks(tmp_path, pooled):
    ck = random_ckpt(tmp_path / "big.npz", 3, levels=(300,), seed=2)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    res = cli(["--model", pooled["dynamic"], "--checkpoint", ck, "--images", tmp_path / "x.png", "--out", tmp_path / "out",
               "--resolution", 32])
    assert res.exit_code == 0, res.output
    assert Image.open(tmp_path / "out" / "x.clusters.png").mode == "I;16"     # no palette holds 300 colours
    mask = read_png(tmp_path / "out" / "x.clusters.png")
    assert mask.dtype == np.uint16 and mask.shape == (40, 60) and mask.max() > 255
    assert np.array_equal(mask, sg.Segmenter(pooled["dynamic"], ck, resolution=32).segment(rgb).clusters)


needs_crf = pytest.mark.skipif(not crf_mod.available(), reason="pydensecrf2 (omh-ref[crf]) not installed")


@needs_crf
def test_crf_refines_at_the_images_own_size_within_its_timeout(tmp_path, pooled):
    rgb, truth = colour_world(61, 90)
    seg = sg.Segmenter(pooled["fixed"], pooled["ckpt"], resolution=48, crf=True, levels="all")
    m = seg.segment(rgb)
    assert m.clusters.shape == truth.shape and miou(m.clusters, truth) >= THRESHOLD
    assert np.array_equal(m.levels[0], sg.Segmenter(pooled["fixed"], pooled["ckpt"], resolution=48).segment(rgb).clusters)
    slow = sg.Segmenter(pooled["fixed"], pooled["ckpt"], resolution=48, crf=True, crf_workers=2, crf_timeout=1e-3)
    with pytest.raises(InputError, match="not refined within"):
        slow.segment_batch([rgb, rgb[:, ::-1]])


def test_crf_without_the_package_is_one_line(tmp_path, pooled, monkeypatch):
    monkeypatch.setattr(crf_mod, "available", lambda: False)
    Image.fromarray(colour_world(20, 30)[0]).save(tmp_path / "x.png")
    one_line_error(cli(["--model", pooled["fixed"], "--checkpoint", pooled["ckpt"], "--images", tmp_path / "x.png",
                        "--out", tmp_path / "out", "--crf"]), r"--crf: needs the dense-CRF package")


@needs_crf
def test_eval_save_masks_with_crf_writes_both_kinds(tmp_path, pooled):
    write_worlds(tmp_path / "imgs", SIZES[:2])
    run = CliRunner().invoke
    res = run(main, ["extract", "--model", pooled["fixed"], "--images", str(tmp_path / "imgs"),
                     "--out", str(tmp_path / "feats"), "--quiet"])
    assert res.exit_code == 0, res.output
    labels = np.stack([np.asarray(Image.fromarray(colour_world(H, W)[1].astype(np.uint8)).resize((32, 32)))
                       for H, W in SIZES[:2]])   # any labels in range will do: this test is about the files
    np.save(tmp_path / "labels.npy", labels)
    res = run(main, ["eval", "--checkpoint", pooled["ckpt"], "--features", str(tmp_path / "feats" / "feats.npy"),
                     "--labels", str(tmp_path / "labels.npy"), "--n-classes", "4", "--crf",
                     "--save-masks", str(tmp_path / "masks"), "--quiet"])
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "masks" / "masks.json").read_text())
    assert index["folders"] == ["clusters", "crf"] and index["rows"] == ["w0.png", "w1.png"]
    for kind in index["folders"]:
        for row in index["rows"]:
            m = read_png(tmp_path / "masks" / kind / row)
            assert m.shape == (32, 32) and m.dtype == np.uint8 and m.max() < 4
