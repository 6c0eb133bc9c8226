"""Feature store and KNN table: streaming reads, release of mapped pages, top-k correctness."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpy.lib.format import open_memmap

from omh_ref.data.knn import build_knn, load_knn, pooled_features, topk_cosine
from omh_ref.data.store import FeatureStore
from omh_ref.errors import InputError
from tests.strategies import seeds


@given(N=st.integers(1, 40), k=st.integers(1, 9), chunk=st.integers(1, 16), seed=seeds)
def test_topk_matches_brute_force(N, k, chunk, seed):
    x = np.random.default_rng(seed).standard_normal((N, 6)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    got = topk_cosine(x, k, chunk=chunk)
    kk = min(k, N - 1)
    assert got.shape == (N, kk + 1) and np.array_equal(got[:, 0], np.arange(N))
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    for i in range(N):
        want = np.sort(sims[i])[::-1][:kk]
        np.testing.assert_allclose(sims[i, got[i, 1:]], want, rtol=1e-6)   # best first, ties allowed


def _feats(path, N=10, seed=0):
    f = open_memmap(path, mode="w+", dtype=np.float16, shape=(N, 3, 4, 5))
    f[:] = np.random.default_rng(seed).standard_normal(f.shape)
    f.flush()
    del f
    return FeatureStore(path)


def test_store_reads_any_order_with_repeats(tmp_path):
    store = _feats(tmp_path / "feats.npy")
    full = np.load(tmp_path / "feats.npy").astype(np.float32)
    idx = np.array([7, 2, 7, 0])
    np.testing.assert_array_equal(store.read(idx), full[idx])
    starts = [s for s, _ in store.batches(4)]
    assert starts == [0, 4, 8]
    with pytest.raises(InputError, match="out of range"):
        store.read(np.array([10]))


def test_pooled_features_and_knn_roundtrip(tmp_path):
    store = _feats(tmp_path / "feats.npy")
    pooled = pooled_features(store, batch_size=3)
    full = np.load(tmp_path / "feats.npy").astype(np.float32).mean(axis=(1, 2))
    np.testing.assert_allclose(pooled, full / np.linalg.norm(full, axis=1, keepdims=True), rtol=1e-5)
    table = build_knn(store, tmp_path / "knn.npy", k=4)
    assert np.array_equal(load_knn(tmp_path / "knn.npy", store), table)
    other = _feats(tmp_path / "other.npy", seed=1)
    with pytest.raises(InputError, match="another feature file"):
        load_knn(tmp_path / "knn.npy", other)


def test_meta_mismatch_is_named(tmp_path):
    _feats(tmp_path / "feats.npy")
    (tmp_path / "feats.json").write_text('{"images": ["a", "b"]}')
    with pytest.raises(InputError, match="feats.json: lists 2 images"):
        FeatureStore(tmp_path / "feats.npy")
