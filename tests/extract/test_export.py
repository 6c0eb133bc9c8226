"""omh-ref export (omh_ref/extract/export_dino.py): DINO ViT -> ONNX, checked with onnxruntime, recorded in a manifest.

No pretrained weights exist on these machines, so every test uses a randomly initialised model
through the same code path as a real checkpoint (build_vit -> [load_checkpoint] -> export ->
check_onnx -> manifest). ViT-S/16 at 64 px keeps it fast; one ViT-S/8 export at 224 px covers the
real backbone's shape (28x28 grid). Everything is written under tmp_path (``--manifest``).
"""
import copy
import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")  # torch.onnx.export (TorchScript exporter) needs it

TOL = 1e-4

from omh_ref.extract import export_dino as ed  # noqa: E402


@functools.cache
def _built(seed, arch, patch):
    torch.manual_seed(seed)  # as main(): seed, then build_vit
    return ed.build_vit(arch, patch)


def _model(seed, arch="vit_small", patch=16):
    """A fresh copy of the seeded random model (each build is ~1 s of trunc_normal_ init)."""
    return copy.deepcopy(_built(seed, arch, patch))


def _torch_feats(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _ort_feats(path, x):
    return ed.ort_session(path).run(["features"], {"images": x})[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export through the command line (``omh-ref export``): ViT-S/16, random init seed 5,
    64 px; random weights are named so, and their manifest entry lies beside the file."""
    from click.testing import CliRunner

    from omh_ref_cli.main import main

    out = tmp_path_factory.mktemp("export")
    res = CliRunner().invoke(main, ["export", "--arch", "vit_small", "--patch", "16", "--random-init", "--seed", "5",
                                    "--resolution", "64", "--out", str(out)])
    assert res.exit_code == 0, res.output
    manifest = out / "dino_vits16_random5_64.manifest.json"
    assert manifest.is_file() and not (out / "manifest.json").exists()
    return out, manifest, _model(5)


def test_export_without_torch_is_one_line(monkeypatch):
    import sys

    from click.testing import CliRunner

    import omh_ref.extract
    from omh_ref_cli.main import main

    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "omh_ref.extract.export_dino")
    monkeypatch.delattr(omh_ref.extract, "export_dino")
    res = CliRunner().invoke(main, ["export", "--random-init"])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [
        "error: export needs torch (import of torch halted; None in sys.modules); pip install 'omh-ref[torch]'"]


def test_onnx_matches_torch_and_shape(exported):
    out, _, model = exported
    path = out / "dino_vits16_random5_64.onnx"
    assert path.is_file()
    x = ed.random_batch(64, seed=11, batch=2)
    got, want = _ort_feats(path, x), _torch_feats(model, x)
    assert got.shape == want.shape == (2, 4, 4, 384)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() <= TOL


def test_dynamic_batch(exported):
    out, _, model = exported
    path = out / "dino_vits16_random5_64.onnx"
    for b in (1, 3):
        x = ed.random_batch(64, seed=b, batch=b)
        got = _ort_feats(path, x)
        assert got.shape == (b, 4, 4, 384)
        assert np.abs(got - _torch_feats(model, x)).max() <= TOL
    # each image is processed independently: batch composition does not change an image's features
    x = ed.random_batch(64, seed=3, batch=3)
    assert np.abs(_ort_feats(path, x[1:2]) - _ort_feats(path, x)[1:2]).max() <= TOL


def test_manifest_entry(exported):
    out, manifest, _ = exported
    data = json.loads(manifest.read_text())
    (entry,) = data["models"]
    assert entry["name"] == "dino_vits16_random5_64" and entry["random_init"] is True
    assert (entry["arch"], entry["patch"], entry["resolution"]) == ("vit_small", 16, 64)
    assert entry["grid"] == [4, 4] and entry["dim"] == 384
    assert entry["file"] == "dino_vits16_random5_64.onnx"
    assert entry["weights_sha256"] == ed.weights_sha256(_model(5)) != ed.weights_sha256(_model(6))
    assert entry["sha256"] == ed.sha256(out / entry["file"])
    assert len(entry["sha256"]) == 64
    assert entry["check"]["pass"] is True and 0 <= entry["check"]["max_abs_diff"] <= TOL
    assert entry["source"] == "random-init:seed=5"
    assert entry["torch"] == torch.__version__ and entry["onnxruntime"] == ort.__version__
    assert not list(manifest.parent.glob("*.tmp")), "temp file left behind"


def test_update_manifest_replaces_same_name(tmp_path):
    m = tmp_path / "sub" / "manifest.json"
    ed.update_manifest(m, {"name": "a", "v": 1})
    ed.update_manifest(m, {"name": "b", "v": 2})
    ed.update_manifest(m, {"name": "a", "v": 3})
    models = json.loads(m.read_text())["models"]
    assert sorted((e["name"], e["v"]) for e in models) == [("a", 3), ("b", 2)]
    assert [p.name for p in m.parent.iterdir()] == ["manifest.json"]


def test_pos_embed_interpolation():
    model = _model(1)
    assert model.interpolate_pos_encoding(14, 14) is model.pos_embed  # the trained grid: as is
    pe = model.interpolate_pos_encoding(4, 6)
    assert pe.shape == (1, 1 + 24, 384)
    assert torch.equal(pe[:, 0], model.pos_embed[:, 0])  # class token kept
    # bicubic, DINO's scale factor (g + 0.1) / 14, align_corners False
    ref = torch.nn.functional.interpolate(
        model.pos_embed[:, 1:].reshape(1, 14, 14, 384).permute(0, 3, 1, 2),
        scale_factor=(4.1 / 14, 6.1 / 14), mode="bicubic", align_corners=False)
    assert torch.allclose(pe[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 24, 384))


def _dino_layout_checkpoint(model, path, mutate=None):
    """Save ``model`` the way a DINO training checkpoint holds the teacher: under "teacher",
    "module.backbone." prefixes, plus DINOHead keys that the backbone ignores."""
    sd = {f"module.backbone.{k}": v.clone() for k, v in model.state_dict().items()}
    sd["module.head.last_layer.weight_g"] = torch.ones(1, 8)
    if mutate:
        mutate(sd)
    torch.save({"teacher": sd, "student": {}, "epoch": 100}, path)


def test_checkpoint_loads_dino_layout(tmp_path):
    src = _model(1)
    path = tmp_path / "dino_vits16_teacher.pth"
    _dino_layout_checkpoint(src, path)
    dst = _model(2)
    info = ed.load_checkpoint(dst, path)
    assert info["container"] == "teacher" and info["loaded"] == len(src.state_dict())
    assert info["ignored"] == ["module.head.last_layer.weight_g"]
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # every key of the official layout is present in the model
    keys = set(dst.state_dict())
    for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "blocks.11.norm1.weight", "blocks.11.attn.qkv.bias", "blocks.11.attn.proj.weight",
              "blocks.11.norm2.bias", "blocks.11.mlp.fc1.weight", "blocks.11.mlp.fc2.bias",
              "norm.weight", "norm.bias"):
        assert k in keys, k
    assert dst.state_dict()["pos_embed"].shape == (1, 197, 384)


def test_checkpoint_plain_state_dict(tmp_path):
    src = _model(1)
    path = tmp_path / "plain.pth"
    torch.save(src.state_dict(), path)
    dst = _model(2)
    assert ed.load_checkpoint(dst, path)["container"] is None
    assert torch.equal(dst.pos_embed, src.pos_embed)


def test_checkpoint_wrong_key_and_shape_named(tmp_path):
    src = _model(1)

    def rename(sd):
        sd["module.backbone.blocks.3.attn.qkv_renamed.weight"] = sd.pop(
            "module.backbone.blocks.3.attn.qkv.weight")

    bad_key = tmp_path / "bad_key.pth"
    _dino_layout_checkpoint(src, bad_key, rename)
    with pytest.raises(ed.CheckpointError) as e:
        ed.load_checkpoint(_model(2), bad_key)
    msg = str(e.value)
    assert "missing keys (1): blocks.3.attn.qkv.weight" in msg
    assert "unexpected keys (1): blocks.3.attn.qkv_renamed.weight" in msg

    def reshape(sd):
        sd["module.backbone.pos_embed"] = torch.zeros(1, 785, 384)  # a /8 model's pos_embed

    bad_shape = tmp_path / "bad_shape.pth"
    _dino_layout_checkpoint(src, bad_shape, reshape)
    with pytest.raises(ed.CheckpointError, match=r"pos_embed: checkpoint \(1, 785, 384\) vs "
                                                 r"model \(1, 197, 384\)"):
        ed.load_checkpoint(_model(2), bad_shape)


def test_cli_checkpoint_source_and_errors(tmp_path, capsys):
    src = _model(1)
    ckpt = tmp_path / "teacher.pth"
    _dino_layout_checkpoint(src, ckpt)
    manifest = tmp_path / "m.json"
    rc = ed.main(["--arch", "vit_small", "--patch", "16", "--checkpoint", str(ckpt),
                  "--resolution", "64", "--out", str(tmp_path), "--manifest", str(manifest)])
    assert rc == 0
    (entry,) = json.loads(manifest.read_text())["models"]
    assert entry["source"] == "checkpoint:teacher.pth"
    x = ed.random_batch(64, seed=4)
    got = _ort_feats(tmp_path / entry["file"], x)
    assert np.abs(got - _torch_feats(src, x)).max() <= TOL  # the checkpoint's weights, not random

    # wrong architecture for the checkpoint: exit 1, every problem named, nothing written
    rc = ed.main(["--arch", "vit_small", "--patch", "8", "--checkpoint", str(ckpt),
                  "--resolution", "64", "--out", str(tmp_path / "b"), "--manifest", str(manifest)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "does not fit vit_small patch 8" in err
    assert "pos_embed: checkpoint (1, 197, 384) vs model (1, 785, 384)" in err
    assert "patch_embed.proj.weight: checkpoint (384, 3, 16, 16) vs model (384, 3, 8, 8)" in err
    assert not (tmp_path / "b").exists()
    assert len(json.loads(manifest.read_text())["models"]) == 1


def test_download_path_on_a_local_url(tmp_path, monkeypatch, capsys):
    """--download through urllib, on a file:// URL standing in for DINO's server (no network)."""
    src = _model(1)
    served = tmp_path / "server" / "dino_deitsmall16_pretrain.pth"
    served.parent.mkdir()
    torch.save(src.state_dict(), served)   # DINO's backbone-only files are bare state dicts
    monkeypatch.setitem(ed.OFFICIAL_URLS, ("vit_small", 16), served.as_uri())
    manifest, cache = tmp_path / "m.json", tmp_path / "cache"
    args = ["--arch", "vit_small", "--patch", "16", "--download", "--cache-dir", str(cache),
            "--resolution", "64", "--out", str(tmp_path / "onnx"), "--manifest", str(manifest)]
    assert ed.main(args) == 0
    assert [p.name for p in cache.iterdir()] == [served.name]          # no .part file left
    assert (cache / served.name).read_bytes() == served.read_bytes()
    (entry,) = json.loads(manifest.read_text())["models"]
    assert entry["source"] == f"checkpoint:{served.name}" and entry["checkpoint_sha256"] == ed.sha256(served)
    x = ed.random_batch(64, seed=2)
    assert np.abs(_ort_feats(tmp_path / "onnx" / entry["file"], x) - _torch_feats(src, x)).max() <= TOL
    # a second run reuses the cached file; a missing file on the "server" is exit 1, named
    served.unlink()
    assert ed.main(args) == 0 and "downloaded before" in capsys.readouterr().out
    monkeypatch.setitem(ed.OFFICIAL_URLS, ("vit_small", 16), (tmp_path / "gone.pth").as_uri())
    assert ed.main(args[:6] + [str(tmp_path / "cache2")] + args[7:]) == 1
    assert "cannot download" in capsys.readouterr().err
    assert not (tmp_path / "cache2").exists() or not list((tmp_path / "cache2").iterdir())


def test_official_urls_cover_every_arch_and_patch():
    assert set(ed.OFFICIAL_URLS) == {(a, p) for a in ed.ARCHS for p in ed.PATCHES}
    assert all(u.startswith("https://dl.fbaipublicfiles.com/dino/") and u.endswith("_pretrain.pth")
               for u in ed.OFFICIAL_URLS.values())


def test_cli_failed_check_removes_file(tmp_path, capsys):
    manifest = tmp_path / "m.json"
    rc = ed.main(["--arch", "vit_small", "--patch", "16", "--random-init", "--resolution", "64",
                  "--out", str(tmp_path), "--manifest", str(manifest), "--tol", "0"])
    assert rc == 1
    assert "check failed" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.onnx")) and not manifest.exists()


def test_cli_rejects_bad_resolution(tmp_path):
    rc = ed.main(["--patch", "16", "--random-init", "--resolution", "100", "--out", str(tmp_path),
                  "--manifest", str(tmp_path / "m.json")])
    assert rc == 2 and not list(tmp_path.iterdir())


def test_vits8_224(tmp_path):
    """The real backbone's shape: ViT-S/8 at 224 px -> (B, 28, 28, 384), the trained pos grid."""
    model = _model(0, patch=8)
    path = ed.export(model, 224, tmp_path)
    assert path.name == "dino_vits8_224.onnx"
    assert ed.check_onnx(model, path, 224, seed=0) <= TOL
    got = _ort_feats(path, ed.random_batch(224, seed=1, batch=1))
    assert got.shape == (1, 28, 28, 384)


def test_the_onnx_file_states_its_provenance_and_one_weight_set_has_one_hash(tmp_path):
    """A checkpoint's exports at two resolutions: plain names, the tracked manifest, the same
    weights hash in both files' metadata (read back by extraction's inspect_model), distinct file
    hashes; another seed's random weights hash differently and say they are random."""
    from click.testing import CliRunner

    from omh_ref.extract.backbone import inspect_model
    from omh_ref_cli.main import main

    src = _model(1)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "weights"
    res = CliRunner().invoke(main, ["export", "--arch", "vit_small", "--patch", "16", "--checkpoint",
                                    str(tmp_path / "w.pth"), "--resolution", "32", "--resolution", "64",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    a, b = (inspect_model(out / f"dino_vits16_{r}.onnx").provenance() for r in (32, 64))
    assert a["weights_sha256"] == b["weights_sha256"] == ed.weights_sha256(src) and a["onnx_sha256"] != b["onnx_sha256"]
    assert (a["arch"], a["patch"], a["dim"], a["random_init"]) == ("vit_small", 16, 384, False)
    assert {m["file"] for m in json.loads((out / "manifest.json").read_text())["models"]} == {
        "dino_vits16_32.onnx", "dino_vits16_64.onnx"}
    res = CliRunner().invoke(main, ["export", "--arch", "vit_small", "--patch", "16", "--random-init", "--seed", "3",
                                    "--resolution", "32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    r = inspect_model(out / "dino_vits16_random3_32.onnx").provenance()
    assert r["random_init"] is True and r["weights_sha256"] not in (None, a["weights_sha256"])
    assert len(json.loads((out / "manifest.json").read_text())["models"]) == 2   # not written into it
