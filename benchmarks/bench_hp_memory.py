"""Peak memory of the HP base's SupCon loss (forward and backward of both terms) on a 28 x 28 grid.

    python -m benchmarks.bench_hp_memory [--batches 2,4,8] [--dim 512] [--grid 28]

HP forms its (n x N) blocks one anchor image at a time and autograd keeps several per image
(docs/hp_reading.md §11: about 20 GB at its batch 64, 28 x 28). omh-ref's
:mod:`omh_ref.core.losses.supcon` keeps O(N) between forward and backward and recomputes the
blocks, so its peak should be a few n x N blocks whatever B is, growing with N = B·n only through
the block's width. This measures it with ``tracemalloc`` (NumPy reports its buffers to it), for the
loss alone on inputs allocated before the measurement starts, at B in ``--batches``, and prints one
JSON line per B: the peak in MB, the (n x N) block's entries, the peak per block entry in bytes, and
the peak at HP's batch 64 extrapolated from the largest B measured. The peak counts the blocks
(at most 13 bytes an entry in float32: tests/core/test_hp_ops.py) and the gradients the backward
returns (2·N·D floats); at a fixed grid both grow linearly in N = B·n, so the peak per block entry
is the same at every B and the extrapolation is linear. Float32 throughout, as training.
"""
import argparse
import json
import time
import tracemalloc

import numpy as np

from omh_ref.core.losses import supcon


def _unit(rng, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def measure(B, n, D, C=384, P=2048, seed=0):
    rng = np.random.default_rng(seed)
    N = B * n
    z, m = _unit(rng, (N, D)), _unit(rng, (N, D))
    fa, fs = _unit(rng, (N, C)), _unit(rng, (N, D))
    Ra, Rs = supcon.thresholds(fa, _unit(rng, (P, C))), supcon.thresholds(fs, _unit(rng, (P, D)))
    U = rng.random((n, N)) < 0.02
    tracemalloc.start()
    t = time.perf_counter()
    losses, cache = supcon.forward([z, m], fa, Ra, fs, Rs, 0.3, U, n, 0.8)
    supcon.backward([np.float32(0.5), np.float32(0.5)], cache)
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"B": B, "n": n, "N": N, "D": D, "peak_mb": round(peak / 2**20, 1), "block_entries": n * N,
            "bytes_per_block_entry": round(peak / (n * N), 2), "seconds": round(seconds, 2),
            "finite": bool(all(np.isfinite(float(v)) for v in losses))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="2,4,8")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--grid", type=int, default=28)
    a = ap.parse_args(argv)
    n = a.grid * a.grid
    rows = [measure(int(b), n, a.dim) for b in a.batches.split(",")]
    for r in rows:
        print(json.dumps(r))
    last = rows[-1]
    at64 = last["bytes_per_block_entry"] * n * 64 * n
    print(json.dumps({"B": 64, "n": n, "N": 64 * n, "peak_gb_extrapolated": round(at64 / 2**30, 2),
                      "from": f"bytes per block entry at B = {last['B']}",
                      "one_full_NxN_float32_gb": round((64 * n) ** 2 * 4 / 2**30, 1)}))


if __name__ == "__main__":
    main()
