"""Every stage at patch 14 (DINOv2) and 16 (DINOv3): a random-weight backbone of each family exported
by ``omh-ref export`` at 224 px (a 16 x 16 and a 14 x 14 grid), then ``extract -> knn -> train ->
eval -> segment`` through the command line; labels and upsampling follow the grid, segment's
windows and blending work on the backbone's patch, and ``feats.json`` and the checkpoint say which
backbone it was. A DINOv2 recipe runs end to end from a Hugging Face ``.safetensors`` file, and a
DINOv3 recipe plans its export by its torch.hub name.

The backbones are small (2 blocks, 32 channels: tests/builders.py tiny_backbones), except the
recipe's, whose features must be ViT-S's 384 channels.
"""
import json
import shlex

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from omh_ref.features import provenance
from omh_ref.jobs import recipe
from omh_ref.jobs import segmenter as sg
from omh_ref_cli.main import main
from tests import builders, layouts

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
pytest.importorskip("safetensors")

FAMILIES = {"dinov2": ("dinov2_vitt14_reg", 14, 4), "dinov3": ("dinov3_vitt16", 16, 4)}


def _ok(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, (args, res.output)
    return res.output


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Labelled images (36-80 px, so every crop is an upscale and segment's canvases need windows)
    and each family's random-init export at 224 px."""
    with builders.tiny_backbones():
        d = tmp_path_factory.mktemp("anypatch")
        truth = layouts.folder(d, n=9, labels=True, nested=False)
        models = {}
        for fam, (arch, patch, _) in FAMILIES.items():
            _ok(["export", "--arch", arch, "--random-init", "--seed", "1", "--resolution", "224", "--out", d / "w"])
            models[fam] = next((d / "w").glob(f"{fam}_*_random1_224.onnx"))
        yield d, models, truth


@pytest.fixture(scope="module")
def runs(world):
    """extract -> knn -> train -> eval -> segment for each family; -> {family: folder}."""
    d, models, _ = world
    out = {}
    for fam, model in models.items():
        r = d / fam
        said = _ok(["extract", "--model", model, "--images", d / "images", "--labels", d / "labels", "--out", r / "f",
                    "--quiet"])
        assert "randomly initialised backbone" in said
        _ok(["knn", "--features", r / "f" / "feats.npy", "--k", "7"])
        said = _ok(["train", "--features", r / "f" / "feats.npy", "--out", r / "run", "--steps", "3", "--batch-size",
                    "2", "--levels", "6,3", "--dim", "4", "--quiet"])
        assert "rebuilding" not in said and "building" not in said          # knn's table is the one used
        _ok(["eval", "--checkpoint", r / "run" / "ckpt.npz", "--features", r / "f" / "feats.npy", "--n-classes", "3",
             "--json", r / "eval.json", "--save-masks", r / "masks", "--quiet"])
        _ok(["segment", "--model", model, "--checkpoint", r / "run" / "ckpt.npz", "--images", d / "images",
             "--out", r / "seg", "--quiet"])
        out[fam] = r
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_feats_json_states_the_grid_and_the_backbone(runs, world, fam):
    _, patch, regs = FAMILIES[fam]
    g = 224 // patch
    meta = json.loads((runs[fam] / "f" / "feats.json").read_text())
    assert (meta["patch"], meta["grid"], meta["resolution"], meta["dim"]) == (patch, [g, g], 224, 32)
    assert meta["shape"] == [9, g, g, 32] and np.load(runs[fam] / "f" / "feats.npy").shape == (9, g, g, 32)
    assert np.load(runs[fam] / "f" / "labels.npy").shape == (9, 224, 224)   # labels at the crop's pixels
    assert (meta["backbone_family"], meta["backbone_arch"], meta["backbone_registers"]) == (fam, "vit_tiny", regs)
    assert meta["backbone_random_init"] is True and len(meta["backbone_weights_sha256"]) == 64
    from omh_ref.train.checkpoint import backbone_of

    assert backbone_of(runs[fam] / "run" / "ckpt.npz") == provenance.of_meta(meta)
    assert np.load(runs[fam] / "f" / "feats.knn.npy").shape == (9, 8)


@pytest.mark.parametrize("fam", FAMILIES)
def test_eval_upsamples_the_grid_to_the_labels(runs, world, fam):
    """Every labelled pixel of the 224 x 224 labels is scored, and the saved masks are at that size."""
    r = runs[fam]
    rep = json.loads((r / "eval.json").read_text())
    labels = np.load(r / "f" / "labels.npy")
    assert rep["cluster"]["pixels"] == (labels != 255).sum() > 0
    masks = sorted((r / "masks" / "clusters").glob("*.png"))
    assert len(masks) == 9
    for m in masks:
        a = np.asarray(Image.open(m))
        assert a.shape == (224, 224) and a.max() < 3
    assert 0 <= rep["cluster"]["miou"] <= 100


@pytest.mark.parametrize("fam", FAMILIES)
def test_segment_windows_on_the_patch_grid_at_each_images_size(runs, world, fam):
    d, _, truth = world
    _, patch, _ = FAMILIES[fam]
    rec = json.loads((runs[fam] / "seg" / "segment.json").read_text())
    assert rec["settings"]["patch"] == patch and rec["settings"]["window"] == 224
    assert rec["backbone"]["patch"] == patch and rec["backbone"]["input"] == 224
    for name, (rgb, _) in truth.items():
        mask = np.asarray(Image.open(runs[fam] / "seg" / f"{name[:-4]}.clusters.png"))
        assert mask.shape == rgb.shape[:2]
        lay = sg.layout(rgb.shape[:2], 224, patch, 224)
        assert lay.patch == patch and len(lay.windows) > 1     # short side 224: the long side needs windows


def test_another_familys_features_or_model_are_refused(runs, world):
    d, models, _ = world
    ck = runs["dinov2"] / "run" / "ckpt.npz"
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(ck), "--features",
                                    str(runs["dinov3"] / "f" / "feats.npy"), "--n-classes", "3", "--quiet"])
    last = res.output.strip().splitlines()[-1]
    assert res.exit_code == 2 and "another patch size" in last and "DINOv3" in last and "DINOv2" in last, last
    res = CliRunner().invoke(main, ["segment", "--model", str(models["dinov3"]), "--checkpoint", str(ck),
                                    "--images", str(d / "images"), "--out", str(d / "mixed"), "--quiet"])
    assert res.exit_code == 2 and "another patch size" in res.output.strip().splitlines()[-1]


