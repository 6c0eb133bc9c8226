"""Peak resident memory while training and evaluating on a memory-mapped feature file of several GB.

    python -m benchmarks.bench_memory --gb 12 --steps 100 [--path /tmp/omh_big/feats.npy] [--keep]
    python -m benchmarks.bench_memory --gb 4 --steps 20 --eval [--probe-cache auto|memmap|none]

Writes (once) a float16 feature file of the requested size with paper-scale images (28x28x384,
ViT-S/8 at 224 px), builds its KNN table and trains OMH at paper scale (levels 108/54/27, batch
16), sampling this process's resident set size (VmRSS) every 50 ms. Prints one JSON line:
file size, machine RAM, peak RSS during KNN and during training, step time. The goal (
training on a >= 12 GB file): peak RSS < 1.5 GB, and not growing with the file. With ``--eval``
it also writes a labels file (27 classes, 224 px) and runs ``omh-ref eval``'s job on the same file
as evaluation split and as the linear probe's training split (one probe epoch), recording its
peak RSS: the goal is the same 1.5 GB, whatever N.
"""
import argparse
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap


def rss_mb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    def __init__(self, every=0.05):
        self.every, self.peak, self._stop = every, 0.0, threading.Event()

    def __enter__(self):
        self.peak = rss_mb()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def write_big(path, gb, h=28, C=384, chunk=128, seed=0):
    """A float16 (N, h, h, C) file of about ``gb`` GB, written chunk by chunk (never whole)."""
    per_image = h * h * C * 2
    N = int(gb * 1e9 // per_image)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((32, C)).astype(np.float32)
    out = open_memmap(path, mode="w+", dtype=np.float16, shape=(N, h, h, C))
    for s in range(0, N, chunk):
        n = min(chunk, N - s)
        # a few prototypes per image plus noise: cheap to make, not degenerate for the KNN
        which = rng.integers(0, 32, size=(n, 1, 1))
        block = protos[which.repeat(h, 1).repeat(h, 2)] + rng.standard_normal((n, h, h, C), dtype=np.float32)
        out[s:s + n] = block.astype(np.float16)
        out.flush()
    del out
    return N


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=12.0)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--path", default="/tmp/omh_big/feats.npy")
    ap.add_argument("--keep", action="store_true", help="keep the big file afterwards")
    ap.add_argument("--eval", action="store_true", help="also evaluate, with the linear probe, on the big file")
    ap.add_argument("--probe-cache", default="auto", choices=["auto", "memmap", "none"])
    a = ap.parse_args(argv)

    from omh_ref.core.config import Config
    from omh_ref.features.knn import build_knn, default_path
    from omh_ref.features.store import FeatureStore
    from omh_ref.train.loop import TrainOptions, train

    path = Path(a.path)
    if not path.is_file() or abs(path.stat().st_size / 1e9 - a.gb) > 0.5:
        t = time.perf_counter()
        write_big(path, a.gb)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.1f} GB) in {time.perf_counter() - t:.0f} s", flush=True)
    store = FeatureStore(path)
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    base = rss_mb()
    t = time.perf_counter()
    with PeakRSS() as knn_peak:
        build_knn(store, default_path(store), k=7)
    knn_s = time.perf_counter() - t
    cfg = Config(in_dim=store.C)
    out = path.parent / "run"
    t = time.perf_counter()
    with PeakRSS() as train_peak:
        train(cfg, TrainOptions(features=str(path), out=str(out), steps=a.steps, batch_size=a.batch_size,
                                ckpt_every=a.steps, log_every=10, progress=True), say=print)
    train_s = time.perf_counter() - t
    res = {"file_gb": round(path.stat().st_size / 1e9, 2), "images": store.N, "ram_gb": round(ram_gb, 1),
           "rss_start_mb": round(base), "peak_rss_knn_mb": round(knn_peak.peak),
           "peak_rss_train_mb": round(train_peak.peak), "knn_s": round(knn_s, 1),
           "train_steps": a.steps, "step_s": round(train_s / a.steps, 3), "batch_size": a.batch_size,
           "goal": "peak RSS < 1500 MB"}
    if a.eval:
        res.update(_eval_rss(path, store, out / "ckpt.npz", a.probe_cache))
    print(json.dumps(res))
    if not a.keep:
        shutil.rmtree(path.parent)
    return 0


def _eval_rss(path, store, ckpt, probe_cache):
    """Peak RSS of the eval job (cluster scores, a one-epoch linear probe, its scores) on ``path``."""
    from omh_ref.jobs.evaluate import EvalOptions, run

    labels = path.with_name("labels.npy")
    if not labels.is_file():
        lab = open_memmap(labels, mode="w+", dtype=np.uint8, shape=(store.N, 224, 224))
        rng = np.random.default_rng(1)
        for s in range(0, store.N, 256):
            n = min(256, store.N - s)
            lab[s:s + n] = rng.integers(0, 27, size=(n, 28, 28), dtype=np.uint8).repeat(8, 1).repeat(8, 2)
        lab.flush()
        del lab
    said = []
    t = time.perf_counter()
    with PeakRSS() as peak:
        res = run(EvalOptions(checkpoint=str(ckpt), features=str(path), labels=str(labels),
                              train_features=str(path), train_labels=str(labels), n_classes=27, probe_epochs=1,
                              probe_cache=probe_cache, progress=True), say=said.append)
    return {"peak_rss_eval_mb": round(peak.peak), "eval_s": round(time.perf_counter() - t, 1),
            "probe_cache": probe_cache, "probe_log": said, "eval_cluster_miou": round(res["cluster"]["miou"], 2)}


if __name__ == "__main__":
    raise SystemExit(main())
