"""The HP base's row files beside ``feats.npy`` (omh_ref/features/store.py ``RowFile``): ``attn.npy``
(N, h, w, 9) and ``feats_aug.npy`` (N, h, w, C), read by row index through the memmap like the
features, and refused in one line when ``feats.json`` does not name them or their N, h, w (or
last axis) are not the features'."""
import os

import numpy as np
import pytest

from omh_ref.core.errors import InputError
from omh_ref.features import attention as at
from omh_ref.extract import augment as ag
from omh_ref.features import meta
from omh_ref.features.store import FeatureStore
from tests.builders import write_feats

N, H, W, C = 12, 3, 4, 7


def _folder(tmp_path, attn_shape=(N, H, W, 9), aug_shape=(N, H, W, C), named=True):
    write_feats(tmp_path / "feats.npy", N=N, h=H, w=W, C=C)
    write_feats(tmp_path / "attn.npy", N=attn_shape[0], h=attn_shape[1], w=attn_shape[2], C=attn_shape[3], seed=1)
    write_feats(tmp_path / "feats_aug.npy", N=aug_shape[0], h=aug_shape[1], w=aug_shape[2], C=aug_shape[3], seed=2)
    extra = dict(attention=at.record(N, H, W), augmented=ag.record(N, H, W, C, "float16", 0, "normalised")) if named \
        else {}
    meta.write(tmp_path / "feats.json", meta.make(shape=[N, H, W, C], dtype="float16", backbone="b", resolution=16,
                                                  patch=4, **extra))
    return FeatureStore(tmp_path / "feats.npy")


def test_rows_are_read_by_index_through_the_memmap(tmp_path):
    store = _folder(tmp_path)
    idx = np.array([7, 0, 7, 11, 3])
    for rf, name in ((store.open_attention(), "attn.npy"), (store.open_augmented(), "feats_aug.npy")):
        assert isinstance(rf.rows, np.memmap) and rf.path == tmp_path / name
        whole = np.load(tmp_path / name)
        got = rf.read(idx)
        assert got.dtype == np.float32 and np.array_equal(got, whole[idx].astype(np.float32))
        assert rf.read([]).shape == (0, H, W, rf.K)
        with pytest.raises(InputError, match=rf"{name}: row index out of range \[0, 12\)"):
            rf.read([12])
    assert store.open_attention().K == 9 and store.open_augmented().K == C


@pytest.mark.parametrize("which,shape,said", [
    ("attention", (N - 1, H, W, 9), "attn.npy: holds 11 rows of a 3x4 grid with 9 values each, but "),
    ("attention", (N, W, H, 9), "attn.npy: holds 12 rows of a 4x3 grid with 9 values each, but "),
    ("attention", (N, H, W, 8), "attn.npy: holds 12 rows of a 3x4 grid with 8 values each, but "),
    ("augmented", (N, H, W, C + 1), "feats_aug.npy: holds 12 rows of a 3x4 grid with 8 values each, but "),
])
def test_a_file_of_other_rows_or_grid_is_one_line(tmp_path, which, shape, said):
    store = _folder(tmp_path, **({"attn_shape": shape} if which == "attention" else {"aug_shape": shape}))
    opener = store.open_attention if which == "attention" else store.open_augmented
    with pytest.raises(InputError) as e:
        opener()
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and said in msg
    assert f"{tmp_path / 'feats.npy'} has 12 rows of a 3x4 grid" in msg and "not extracted with these features" in msg


def test_features_without_them_say_how_to_make_them(tmp_path):
    store = _folder(tmp_path, named=False)
    with pytest.raises(InputError, match=r"feats.json: names no attention weights \(attn.npy\) for .*feats.npy "
                                         r"\(extract them with omh-ref extract --attention, from a model exported "
                                         r"with omh-ref export --attention\)$"):
        store.open_attention()
    with pytest.raises(InputError,
                       match=r"names no augmented features \(feats_aug.npy\) .*omh-ref extract --augment\)$"):
        store.open_augmented()
    assert store.open_attention(tmp_path / "attn.npy").N == N       # a file named explicitly is still checked
    os.remove(tmp_path / "attn.npy")
    with pytest.raises(InputError, match=r"attn.npy: no such file \(expected attention weights"):
        store.open_attention(tmp_path / "attn.npy")


def test_a_file_that_shrinks_while_in_use_is_named(tmp_path):
    store = _folder(tmp_path)
    rf = store.open_augmented()
    size = os.path.getsize(tmp_path / "feats_aug.npy")
    os.truncate(tmp_path / "feats_aug.npy", size - 10)
    with pytest.raises(InputError, match=r"feats_aug.npy: the augmented file shrank from \d+ to \d+ bytes"):
        rf.read([0])
