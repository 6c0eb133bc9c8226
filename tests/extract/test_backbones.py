"""omh-ref export for DINOv2 and DINOv3 (omh_ref/extract/archs.py, vit_dinov2.py, vit_dinov3.py,
checkpoints.py): the names a DINO user types, the key layouts of Meta's and Hugging Face's files,
the positional rules against the reference formulas, and every export checked against torch.

No weights exist on these machines: every model is a seeded random one, small (2 blocks, 32
channels: tests/builders.py tiny_backbones) except where the real sizes' keys and shapes are
the point. A random model's every path is made to count (builders.random_vit: LayerScale drawn
in [0.5, 1.5]), so a mapping or a rotation gone wrong moves the features far beyond 1e-4.
"""
import json

import numpy as np
import pytest

from omh_ref.extract import archs
from tests import builders

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("safetensors")

from omh_ref.extract import checkpoints, export_dino as ed  # noqa: E402
from omh_ref.extract.vit_dinov2 import DinoV2  # noqa: E402
from omh_ref.extract.vit_dinov3 import DinoV3  # noqa: E402

TOL = 1e-4
# (family, tiny size, patch, registers): each model kind the families have
KINDS = [("dinov2", "vit_tiny", 14, 0), ("dinov2", "vit_tiny", 14, 4), ("dinov2", "vit_tiny_swiglu", 14, 0),
         ("dinov3", "vit_tiny", 16, 4), ("dinov3", "vit_tiny_plus", 16, 4)]
IDS = ["v2", "v2-reg4", "v2-swiglu", "v3", "v3-plus"]


@pytest.fixture(scope="module", autouse=True)
def tiny():
    with builders.tiny_backbones():
        yield


