"""``python -m benchmarks [--quick] [--json OUT]``: the training step against torch autograd,
Sinkhorn against POT, confusion accumulation against a bare bincount, scaling and GPU rows, each
ratio printed beside its goal (:mod:`benchmarks.harness`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omh_ref.core.files import write_text

from . import harness

# tiny shapes and one repeat: the whole harness in seconds, for the test suite
TINY = {"batch_size": 3, "grid": (5, 4), "threads": (1,), "repeats": 1, "warmup": 0, "sinkhorn_repeats": 1,
        "hier": ((7, 5),), "targets": (60, 7), "eval_pixels": 1e5, "eval_repeats": 1, "scaling_repeats": 1,
        "batch_sizes": (2, 3), "levels": ((6,), (6, 4))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write every number as JSON to this file")
    ap.add_argument("--quick", action="store_true", help="fewer repeats: a few minutes on 2 cores")
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # tests
    args = ap.parse_args(argv)
    settings = None
    if args.tiny:
        from omh_ref.core.fixtures import small_config

        settings = {"cfg": small_config(), **TINY}
    res = harness.run_all(quick=args.quick or args.tiny, settings=settings,
                          say=lambda m: print(m, file=sys.stderr, flush=True))
    print(harness.format_report(res))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_text(args.json, json.dumps(res, indent=1))
        print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
