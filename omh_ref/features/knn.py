"""KNN table of images: ``<features stem>.knn.npy`` int32 (N, k+1), row i = image i's neighbours
by cosine of mean-pooled, L2-normalised features, column 0 the image itself (STEGO's precomputed
NN files). One table per feature file, so ``train.npy`` and ``val.npy`` in one folder keep
theirs; a ``knn.npy`` from before that naming is still used when its sidecar's fingerprint
matches the features.

Built in two streamed passes: pool the features batch by batch into (N, C) float32 (small: 77 MB
for 50k ViT-S images), then score blocks of rows against all of them (at most 2^24 similarities
at a time, :func:`block_rows`), so memory stays bounded. A sidecar ``knn.npy.json`` records the
feature file's fingerprint; a table from another feature file is refused. It also certifies
that every row was finite when it was built, for as long as the file stays unchanged
(:func:`certifies_finite`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.files import atomic_write, write_json
from .store import FeatureStore


def meta_path(knn_path) -> Path:
    return Path(str(knn_path) + ".json")


def default_path(store: FeatureStore) -> Path:
    """Where the table of ``store``'s features lives: ``feats.npy`` -> ``feats.knn.npy``."""
    return store.path.with_name(store.path.stem + ".knn.npy")


LEGACY_NAME = "knn.npy"   # one table per folder, before tables were named after their features


def cached_table(store: FeatureStore, min_k: int, say=print):
    """(table, path) of a usable cached table of ``store`` with at least ``min_k`` neighbours:
    its own, or a legacy ``knn.npy`` whose recorded fingerprint is this file's; None otherwise
    (a stale own table is reported through ``say``)."""
    path = default_path(store)
    if path.is_file():
        try:
            return load_knn(path, store, min_k=min_k), path
        except InputError as e:
            say(f"knn: cached table is stale ({e}); rebuilding it")
            return None
    legacy = store.path.with_name(LEGACY_NAME)
    if legacy.is_file() and meta_path(legacy).is_file():
        try:
            fp = json.loads(meta_path(legacy).read_text()).get("fingerprint")
            if fp == store.fingerprint():
                return load_knn(legacy, store, min_k=min_k), legacy
        except (OSError, ValueError, InputError):
            pass   # not this file's (or unreadable): build our own
    return None


def pooled_features(store: FeatureStore, batch_size=256, progress=None, start=0, stop=None):
    """(stop - start, C) float32: per-image mean of the patch features of rows [start, stop),
    L2-normalised (all rows by default)."""
    stop = store.N if stop is None else stop
    pooled = np.empty((stop - start, store.C), dtype=np.float32)
    for s in range(start, stop, batch_size):
        rows = store.read(np.arange(s, min(s + batch_size, stop)))
        m = rows.mean(axis=(1, 2))
        pooled[s - start:s - start + len(m)] = m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
        if progress is not None:
            progress(len(m))
    return pooled


BLOCK_ENTRIES = 1 << 24   # similarities scored at once: 64 MB float32, ~250 MB peak with argpartition


def block_rows(N: int) -> int:
    """Rows of the similarity block scored at once for N images: 1024, halved until a block of
    ``rows x N`` similarities fits ``BLOCK_ENTRIES`` (N = 250k five-crop COCO rows: 64 rows,
    ~0.25 GB peak instead of 5 GB). A power of two, so every block boundary of the in-process
    run is one of a Dask run's 1024-aligned task ranges too."""
    rows = 1024
    while rows > 1 and rows * N > BLOCK_ENTRIES:
        rows //= 2
    return rows


def topk_cosine(pooled, k, chunk=None, start=0, stop=None):
    """(stop - start, k+1) int32 for rows [start, stop) (all by default): self first, then the k
    most similar other rows, most similar first, scored ``chunk`` rows at a time
    (:func:`block_rows` by default). ``start`` must be a multiple of ``chunk`` for results that
    do not depend on how the rows were split."""
    N = pooled.shape[0]
    chunk = block_rows(N) if chunk is None else chunk
    stop = N if stop is None else stop
    k = min(k, N - 1)
    out = np.empty((stop - start, k + 1), dtype=np.int32)
    out[:, 0] = np.arange(start, stop)
    if k == 0:
        return out
    for s in range(start, stop, chunk):
        sims = pooled[s:min(s + chunk, stop)] @ pooled.T             # chunk,N
        rows = np.arange(sims.shape[0])
        sims[rows, s + rows] = -np.inf                              # self is column 0 already
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]         # the k best, unordered
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1, kind="stable")
        out[s - start:s - start + len(rows), 1:] = np.take_along_axis(part, order, axis=1)
    return out


def _pool_task(path, start, stop, batch_size):
    return start, pooled_features(FeatureStore(path), batch_size, start=start, stop=stop)


def _topk_task(pooled, k, chunk, start, stop):
    return start, topk_cosine(pooled, k, chunk, start, stop)