def _feats(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _ort(path, x):
    return ed.ort_session(path).run(["features"], {"images": x})[0]


def _load(path, spec):
    model = ed.build(archs.complete(spec))
    info = ed.load_checkpoint(model, path)
    return model, info


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def test_arch_names_a_dino_user_types():
    hub = archs.hub_names()
    for name in ("dino_vits8", "dino_vitb16", "dinov2_vits14", "dinov2_vitb14_reg", "dinov2_vitl14",
                 "dinov2_vitg14", "dinov3_vits16", "dinov3_vits16plus", "dinov3_vitb16", "dinov3_vitl16"):
        assert name in hub, name
    assert archs.parse_arch("vit_small", 8) == archs.Spec("dino", "vit_small", 8, None)
    assert archs.parse_arch("dinov2_vitb14_reg") == archs.Spec("dinov2", "vit_base", 14, 4)
    assert archs.parse_arch("dinov3_vits16plus") == archs.Spec("dinov3", "vit_small_plus", 16, 4)
    assert archs.parse_arch("dinov2", 14, 4) == archs.Spec("dinov2", None, 14, 4)
    assert archs.complete(archs.Spec("dinov2", "vit_small")) == archs.Spec("dinov2", "vit_small", 14, 0)
    assert archs.complete(archs.Spec("dinov3", "vit_base")) == archs.Spec("dinov3", "vit_base", 16, 4)
    for args, message in ((("dinov2_vits14", None, 4), "--registers 4: --arch dinov2_vits14 has 0"),
                          (("dinov3_vits16", 14), "--patch 14: --arch dinov3_vits16 has 16"),
                          (("dinov4",), "--arch dinov4: unknown")):
        with pytest.raises(ValueError, match=message):
            archs.parse_arch(*args)
    for spec, message in ((archs.Spec("dinov2"), "name the size"),
                          (archs.Spec("dinov2", "vit_small", 16), "DINOv2 is released at patch 14"),
                          (archs.Spec("dino", "vit_small", 8, 4), "DINO \\(v1\\) has no register tokens"),
                          (archs.Spec("dinov3", "vit_giant2"), "DINOv3 has no vit_giant2")):
        with pytest.raises(ValueError, match=message):
            archs.complete(spec)
    # file names: DINO's as always; the others carry the family, and registers other than the usual
    for spec, stem in ((archs.Spec("dino", "vit_small", 8, 0), "dino_vits8"),
                       (archs.Spec("dinov2", "vit_base", 14, 4), "dinov2_vitb14_reg4"),
                       (archs.Spec("dinov3", "vit_small_plus", 16, 4), "dinov3_vits16plus"),
                       (archs.Spec("dinov3", "vit_large", 16, 0), "dinov3_vitl16_reg0")):
        assert archs.stem(spec) == stem
    assert archs.model_name(archs.Spec("dinov2", "vit_small", 14, 0), 224, 3) == "dinov2_vits14_random3_224"


def test_the_released_sizes_have_meta_keys_and_shapes():
    """The real ViT-S sizes, built (no export): the keys of Meta's released files, with their shapes."""
    torch.manual_seed(0)
    v2 = ed.build(archs.complete(archs.parse_arch("dinov2_vits14_reg"))).state_dict()
    assert v2["pos_embed"].shape == (1, 37 * 37 + 1, 384)       # img_size 518 at patch 14
    assert v2["register_tokens"].shape == (1, 4, 384) and v2["mask_token"].shape == (1, 384)
    assert v2["blocks.11.ls1.gamma"].shape == (384,) and v2["blocks.11.mlp.fc1.weight"].shape == (1536, 384)
    assert torch.equal(v2["blocks.0.ls2.gamma"], torch.ones(384))       # DINOv2's LayerScale init 1.0
    assert len([k for k in v2 if k.startswith("blocks.")]) == 12 * 14
    torch.manual_seed(0)
    v3 = ed.build(archs.complete(archs.parse_arch("dinov3_vits16"))).state_dict()
    assert v3["storage_tokens"].shape == (1, 4, 384) and v3["rope_embed.periods"].shape == (64 // 4,)
    assert v3["blocks.0.attn.qkv.bias_mask"].tolist() == [1.0] * 384 + [0.0] * 384 + [1.0] * 384
    assert torch.allclose(v3["blocks.0.ls1.gamma"], torch.full((384,), 1e-5))   # DINOv3's init
    assert "pos_embed" not in v3
    plus = ed.build(archs.complete(archs.parse_arch("dinov3_vits16plus"))).state_dict()
    assert plus["blocks.0.mlp.w1.weight"].shape == (1536, 384) and plus["blocks.0.mlp.w3.weight"].shape == (384, 1536)


# --------------------------------------------------------------------------------------------------
# Positions against the reference formulas
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_position_interpolation_follows_its_formula(registers):
    """dinov2/models/vision_transformer.py 180-212 with hub/backbones.py: the learned 37 x 37 grid
    as it is at 518 px; elsewhere bicubic, scale (g + 0.1) / 37 without antialias (registers 0),
    or to the size with antialias and no offset (the _reg models)."""
    model = builders.random_vit("dinov2", "vit_tiny", 14, registers)
    assert model.interpolate_pos_encoding(37, 37) is model.pos_embed
    grid = model.pos_embed[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    for gh, gw in ((16, 16), (5, 7), (40, 23)):
        if registers:
            ref = torch.nn.functional.interpolate(grid, size=(gh, gw), mode="bicubic", antialias=True)
        else:
            ref = torch.nn.functional.interpolate(grid, scale_factor=((gh + 0.1) / 37, (gw + 0.1) / 37),
                                                  mode="bicubic", antialias=False)
        pe = model.interpolate_pos_encoding(gh, gw)
        assert pe.shape == (1, 1 + gh * gw, 32) and torch.equal(pe[:, 0], model.pos_embed[:, 0])
        assert torch.allclose(pe[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, gh * gw, 32), atol=1e-7)
    if registers:   # downsampling with and without antialias differ: the flag is really applied
        plain = torch.nn.functional.interpolate(grid, size=(16, 16), mode="bicubic", antialias=False)
        assert not torch.allclose(model.interpolate_pos_encoding(16, 16)[:, 1:],
                                  plain.permute(0, 2, 3, 1).reshape(1, 256, 32), atol=1e-3)


def test_dinov3_rope_follows_its_formula():
    """dinov3/layers/rope_position_encoding.py 57-121: periods 100^(2j / (d/2)), patch centres
    (i + 0.5) / h in [-1, 1], angles 2 pi c / period, the h axis's then the w axis's, tiled twice."""
    model = builders.random_vit("dinov3", "vit_tiny", 16, 4)
    d = 16                                     # head channels: 32 / 2 heads
    periods = torch.tensor([100.0 ** (2 * j / (d // 2)) for j in range(d // 4)])
    assert torch.allclose(model.rope_embed.periods, periods)
    for gh, gw in ((14, 14), (3, 5)):
        sin, cos = model.positions(gh, gw)
        assert sin.shape == cos.shape == (gh * gw, d)
        for i in range(gh):
            for j in range(gw):
                y, x = 2 * (i + 0.5) / gh - 1, 2 * (j + 0.5) / gw - 1
                half = torch.cat([2 * np.pi * y / periods, 2 * np.pi * x / periods])
                want = torch.cat([half, half])
                assert torch.allclose(sin[i * gw + j], torch.sin(want), atol=1e-6)
                assert torch.allclose(cos[i * gw + j], torch.cos(want), atol=1e-6)


def test_dinov3_uses_its_rope_tables():
    """The forward takes its positions from the tables it is given: other tables, other features
    (a RoPE left out or applied to nothing would pass the formula test above and this one not)."""
    model = builders.random_vit("dinov3", "vit_tiny", 16, 4)
    x = torch.randn(1, 3, 48, 48)
    sin, cos = model.positions(3, 3)
    with torch.no_grad():
        base = model.forward_with(x, (sin, cos))
        moved = model.forward_with(x, model.positions(3, 3)[::-1])     # sin and cos swapped
    assert (base - moved).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# Meta's layout and Hugging Face's: one set of weights, one model
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Each kind of model, random, saved in Meta's layout (a bare .pth, and DINOv2's as a training
    checkpoint's teacher) and in Hugging Face's (a .safetensors file and a save_pretrained folder)."""
    d = tmp_path_factory.mktemp("layouts")
    out = {}
    for (fam, size, patch, regs), kid in zip(KINDS, IDS):
        model = builders.random_vit(fam, size, patch, regs, seed=len(out))
        out[kid] = {"model": model, "spec": archs.Spec(fam, size, patch, regs),
                    "meta": builders.save_meta_checkpoint(model, d / f"{kid}.pth", teacher=fam == "dinov2"),
                    "hf": builders.save_hf(fam, model, d / f"{kid}.safetensors"),
                    "folder": builders.save_hf(fam, model, d / f"{kid}_hf", folder=True)}
    return out


def test_the_hugging_face_files_have_transformers_key_names(files):
    """The test-side layout itself, against key names read in transformers' model files."""
    from safetensors.torch import load_file

    v2 = load_file(str(files["v2-reg4"]["hf"]))
    for k in ("embeddings.cls_token", "embeddings.register_tokens", "embeddings.position_embeddings",
              "embeddings.patch_embeddings.projection.weight", "encoder.layer.1.attention.attention.key.bias",
              "encoder.layer.0.attention.output.dense.weight", "encoder.layer.0.layer_scale2.lambda1",
              "encoder.layer.1.mlp.fc2.bias", "layernorm.weight"):
        assert k in v2, k
    assert "encoder.layer.0.mlp.weights_in.weight" in load_file(str(files["v2-swiglu"]["hf"]))
    v3 = load_file(str(files["v3-plus"]["hf"]))
    for k in ("embeddings.register_tokens", "embeddings.patch_embeddings.weight", "layer.0.attention.q_proj.bias",
              "layer.0.attention.k_proj.weight", "layer.1.attention.o_proj.weight", "layer.0.layer_scale1.lambda1",
              "layer.0.mlp.gate_proj.weight", "layer.0.mlp.up_proj.weight", "layer.0.mlp.down_proj.bias", "norm.bias"):
        assert k in v3, k
    assert "layer.0.attention.k_proj.bias" not in v3 and v3["embeddings.mask_token"].shape == (1, 1, 32)
    assert not any("bias_mask" in k or "periods" in k for k in v3)


@pytest.mark.parametrize("kid", IDS)
def test_both_layouts_load_to_the_same_model(files, kid):
    """Meta's .pth, Hugging Face's .safetensors and its folder give one state dict (one weights
    sha256) and the original model's features."""
    f = files[kid]
    loaded, infos = {}, {}
    for layout in ("meta", "hf", "folder"):
        loaded[layout], infos[layout] = _load(f[layout], f["spec"])
        assert infos[layout]["layout"] == ("meta" if layout == "meta" else "hf")
        assert infos[layout]["ignored"] == (["dino_head.mlp.0.weight"]
                                            if layout == "meta" and kid.startswith("v2") else [])
    a, b, c = (m.state_dict() for m in loaded.values())
    assert set(a) == set(b) == set(c)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]), k
    assert ed.weights_sha256(loaded["meta"]) == ed.weights_sha256(loaded["hf"]) == ed.weights_sha256(loaded["folder"])
    x = ed.random_batch(2 * f["spec"].patch * 3, seed=1)
    want = _feats(f["model"], x)
    assert np.abs(_feats(loaded["hf"], x) - want).max() <= 1e-5
    if kid.startswith("v3"):   # DINOv3 read back: its key bias folded to 0, the forward unchanged
        assert not loaded["meta"].blocks[0].attn.qkv.bias[32:64].any()


@pytest.mark.parametrize("kid", ["v2-reg4", "v3"])
def test_export_from_either_layout_gives_the_same_onnx_features(files, kid, tmp_path):
    """``omh-ref export --arch dinov2 --patch 14 --registers 4 --checkpoint F`` (and ``--arch
    dinov3``) from Meta's file and from Hugging Face's, at 224 px (the 37 x 37 positional grid
    interpolated, antialiased, for DINOv2): the same features, onnxruntime equal to torch."""
    from click.testing import CliRunner

    from omh_ref.extract.backbone import inspect_model
    from omh_ref_cli.main import main

    f = files[kid]
    fam, patch, regs = f["spec"].family, f["spec"].patch, f["spec"].registers
    extra = ["--patch", "14", "--registers", "4"] if fam == "dinov2" else []
    got = {}
    for layout in ("meta", "hf"):
        out = tmp_path / layout
        res = CliRunner().invoke(main, ["export", "--arch", fam, *extra, "--checkpoint", str(f[layout]),
                                        "--resolution", "224", "--out", str(out)])
        assert res.exit_code == 0, res.output
        (entry,) = json.loads((out / "manifest.json").read_text())["models"]
        stem = "dinov2_vitt14_reg4" if fam == "dinov2" else "dinov3_vitt16"
        assert entry["name"] == f"{stem}_224" and entry["file"] == f"{stem}_224.onnx"
        assert (entry["family"], entry["arch"], entry["patch"], entry["registers"]) == (fam, "vit_tiny", patch, regs)
        assert entry["grid"] == [224 // patch] * 2 and entry["dim"] == 32 and entry["random_init"] is False
        assert entry["check"]["pass"] and entry["check"]["max_abs_diff"] <= TOL
        assert entry["checkpoint_sha256"] == archs.checkpoint_sha256(f[layout])
        stated = inspect_model(out / entry["file"]).provenance()
        assert (stated["family"], stated["registers"], stated["patch"], stated["dim"]) == (fam, regs, patch, 32)
        assert stated["weights_sha256"] == entry["weights_sha256"]
        got[layout] = (entry, _ort(out / entry["file"], ed.random_batch(224, seed=7)))
    assert got["meta"][0]["weights_sha256"] == got["hf"][0]["weights_sha256"]
    assert np.array_equal(got["meta"][1], got["hf"][1])
    want = _feats(f["model"], ed.random_batch(224, seed=7))
    assert got["meta"][1].shape == (2, 224 // patch, 224 // patch, 32)
    assert np.abs(got["meta"][1] - want).max() <= TOL


@pytest.mark.parametrize("kid", IDS)
def test_onnx_matches_torch_at_two_resolutions_and_any_batch(files, kid, tmp_path):
    f = files[kid]
    p = f["spec"].patch
    for r in (4 * p, 9 * p):
        path = ed.export(f["model"], r, tmp_path)
        assert path.name == f"{archs.stem(archs.complete(f['spec']))}_{r}.onnx"
        for b in (1, 3):
            x = ed.random_batch(r, seed=b, batch=b)
            got, want = _ort(path, x), _feats(f["model"], x)
            assert got.shape == want.shape == (b, r // p, r // p, 32)
            assert np.abs(got - want).max() <= TOL


def test_a_hugging_face_file_that_does_not_fit_is_one_line_naming_the_key(files, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    f = files["v2-reg4"]
    state = load_file(str(f["hf"]))
    gone = dict(state)
    del gone["encoder.layer.1.attention.attention.value.weight"]
    save_file(gone, str(tmp_path / "gone.safetensors"))
    extra = {**state, "encoder.layer.1.attention.attention.extra.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    wrong = {**state, "embeddings.register_tokens": torch.zeros(1, 3, 32)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    for name, said in (("gone", "missing key 'encoder.layer.1.attention.attention.value.weight' (1 missing, 0 unexpected)"),
                       ("extra", "unexpected key 'encoder.layer.1.attention.attention.extra.weight' (0 missing, 1 unexpected)"),
                       ("wrong", "'embeddings.register_tokens' gives register_tokens shape (1, 3, 32), the model needs "
                                 "(1, 4, 32)")):
        rc = ed.main(["--arch", "dinov2_vitt14_reg", "--checkpoint", str(tmp_path / f"{name}.safetensors"),
                      "--resolution", "28", "--out", str(tmp_path / name)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1, err
        assert err[0].startswith("error: checkpoint ") and said in err[0], err[0]
        assert "DINOv2 vit_tiny patch 14, 4 registers in the Hugging Face layout" in err[0]
        assert not (tmp_path / name).exists()


def test_meta_checkpoints_of_another_shape_are_refused_naming_every_key(files, tmp_path, capsys):
    f = files["v2-reg4"]
    rc = ed.main(["--arch", "dinov2_vitt14", "--checkpoint", str(f["meta"]), "--resolution", "28",
                  "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err
    assert rc == 1 and "does not fit DINOv2 vit_tiny patch 14, 0 registers" in err
    assert "unexpected keys (1): register_tokens" in err and not (tmp_path / "a").exists()
    # --arch dinov2 reads the size, the patch and the registers from the file
    rc = ed.main(["--arch", "dinov2", "--checkpoint", str(f["meta"]), "--resolution", "28", "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert rc == 0 and "from 'teacher'" in out and "into DINOv2 ViT-T/14 with 4 registers" in out
    assert "ignored 1 keys: dino_head.mlp.0.weight" in out
    assert (tmp_path / "b" / "dinov2_vitt14_reg4_28.onnx").is_file()
    # a file none of whose sizes fits
    rc = ed.main(["--arch", "dinov3", "--checkpoint", str(files["v2-reg4"]["hf"]), "--resolution", "32",
                  "--out", str(tmp_path / "c")])
    assert rc == 1 and "not a DINOv3 ViT in Hugging Face's layout" in capsys.readouterr().err


def test_training_checkpoints_as_dino_and_dinov2_save_them_load_their_teacher(files, tmp_path, capsys):
    """DINO's full checkpoint pickles its argparse options beside the networks (read under
    weights_only with the Namespace allowed); DINOv2's training checkpoint keeps both networks
    under "model" as teacher.backbone.* / student.backbone.*: the teacher is taken."""
    import argparse

    f = files["v2-reg4"]
    sd = {k: v.clone() for k, v in f["model"].state_dict().items()}
    wrong = {k: torch.zeros_like(v) for k, v in sd.items()}
    both = {**{f"teacher.backbone.{k}": v for k, v in sd.items()},
            **{f"student.backbone.{k}": v for k, v in wrong.items()}, "teacher.dino_head.w": torch.zeros(2)}
    torch.save({"model": both, "optimizer": {}, "iteration": 7}, tmp_path / "v2_train.pth")
    loaded, info = _load(tmp_path / "v2_train.pth", f["spec"])
    assert info["container"] == "model.teacher"
    assert all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
    dino = {"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}, "args": argparse.Namespace(arch="x"),
            "epoch": 3}
    torch.save(dino, tmp_path / "dino_full.pth")
    loaded, info = _load(tmp_path / "dino_full.pth", f["spec"])
    assert info["container"] == "teacher" and all(torch.equal(loaded.state_dict()[k], sd[k]) for k in sd)
    # a file of another model: the error names a few keys and how many more, on few lines
    torch.save({"model": {f"teacher.backbone.zz{i}": torch.zeros(1) for i in range(40)}}, tmp_path / "odd.pth")
    rc = ed.main(["--arch", "dinov2_vitt14_reg", "--checkpoint", str(tmp_path / "odd.pth"), "--resolution", "28",
                  "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and "... and 32 more" in err and len(err.splitlines()) <= 5, err


def test_dinov3_training_extras_and_chunked_dinov2_blocks_load(files, tmp_path):
    """DINOv3's untied class-token norms (not used by the patch tokens) are ignored and listed;
    DINOv2's FSDP-chunked blocks (blocks.<chunk>.<i>.) load as blocks.<i>."""
    f = files["v3"]
    path = builders.save_meta_checkpoint(f["model"], tmp_path / "v3.pth",
                                         extra={"local_cls_norm.weight": torch.ones(32), "cls_norm.bias": torch.zeros(32)})
    model, info = _load(path, f["spec"])
    assert sorted(info["ignored"]) == ["cls_norm.bias", "local_cls_norm.weight"]
    x = ed.random_batch(64, seed=2)
    assert np.abs(_feats(model, x) - _feats(f["model"], x)).max() <= 1e-6
    g = files["v2"]
    chunked = {k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v
               for k, v in g["model"].state_dict().items()}
    torch.save(chunked, tmp_path / "chunked.pth")
    model, _ = _load(tmp_path / "chunked.pth", g["spec"])
    x = ed.random_batch(56, seed=3)
    assert np.abs(_feats(model, x) - _feats(g["model"], x)).max() <= 1e-6


def test_bad_arch_combinations_are_usage_errors(tmp_path, capsys):
    for args, said in ((["--arch", "dinov2", "--random-init"], "name the size"),
                       (["--arch", "dinov2_vits14", "--registers", "4", "--random-init"], "--arch dinov2_vits14 has 0"),
                       (["--arch", "dinov3_vits16", "--patch", "8", "--random-init"], "--arch dinov3_vits16 has 16"),
                       (["--arch", "dinov2_vits14", "--download"], "--download fetches DINO (v1) only"),
                       (["--arch", "dinov2_vitt14", "--random-init", "--resolution", "32"],
                        "resolution 32 is not a positive multiple of patch 14")):
        rc = ed.main(args + ["--out", str(tmp_path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and said in err[0], (args, err)
    assert not list(tmp_path.iterdir())


def test_random_init_names_and_records_the_family(tmp_path):
    from omh_ref.extract.backbone import inspect_model

    for arch, name, family, regs in (("dinov2_vitt14_reg", "dinov2_vitt14_reg4_random2_42", "dinov2", 4),
                                     ("dinov3_vitt16", "dinov3_vitt16_random2_48", "dinov3", 4)):
        res = 42 if family == "dinov2" else 48
        assert ed.main(["--arch", arch, "--random-init", "--seed", "2", "--resolution", str(res),
                        "--out", str(tmp_path)]) == 0
        (entry,) = json.loads((tmp_path / f"{name}.manifest.json").read_text())["models"]
        assert entry["source"] == "random-init:seed=2" and entry["random_init"] is True
        p = inspect_model(tmp_path / f"{name}.onnx").provenance()
        assert (p["family"], p["registers"], p["random_init"]) == (family, regs, True)
    torch.manual_seed(2)   # as main: seed, then build
    again = ed.build(archs.complete(archs.parse_arch("dinov3_vitt16")))
    assert isinstance(again, DinoV3) and ed.weights_sha256(again) == entry["weights_sha256"]
    assert isinstance(ed.build(archs.complete(archs.parse_arch("dinov2_vitt14"))), DinoV2)
    assert not (tmp_path / "manifest.json").exists()


def test_a_checkpoint_is_read_only_from_the_file_given(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="no such file or folder"):
        checkpoints.read_file(tmp_path / "none.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoints.CheckpointError, match="a folder without model.safetensors"):
        checkpoints.read_file(tmp_path / "empty")
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(checkpoints.CheckpointError, match="cannot read checkpoint"):
        checkpoints.read_file(tmp_path / "bad.safetensors")
