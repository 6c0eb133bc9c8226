"""omh_ref.core.ops.sinkhorn against POT's log-domain Sinkhorn on torch tensors with autograd, float32.

Problems as the model meets them: the hierarchy's 108x54 and 54x27 plans (ε 0.2 and 0.05,
50 iterations, forward + backward into the cost and both marginals) and the balanced cluster
targets (12544 pixels x 108 clusters, ε 0.05, 20 iterations, forward only; POT with numpy arrays
timed beside it for information). POT runs ``ot.sinkhorn(b, a, Mᵀ, reg, method="sinkhorn_log",
numItermax=n, stopThr=0)`` (the transposed problem, so both run the same iteration sequence);
plans and gradients are checked to agree before timing. Goal: ours ≥ 2×
faster. Prints one line per case and, last, one JSON line (also returned by :func:`main`).

    python -m benchmarks.bench_sinkhorn [--threads 1,2] [--repeats 20] [--quick]
"""
from __future__ import annotations

import argparse
import json

from benchmarks import harness as bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 20, --quick 5)")
    p.add_argument("--pixels", type=int, default=12544, help="rows of the target problem (default 16*28*28)")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    args = p.parse_args(argv)
    preset = bench.PRESETS["quick" if args.quick else "full"]
    threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
    res = bench.sinkhorn_benchmark(targets=(args.pixels, 108), threads=threads,
                                   repeats=args.repeats or preset["sinkhorn_repeats"], warmup=preset["warmup"])
    for c in res["cases"]:
        print(f"{c['problem']:<9} {c['n']}x{c['m']} eps {c['eps']} {c['n_iters']} it, {c['threads']} thread(s): "
              f"ours {1e3 * c['ours']['median_s']:.2f} ms, POT/torch {1e3 * c['pot_torch']['median_s']:.2f} ms, "
              f"speedup {c['speedup']:.2f} (goal >= 2)")
    res["versions"] = bench.versions()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
