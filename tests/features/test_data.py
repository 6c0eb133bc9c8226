"""Feature store and KNN table: streaming reads, release of mapped pages, top-k correctness."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from omh_ref.features.knn import build_knn, load_knn, pooled_features, topk_cosine
from omh_ref.features.store import FeatureStore
from omh_ref.core.errors import InputError
from tests.builders import write_feats
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
    return FeatureStore(write_feats(path, N, 3, 4, 5, np.float16, seed))


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


def test_knn_row_ranges_compose(tmp_path):
    """topk/pooling over row ranges (what Dask tasks compute) equal the whole-file result."""
    store = _feats(tmp_path / "feats.npy")
    pooled = pooled_features(store, batch_size=3)
    parts = [pooled_features(store, batch_size=3, start=s, stop=min(s + 4, store.N)) for s in range(0, store.N, 4)]
    assert np.array_equal(np.concatenate(parts), pooled)
    whole = topk_cosine(pooled, 3, chunk=2)
    parts = [topk_cosine(pooled, 3, chunk=2, start=s, stop=min(s + 4, store.N)) for s in range(0, store.N, 4)]
    assert np.array_equal(np.concatenate(parts), whole)


@pytest.mark.parametrize("budget", [None, 2500 * 100])
def test_knn_on_dask_is_byte_identical(tmp_path, monkeypatch, budget):
    """With the default block (1024 rows here) and with a memory budget that forces 64-row blocks."""
    from omh_ref.features import knn

    pytest.importorskip("distributed")
    if budget is not None:
        monkeypatch.setattr(knn, "BLOCK_ENTRIES", budget)
    assert knn.block_rows(2500) == (1024 if budget is None else 64)
    _feats(tmp_path / "feats.npy", N=2500)
    store = FeatureStore(tmp_path / "feats.npy")
    one = build_knn(store, tmp_path / "one.npy", k=5, batch_size=100)
    two = build_knn(store, tmp_path / "two.npy", k=5, batch_size=100, scheduler="local:2", rows_per_task=1024)
    assert np.array_equal(one, two) and two.dtype == np.int32
    assert (tmp_path / "one.npy").read_bytes() == (tmp_path / "two.npy").read_bytes()


def test_block_rows_bounds_the_similarity_block():
    from omh_ref.features.knn import BLOCK_ENTRIES, block_rows

    for N in (1, 100, 16384, 16385, 50_000, 250_000, 10**7, 10**9):
        r = block_rows(N)
        assert 1024 % r == 0 and (r * N <= BLOCK_ENTRIES or r == 1)
        assert r == 1024 or 2 * r * N > BLOCK_ENTRIES          # the largest power of two that fits
    assert block_rows(250_000) == 64 and block_rows(16384) == 1024


def test_meta_mismatch_is_named(tmp_path):
    _feats(tmp_path / "feats.npy")
    (tmp_path / "feats.json").write_text('{"images": ["a", "b"]}')
    with pytest.raises(InputError, match="feats.json: lists 2 images"):
        FeatureStore(tmp_path / "feats.npy")


def test_the_finite_certificate_needs_a_file_unchanged_since_before_the_build(tmp_path, monkeypatch):
    """A table certifies its features finite only when they last changed more than a clock tick
    before the build (a write in the same tick could leave the timestamps equal), and only while
    they stay unchanged: a write through a memory map voids it."""
    import os
    import time

    from omh_ref.features import knn

    p = _feats(tmp_path / "f.npy").path
    monkeypatch.setattr(knn, "CLOCK_TICK_S", 3600.0)      # 'just written': no certificate
    build_knn(FeatureStore(p), tmp_path / "t.npy", k=2)
    assert not knn.certifies_finite(tmp_path / "t.npy", FeatureStore(p))
    monkeypatch.setattr(knn, "CLOCK_TICK_S", 0.0)
    time.sleep(0.02)
    build_knn(FeatureStore(p), tmp_path / "t.npy", k=2)
    assert knn.certifies_finite(tmp_path / "t.npy", FeatureStore(p))
    time.sleep(0.02)
    with open(p, "r+b") as fh:                                 # same bytes written back: still a write
        fh.seek(-2, os.SEEK_END)
        b = fh.read(2)
        fh.seek(-2, os.SEEK_END)
        fh.write(b)
    assert not knn.certifies_finite(tmp_path / "t.npy", FeatureStore(p))


CHANNELS_LAST = [(10, 16, 16, 384), (3, 28, 28, 768), (2, 14, 14, 1024), (4, 6, 5, 7), (2, 384, 384, 384),
                 (1, 20, 30, 1536), (2, 768, 12, 768)]
CHANNELS_FIRST = [(10, 384, 16, 16), (3, 768, 28, 28), (2, 1024, 14, 14), (1, 384, 16, 20), (2, 1536, 8, 8),
                  (1, 4096, 4, 4)]


@pytest.mark.parametrize("shape", CHANNELS_LAST + CHANNELS_FIRST)
def test_a_channels_first_file_is_refused_and_channels_last_ones_open(tmp_path, shape):
    """PyTorch's (N, C, h, w) would train as h = C: refused in one line saying what omh-ref wants;
    every (N, h, w, C) shape opens, including ones whose grid side is a channel count."""
    np.save(tmp_path / "f.npy", np.zeros(shape, np.float16))
    if shape in CHANNELS_FIRST:
        with pytest.raises(InputError, match=r"f\.npy: shape .* looks channels-first \(N, C, h, w\); "
                                             r"omh-ref wants \(N, h, w, C\)"):
            FeatureStore(tmp_path / "f.npy")
    else:
        assert (FeatureStore(tmp_path / "f.npy").h, FeatureStore(tmp_path / "f.npy").C) == (shape[1], shape[3])
