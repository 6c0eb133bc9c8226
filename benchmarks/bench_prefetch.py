"""Training steps per second with the batch reader's prefetch thread and without it, on a
memory-mapped feature file whose pages are kept out of the page cache (as a file larger than the
memory would be): a helper thread drops the file's cached pages (posix_fadvise DONTNEED) every
20 ms, so every batch is read from the disk.

    python -m benchmarks.bench_prefetch [--gb 2] [--steps 30] [--rounds 2] [--path /tmp/omh_big/feats.npy]

(``TrainOptions.prefetch``: None, the default, prefetches on a GPU only; this benchmark sets it
both ways.) Paper scale: 28x28x384 float16 features, levels 108/54/27, batch 16 (16 images + 16 KNN
partners read a step). Runs alternate (with, without, with, ...) so load elsewhere hits both;
the same seed, so both train the same steps. Prints one JSON line: steps/s of each, their ratio,
and the disk's read rate measured on the side.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path


class Evictor:
    """Drops the file's pages from the page cache every ``every`` seconds."""

    def __init__(self, path, every=0.02):
        self.path, self.every, self._stop = path, every, threading.Event()

    def _run(self):
        fd = os.open(self.path, os.O_RDONLY)
        try:
            while not self._stop.wait(self.every):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def disk_rate(path, mb=256):
    """MB/s of a cold sequential read of the file's first ``mb`` MB."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t, n = time.perf_counter(), 0
        while n < mb << 20:
            chunk = os.read(fd, 8 << 20)
            if not chunk:
                break
            n += len(chunk)
        return n / 2**20 / (time.perf_counter() - t)
    finally:
        os.close(fd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--path", default="/tmp/omh_big/feats.npy")
    a = ap.parse_args(argv)

    from omh_ref.core.config import Config
    from omh_ref.features.knn import build_knn, default_path
    from omh_ref.features.store import FeatureStore
    from omh_ref.train.loop import TrainOptions, train

    from .bench_memory import write_big

    path = Path(a.path)
    if not path.is_file() or path.stat().st_size < a.gb * 1e9 * 0.9:
        write_big(path, a.gb)
    store = FeatureStore(path)
    if not default_path(store).is_file():
        build_knn(store, default_path(store), k=7)
    cfg = Config(in_dim=store.C)
    times = {True: [], False: []}
    for r in range(a.rounds):
        for prefetch in (True, False):
            out = path.parent / f"prefetch_{prefetch}"
            shutil.rmtree(out, ignore_errors=True)
            with Evictor(path):
                t = time.perf_counter()
                train(cfg, TrainOptions(features=str(path), out=str(out), steps=a.steps, batch_size=16,
                                        ckpt_every=10 ** 6, log_every=10, progress=False, prefetch=prefetch),
                      say=lambda *_: None)
                times[prefetch].append(a.steps / (time.perf_counter() - t))
            shutil.rmtree(out, ignore_errors=True)
    res = {"file_gb": round(path.stat().st_size / 1e9, 2), "steps": a.steps, "rounds": a.rounds,
           "steps_per_s_prefetch": round(statistics.median(times[True]), 3),
           "steps_per_s_no_prefetch": round(statistics.median(times[False]), 3),
           "all": {str(k): [round(v, 3) for v in vs] for k, vs in times.items()},
           "disk_mb_per_s": round(disk_rate(path), 1), "loadavg": os.getloadavg()}
    res["ratio"] = round(res["steps_per_s_prefetch"] / res["steps_per_s_no_prefetch"], 3)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
