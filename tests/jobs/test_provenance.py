"""Backbone provenance end to end, replayed as a user would hit it: two random ViT-S/16 exports
(seeds 0 and 1), features of each, a checkpoint trained on the first. Every command that meets
features or a model of the other backbone refuses in one line (``eval``, ``segment``, ``train
--val-features``, ``seeds``), goes on with ``--allow-backbone-mismatch`` saying so, and every run on
random weights says the features are random."""
import json

import pytest
from click.testing import CliRunner

from omh_ref.features import provenance
from omh_ref_cli.main import main
from tests import layouts

pytest.importorskip("torch")

FLAG = "--allow-backbone-mismatch"


def _ok(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, (args, res.output)
    return res.output


def _refused(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "Traceback" not in res.output, (args, res.output)
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: ") and "another weights" in last and FLAG in last, last
    return last


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("prov")
    layouts.folder(d, n=4, labels=True, nested=False)
    for seed in (0, 1):
        _ok(["export", "--arch", "vit_small", "--patch", "16", "--random-init", "--seed", str(seed),
             "--resolution", "32", "--out", str(d / "w")])
    models = {s: str(d / "w" / f"dino_vits16_random{s}_32.onnx") for s in (0, 1)}
    for s in (0, 1):
        out = _ok(["extract", "--model", models[s], "--images", str(d / "images"), "--labels", str(d / "labels"),
                   "--out", str(d / f"f{s}"), "--quiet"])
        assert "randomly initialised backbone" in out
    out = _ok(["train", "--features", str(d / "f0" / "feats.npy"), "--out", str(d / "run"), "--steps", "2",
               "--batch-size", "2", "--levels", "6,3", "--dim", "4", "--quiet"])
    assert "note: the training features" in out and "randomly initialised backbone" in out
    return d, models


def test_feats_json_and_the_checkpoint_record_the_backbone(world):
    d, _ = world
    meta = json.loads((d / "f0" / "feats.json").read_text())
    assert meta["backbone"] == "dino_vits16_random0_32" and meta["backbone_random_init"] is True
    assert meta["backbone_arch"] == "vit_small" and len(meta["backbone_weights_sha256"]) == 64
    from omh_ref.train.checkpoint import backbone_of

    assert backbone_of(d / "run" / "ckpt.npz") == provenance.of_meta(meta)


def test_eval_on_another_backbones_features_is_refused_unless_allowed(world):
    d, _ = world
    base = ["eval", "--checkpoint", str(d / "run" / "ckpt.npz"), "--n-classes", "3", "--quiet"]
    out = _ok(base + ["--features", str(d / "f0" / "feats.npy")])
    assert "randomly initialised backbone" in out
    last = _refused(base + ["--features", str(d / "f1" / "feats.npy")])
    assert "dino_vits16_random1_32" in last and "dino_vits16_random0_32" in last
    out = _ok(base + ["--features", str(d / "f1" / "feats.npy"), FLAG])
    assert f"warning: the --features {d / 'f1' / 'feats.npy'}" in out
    _refused(base + ["--features", str(d / "f0" / "feats.npy"), "--train-features", str(d / "f1" / "feats.npy")])


def test_segment_with_another_backbone_is_refused_unless_allowed(world):
    d, models = world
    base = ["segment", "--checkpoint", str(d / "run" / "ckpt.npz"), "--images", str(d / "images"), "--quiet"]
    out = _ok(base + ["--model", models[0], "--out", str(d / "s0")])
    assert "randomly initialised backbone" in out
    _refused(base + ["--model", models[1], "--out", str(d / "s1")])
    assert not (d / "s1").exists() or not any((d / "s1").iterdir())
    assert "warning: the --model" in _ok(base + ["--model", models[1], "--out", str(d / "s2"), FLAG])


def test_training_and_seeds_refuse_validation_features_of_another_backbone(world):
    d, _ = world
    _refused(["train", "--features", str(d / "f0" / "feats.npy"), "--out", str(d / "run2"), "--steps", "2",
              "--batch-size", "2", "--levels", "6,3", "--dim", "4", "--quiet",
              "--val-features", str(d / "f1" / "feats.npy")])
    assert not (d / "run2" / "ckpt.npz").exists()
    _refused(["seeds", "--features", str(d / "f0" / "feats.npy"), "--val-features", str(d / "f1" / "feats.npy"),
              "--out", str(d / "seeds"), "--seeds", "0", "--steps", "2", "--batch-size", "2", "--levels", "6,3",
              "--dim", "4", "--no-probe", "--quiet"])
    assert not (d / "seeds" / "seed0").exists()


def test_what_tells_two_backbones_apart():
    s8 = {"name": "a", "arch": "vit_small", "patch": 8, "dim": 384, "weights_sha256": "1" * 64, "random_init": False,
          "onnx_sha256": "a" * 64, "resolution": 224}
    assert provenance.differs(s8, dict(s8, resolution=320, onnx_sha256="b" * 64)) is None   # one weight set
    assert provenance.differs(s8, dict(s8, patch=16)) == "patch size"
    assert provenance.differs(s8, dict(s8, weights_sha256="2" * 64)) == "weights"
    assert provenance.differs(s8, dict(s8, dim=768, arch="vit_base")) == "channel count"
    foreign = dict(s8, arch=None, weights_sha256=None, random_init=None)       # not made by omh-ref export
    assert provenance.differs(foreign, dict(foreign, onnx_sha256="b" * 64)) .startswith("ONNX file")
    assert provenance.differs(foreign, dict(foreign, onnx_sha256="b" * 64, resolution=320)) is None
    assert provenance.differs(foreign, dict(foreign, name="synthetic")).startswith("source")
