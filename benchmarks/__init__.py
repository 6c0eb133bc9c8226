"""omh-ref's benchmarks: every speed claim is a ratio against a peer measured in the same run.

Run from the repository root, with torch and POT installed (``pip install -e '.[test,torch]'``):

    python -m benchmarks [--quick] [--json OUT]     # the whole harness (harness.py), one table
    python -m benchmarks.bench_step                  # one section, with its own flags
    python -m benchmarks.bench_sinkhorn | bench_confusion | bench_extract | bench_memory
    python -m benchmarks.ablate_demo --variant ...   # method ablations on the demo data

The library (``omh_ref``) never imports this package.
"""
