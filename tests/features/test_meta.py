"""``feats.json``: one schema, one writer (``meta.make`` + ``meta.write``), one reader (``meta.read``)."""
import json

import numpy as np
import pytest

from omh_ref.core.errors import InputError
from omh_ref.features import meta, synthetic
from omh_ref.features.store import FeatureStore

REQUIRED = dict(shape=[3, 2, 4, 5], dtype="float16", backbone="b", resolution=16, patch=8)


def test_make_fills_every_field_and_derives_grid_and_dim():
    rec = meta.make(**REQUIRED, images=["a", "b", "c"], crop="center")
    assert set(meta.FIELDS) <= set(rec) and rec["crop"] == "center"          # a writer's own extra kept
    assert rec["grid"] == [2, 4] and rec["dim"] == 5 and rec["format"] == meta.FORMAT
    assert rec["labels"] is None and rec["skipped"] == [] and rec["label_ignore"] == 255


@pytest.mark.parametrize("bad,msg", [
    (dict(images=["a"]), "1 image names for 3 rows"),
    (dict(n_classes="27"), "field 'n_classes' should be int"),
    (dict(n_classes=0), "field 'n_classes' should be >= 1"),
    (dict(backbone=None), "missing backbone"),
])
def test_make_refuses_a_bad_record(bad, msg):
    with pytest.raises((ValueError, InputError), match=msg):
        meta.make(**{**REQUIRED, **bad})


def test_both_writers_share_the_schema(tmp_path):
    """The synthetic data's record has the fields extraction writes (tests/extract/test_extract.py checks
    extraction's), and the store reads it back through the one reader."""
    spec = synthetic.SynthSpec(n_images=4, grid=3, patch=5, dim=13, n_super=2, latent_dim=8, seed=0)
    synthetic.write(spec, tmp_path)
    rec = json.loads((tmp_path / "feats.json").read_text())
    assert set(meta.FIELDS) <= set(rec) and rec["dataset"] == "synthetic"
    assert FeatureStore(tmp_path / "feats.npy").meta == meta.read(tmp_path / "feats.json")


def test_read_checks_against_the_features_and_reads_the_old_key(tmp_path):
    f = np.zeros((3, 2, 4, 5), np.float16)
    old = {"shape": [3, 2, 4, 5], "dtype": "float16", "patch_size": 8, "images": ["a", "b", "c"]}
    (tmp_path / "feats.json").write_text(json.dumps(old))
    assert meta.read(tmp_path / "feats.json", f)["patch"] == 8
    with pytest.raises(InputError, match=r"feats.json: says dtype float16 but x.npy holds float32"):
        meta.read(tmp_path / "feats.json", f.astype(np.float32), "x.npy")
    with pytest.raises(InputError, match=r"says shape \(3, 2, 4, 5\) but x.npy has shape \(2, 2, 4, 5\)"):
        meta.read(tmp_path / "feats.json", np.zeros((2, 2, 4, 5), np.float16), "x.npy")
    (tmp_path / "feats.json").write_text(json.dumps({**old, "shape": None}))
    with pytest.raises(InputError, match=r"lists 3 images but x.npy has 2 rows"):
        meta.read(tmp_path / "feats.json", np.zeros((2, 2, 4, 5), np.float16), "x.npy")
    (tmp_path / "feats.json").write_text("[1]")
    with pytest.raises(InputError, match="expected a JSON object"):
        meta.read(tmp_path / "feats.json")


def test_listed_labels(tmp_path):
    meta.write(tmp_path / "feats.json", meta.make(**REQUIRED, labels="labels.npy"))
    assert meta.listed_labels(tmp_path / "feats.npy") == tmp_path / "labels.npy"
    meta.write(tmp_path / "feats.json", meta.make(**REQUIRED))
    assert meta.listed_labels(tmp_path / "feats.npy") is None
    assert meta.listed_labels(tmp_path / "none" / "feats.npy") is None