def _knn_on_dask(store: FeatureStore, k, batch_size, scheduler, rows_per_task, progress):
    """Pooling and top-k split into row ranges on Dask; same result as the in-process code."""
    from .distributed import dask_client, run_all

    chunk = block_rows(store.N)
    step = max(1024, -(-rows_per_task // 1024) * 1024)               # whole top-k blocks per task
    ranges = [(s, min(s + step, store.N)) for s in range(0, store.N, step)]
    pooled = np.empty((store.N, store.C), dtype=np.float32)
    table = np.empty((store.N, min(k, store.N - 1) + 1), dtype=np.int32)

    def put(dst):
        def f(res):
            s, rows = res
            dst[s:s + len(rows)] = rows
            if progress is not None and dst is pooled:
                progress(len(rows))
        return f

    with dask_client(scheduler) as client:
        path = str(store.path.resolve())
        run_all(client, _pool_task, [(path, s, e, batch_size) for s, e in ranges], put(pooled), "omh-ref-pool")
        shared = client.scatter(pooled, broadcast=True)
        run_all(client, _topk_task, [(shared, k, chunk, s, e) for s, e in ranges], put(table), "omh-ref-topk")
    return table


def build_knn(store: FeatureStore, out_path, k=7, batch_size=256, progress=None, scheduler=None,
              rows_per_task=8192):
    """Build and atomically write the table and its sidecar; returns the table. ``scheduler``
    (``local:N`` or a Dask address) spreads the work over Dask workers (:mod:`.distributed`)."""
    for flag, v in (("--batch-size", batch_size), ("--rows-per-task", rows_per_task)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise InputError(f"{flag}: expected a positive integer, got {v!r}")
    before, t0 = file_state(store.path), time.time()
    if scheduler is None:
        table = topk_cosine(pooled_features(store, batch_size, progress), k)
    else:
        table = _knn_on_dask(store, k, batch_size, scheduler, rows_per_task, progress)
    out_path = Path(out_path)
    atomic_write(out_path, lambda fh: np.save(fh, table))
    # Pooling read every row through FeatureStore.read, which refuses NaN and inf, so the table
    # can certify the file finite (the training loop then skips that check per batch). The
    # certificate is the file's state as the build began; it holds only while the state is the
    # same (any write changes the change time), and is given only when the file did not change
    # while it was read and its last change lies more than a clock tick before the build began
    # (a write in the same tick could leave the timestamps as they were).
    meta = {"features": str(store.path.resolve()), "fingerprint": store.fingerprint(),
            "k": int(table.shape[1] - 1)}
    if before == file_state(store.path) and before["ctime_ns"] < (t0 - CLOCK_TICK_S) * 1e9:
        meta["finite"] = before
    write_json(meta_path(out_path), meta)
    return table


CLOCK_TICK_S = 0.05   # above the coarsest timestamp granularity of Linux file systems (10 ms at HZ=100)


def file_state(path) -> dict:
    """What changes whenever a file's bytes change: its size, inode and modification and change
    times (the change time cannot be set back by any program). A row written through a memory
    map or a write() changes both times."""
    st = os.stat(path)
    return {"size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def certifies_finite(path, store: FeatureStore) -> bool:
    """True when the table at ``path`` was built from these very features (its sidecar's
    fingerprint), building it found every row finite, and the file has not changed since (its
    :func:`file_state` is the one recorded): a row written after the build voids it."""
    try:
        meta = json.loads(meta_path(path).read_text())
        state = file_state(store.path)
    except (OSError, ValueError):
        return False
    return meta.get("finite") == state and meta.get("fingerprint") == store.fingerprint()


def load_knn(path, store: FeatureStore, min_k=1):
    """Load a table and check it belongs to ``store`` (fingerprint, shape, index range)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a KNN table; build it with omh-ref knn)")
    try:
        table = np.load(path, allow_pickle=False)
    except Exception as e:
        raise InputError(f"{path}: not a readable .npy file ({e})") from None
    if table.ndim != 2 or table.dtype.kind not in "iu" or table.shape[1] < min_k + 1:
        raise InputError(f"{path}: expected an integer table (N, k+1) with k >= {min_k}, "
                         f"got {table.dtype} {table.shape}")
    if table.shape[0] != store.N:
        raise InputError(f"{path}: has {table.shape[0]} rows but {store.path} has {store.N} images "
                         "(a KNN table from another feature file?)")
    mp = meta_path(path)
    if mp.is_file():
        fp = json.loads(mp.read_text()).get("fingerprint")
        if fp is not None and fp != store.fingerprint():
            raise InputError(f"{path}: was built from another feature file than {store.path} "
                             "(fingerprint differs); rebuild it with omh-ref knn")
    if table.min() < 0 or table.max() >= store.N or not np.array_equal(table[:, 0], np.arange(store.N)):
        raise InputError(f"{path}: entries must index images of {store.path} with column 0 the image itself")
    return table.astype(np.int64)