def test_the_family_and_registers_tell_backbones_apart():
    """Same patch, width and unknown weights: the family or the register count alone refuses."""
    a = {"name": "x", "family": "dino", "arch": "vit_small", "patch": 16, "registers": 0, "dim": 384}
    assert provenance.differs(a, {**a, "family": "dinov3"}) == "model family"
    assert provenance.differs({**a, "family": "dinov2"}, {**a, "family": "dinov2", "registers": 4}) == "register count"
    assert provenance.differs(a, {**a, "family": None, "registers": None}) is None    # files before the record
    assert "DINOv2 ViT-B/14, 4 registers" in provenance.describe({**a, "family": "dinov2", "arch": "vit_base",
                                                                  "patch": 14, "registers": 4})


# ---- segment's windows at patch 14, on a backbone whose features are known -----------------------
def test_windows_and_one_pass_agree_at_patch_14_and_recover_the_regions(tmp_path):
    """The pooled-colour backbone (each patch's mean colour) at patch 14: a fixed 56 px model
    (windows), the any-size one forced into windows, and the any-size one in one pass give the same
    code, and the masks find the four regions at each image's own size."""
    fixed = builders.pooled_onnx(tmp_path / "fixed.onnx", size=56, patch=14)
    dynamic = builders.pooled_onnx(tmp_path / "dyn.onnx", patch=14)
    ckpt = builders.colour_ckpt(tmp_path / "colour.npz")
    for H, W in builders.SIZES + [(37, 300)]:
        rgb, truth = builders.colour_world(H, W)
        rgb = rgb.copy()
        rgb[::3, ::5] = (90, 90, 90)
        one = sg.Segmenter(dynamic, ckpt, resolution=56)
        assert one.layout((H, W)).window is None and one.bb.patch == 14
        ref = one.codes(rgb)
        for model, mode in ((fixed, "auto"), (dynamic, "always")):
            win = sg.Segmenter(model, ckpt, resolution=56, windows=mode)
            lay = win.layout((H, W))
            assert lay.window == 4 and lay.patch == 14 and len(lay.windows) > 1
            assert np.abs(win.codes(rgb) - ref).max() <= 1e-6
            mask = win.segment(rgb).clusters
            assert mask.shape == (H, W)
            conf = np.zeros((4, 4))
            np.add.at(conf, (mask.ravel(), truth.ravel()), 1)
            assert (conf.max(axis=1).sum() / conf.sum()) >= 0.9      # each cluster mostly one region


