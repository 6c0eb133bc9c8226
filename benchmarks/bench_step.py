"""One OMH training step at paper scale: omh_ref's hand-written NumPy forward + backward against
torch CPU autograd of the independent torch rendering (omh_ref/core/torch_reference.py), float32.

Same params, batch, random draws; loss and gradients are checked to agree before anything is
timed. Then both are timed (median of --repeats after --warmup, interleaved) at each thread
count, and one step of ours is profiled by part. Goal: numpy ≤ 0.4× torch.
Prints the table and, last, one JSON line with the numbers (also returned by :func:`main`).

    python -m benchmarks.bench_step [--batch 16] [--grid 28] [--threads 1,2] [--repeats 10] [--quick]
"""
from __future__ import annotations

import argparse
import json

from benchmarks import harness as bench


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--grid", type=int, default=28, help="feature grid side h = w (default 28)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 10, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 2, --quick 1)")
    p.add_argument("--quick", action="store_true", help="fewer repeats")
    p.add_argument("--isolate", default="auto", choices=["auto", "threadpool", "subprocess"],
                   help="how thread counts are set (default: threadpoolctl when installed)")
    args = p.parse_args(argv)
    preset = bench.PRESETS["quick" if args.quick else "full"]
    repeats = args.repeats or preset["repeats"]
    warmup = preset["warmup"] if args.warmup is None else args.warmup
    threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
    grid = (args.grid, args.grid)

    step = bench.step_benchmark(None, args.batch, grid, threads, repeats, warmup, isolate=args.isolate)
    prof = bench.step_profile(None, args.batch, grid, threads=max(threads))
    c = step["check"]
    print(f"agreement: loss rel err {c['loss_rel_err']:.1e}, max grad rel err {max(c['grad_rel_err'].values()):.1e}")
    for r in step["runs"]:
        print(f"{r['threads']} thread(s): numpy {1e3 * r['numpy']['median_s']:.1f} ms, "
              f"torch {1e3 * r['torch']['median_s']:.1f} ms, numpy / torch = {r['ratio']:.2f} (goal <= 0.4)")
    print(f"our step by part ({prof['threads']} thread(s), {prof['total_ms']:.0f} ms):")
    for k, ms in sorted(prof["parts_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {k:<16} {ms:8.1f} ms")
    result = {"step": step, "profile": prof, "versions": bench.versions()}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
