"""Confusion-matrix throughput: omh_ref.evaluate.metrics.ConfusionAccumulator against a bare np.bincount.

Both count the same batches (default: 100 batches of 2·10^6 pixels, uint8 labels with 5% ignore
(255), 27 classes, 27 clusters, uint8 predictions):

* ours:  ``acc.update(pred, label)`` per batch (validation, ignore handling, range checks);
* bare:  ``np.bincount(n_clusters * label.astype(np.intp) + pred, minlength=256 * n_clusters)``
  per batch, summed: the textbook one-liner, with no masking and no checks;
* floor: ``np.bincount`` alone on a joint int64 index computed outside the timer (what any
  bincount-based count must pay at least).

The goal: ours ≥ 0.7× bare. Prints a line per method and, last, one JSON
line with the numbers (also returned by :func:`main`).

    python -m benchmarks.bench_confusion [--pixels 2e8] [--batch 2e6] [--pred-dtype uint8]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np

from omh_ref.evaluate.metrics import ConfusionAccumulator


def make_batches(pixels, batch, n_classes, n_clusters, pred_dtype, ignore, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(math.ceil(pixels / batch)):
        n = min(batch, pixels - i * batch)
        label = rng.integers(0, n_classes, n, dtype=np.uint8)
        label[rng.random(n, dtype=np.float32) < ignore] = 255
        pred = rng.integers(0, n_clusters, n, dtype=np.uint8).astype(pred_dtype)
        out.append((pred, label))
    return out


def run_ours(batches, n_clusters, n_classes):
    t = time.perf_counter()
    acc = ConfusionAccumulator(n_clusters, n_classes)
    for pred, label in batches:
        acc.update(pred, label)
    return time.perf_counter() - t, acc.matrix


def run_bare(batches, n_clusters):
    t = time.perf_counter()
    total = np.zeros(256 * n_clusters, dtype=np.int64)
    for pred, label in batches:
        total += np.bincount(n_clusters * label.astype(np.intp) + pred, minlength=256 * n_clusters)
    return time.perf_counter() - t, total


def run_floor(batches, n_clusters):
    elapsed = 0.0
    for pred, label in batches:
        idx = n_clusters * label.astype(np.intp) + pred   # outside the timer
        t = time.perf_counter()
        np.bincount(idx, minlength=256 * n_clusters)
        elapsed += time.perf_counter() - t
    return elapsed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pixels", type=float, default=2e8, help="total pixels (default 2e8)")
    p.add_argument("--batch", type=float, default=2e6, help="pixels per batch (default 2e6)")
    p.add_argument("--classes", type=int, default=27)
    p.add_argument("--clusters", type=int, default=27)
    p.add_argument("--pred-dtype", default="uint8", choices=["uint8", "int16", "int32", "int64"])
    p.add_argument("--ignore", type=float, default=0.05, help="share of 255 labels (default 0.05)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each; the best is kept")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pixels, batch = int(args.pixels), int(args.batch)
    C, K = args.classes, args.clusters
    if not (1 <= C <= K <= 255):
        p.error("need 1 <= --classes <= --clusters <= 255 (uint8 data)")

    batches = make_batches(pixels, batch, C, K, np.dtype(args.pred_dtype), args.ignore, args.seed)
    run_ours(batches[:2], K, C), run_bare(batches[:2], K)   # warm-up

    t_ours, t_bare, t_floor = [], [], []
    for _ in range(args.repeats):   # interleaved so that drift hits both alike
        t, conf = run_ours(batches, K, C)
        t_ours.append(t)
        t, total = run_bare(batches, K)
        t_bare.append(t)
        t_floor.append(run_floor(batches, K))
    if not np.array_equal(conf, total.reshape(256, K)[:C].T):
        raise SystemExit("ours and bare counts differ")

    rate = {name: pixels / min(ts) for name, ts in
            (("ours", t_ours), ("bare", t_bare), ("floor", t_floor))}
    result = {
        "pixels": pixels, "batch": batch, "batches": len(batches), "classes": C, "clusters": K,
        "label_dtype": "uint8", "pred_dtype": args.pred_dtype, "ignore": args.ignore,
        "ours_pix_per_s": rate["ours"], "bare_pix_per_s": rate["bare"],
        "floor_pix_per_s": rate["floor"], "ratio_ours_over_bare": rate["ours"] / rate["bare"],
        "ratio_ours_over_floor": rate["ours"] / rate["floor"],
        "best_s": {"ours": min(t_ours), "bare": min(t_bare), "floor": min(t_floor)},
        "repeats": args.repeats, "numpy": np.__version__, "machine": platform.machine(),
        "goal_met": rate["ours"] >= 0.7 * rate["bare"],
    }
    for name in ("ours", "bare", "floor"):
        print(f"{name:6s} {rate[name] / 1e6:9.1f} Mpixel/s   best {result['best_s'][name]:.3f} s")
    print(f"ours / bare = {result['ratio_ours_over_bare']:.2f}  (goal >= 0.7)   "
          f"ours / floor = {result['ratio_ours_over_floor']:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