# ---- recipes ---------------------------------------------------------------------------------------
def test_a_dinov2_recipe_runs_end_to_end_from_a_safetensors_file(tmp_path):
    """potsdam3_dinov2_vits14 from a random ViT-S/14 in Hugging Face's layout, with tiny settings
    laid over the recipe (whole patches: 28 and 42 px, 2 x 2 and 3 x 3 grids)."""
    layouts.potsdam(tmp_path / "data", "train", n=6, seed=1)
    layouts.potsdam(tmp_path / "data", "val", n=3)
    weights = builders.save_hf("dinov2", builders.random_vit("dinov2", "vit_small", 14, 0), tmp_path / "v2.safetensors")
    tiny = {"train": {"steps": 2, "batch_size": 4, "ckpt_every": 1},
            "recipe": {"train_resolution": 28, "eval_resolution": 42, "knn_k": 2, "probe_crops": 12}}
    opts = recipe.RecipeOptions(name="potsdam3_dinov2_vits14", root=str(tmp_path / "data"), weights=(str(weights),),
                                out=str(tmp_path / "run"), seeds=(0,), progress=False, overrides=tiny)
    said = []
    rep = recipe.run(opts, say=said.append)
    assert any(m.startswith("[export] omh-ref export --arch dinov2_vits14 --checkpoint") for m in said), said
    manifest = json.loads((tmp_path / "run" / "weights" / "manifest.json").read_text())
    assert {m["file"] for m in manifest["models"]} == {"dinov2_vits14_28.onnx", "dinov2_vits14_42.onnx"}
    assert {m["family"] for m in manifest["models"]} == {"dinov2"}
    train = json.loads((tmp_path / "run" / "feats" / "train" / "feats.json").read_text())
    val = json.loads((tmp_path / "run" / "feats" / "val" / "feats.json").read_text())
    assert train["shape"] == [6, 2, 2, 384] and val["shape"] == [3, 3, 3, 384] and val["patch"] == 14
    assert train["backbone_family"] == "dinov2" and train["backbone_registers"] == 0
    assert [r["seed"] for r in rep["runs"]] == [0] and "cluster_miou" in rep["summary"]
    again = recipe.plan(opts, say=lambda *_: None)
    assert all(st.done for st in again)        # a rerun skips every stage, the export's checkpoint hash included


def test_a_dinov3_recipe_plans_its_export_by_the_hub_name(tmp_path):
    from omh_ref.extract import archs, export_dino

    layouts.coco(tmp_path / "data", "train", n=2, seed=1)
    layouts.coco(tmp_path / "data", "val", n=2, seed=2)
    pth = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    pth.write_bytes(b"not read by the plan")
    opts = recipe.RecipeOptions(name="cocostuff27_dinov3_vits16", root=str(tmp_path / "data"), weights=(str(pth),),
                                out=str(tmp_path / "run"), seeds=(0,), progress=False)
    stages = {st.name: st for st in recipe.plan(opts, say=lambda *_: None)}
    words = stages["export"].command
    assert shlex.join(words).startswith(f"omh-ref export --arch dinov3_vits16 --checkpoint {pth}")
    args = export_dino.parse_args(words[2:])
    assert archs.complete(archs.parse_arch(args.arch, args.patch, args.registers)) == \
        archs.Spec("dinov3", "vit_small", 16, 4)
    assert args.resolution == [224, 320]
    assert f"--model {tmp_path / 'run' / 'weights' / 'dinov3_vits16_224.onnx'}" in shlex.join(
        stages["extract train"].command)
    assert "DINOv3 ViT-S/16" in stages["export"].why
