#!/usr/bin/env bash
# Every check that needs a GPU, in one run of a few minutes on one GPU, and one summary:
#   1. the test cases parametrised over CuPy (pytest -k cupy),
#   2. the gradient-check suite on CuPy arrays (omh-ref gradcheck --device gpu),
#   3. the benchmark's GPU rows: the step on CuPy against torch CUDA autograd of the same model,
#      and the hierarchy's Sinkhorn against POT on CUDA (skipped where POT is not installed),
#   4. 200 training steps on the demo data on the GPU, validated at the end, beside the same run
#      on the CPU (their losses must agree to float32 rounding).
# On a machine without a GPU it says so and exits 0. Run from anywhere: bash benchmarks/gpu_check.sh
# (PYTHON=... picks the interpreter; omh-ref is installed from this checkout without its
# dependencies when it is not importable, since a GPU machine may have no package index).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-$(mktemp -d)}
# the same test as omh_ref.core.backend.gpu_available, before anything of omh-ref is needed
if ! $PY -c "import sys, cupy; sys.exit(0 if cupy.cuda.is_available() else 3)" 2>/dev/null; then
  echo "gpu_check: no GPU here (CuPy with a CUDA device is not available to $PY): nothing to check"
  exit 0
fi
if ! $PY -c "import omh_ref, omh_ref_cli" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
fi
if ! $PY -c "import omh_ref_cli" 2>/dev/null; then
  echo "gpu_check: cannot import omh_ref with $PY (pip install -e . failed)"; exit 1
fi
declare -a SUMMARY
status=0
run() {   # name, command...
  local name=$1; shift
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    SUMMARY+=("ok    $name ($((SECONDS - t0)) s): $(tail -n 1 "$OUT/$name.log")")
  else
    SUMMARY+=("FAIL  $name ($((SECONDS - t0)) s): $(tail -n 3 "$OUT/$name.log" | tr '\n' ' ')")
    status=1
  fi
}
run cupy-tests $PY -m pytest -q -p no:cacheprovider tests -k cupy
run gradcheck-gpu $PY -m omh_ref_cli.main gradcheck --device gpu
run gpu-benchmarks $PY -c "
import json
from benchmarks import harness as h
step = h.gpu_benchmark(repeats=10, warmup=2)
sk = h.gpu_sinkhorn_benchmark(repeats=20, warmup=2)
json.dump({'step': step, 'sinkhorn': sk}, open('$OUT/gpu_benchmarks.json', 'w'), indent=1)
line = 'step: ' + (f\"cupy {1e3 * step['cupy']['median_s']:.1f} ms, torch CUDA {1e3 * step['torch_cuda']['median_s']:.1f} ms, cupy/torch {step['ratio']:.2f}\" if step['available'] else step['reason'])
line += '; sinkhorn: ' + (', '.join(f\"{c['n']}x{c['m']} eps {c['eps']}: {c['speedup']:.2f}x POT\" for c in sk['cases']) if sk['available'] else sk['reason'])
print(line)"
run train-200 $PY -c "
from benchmarks import harness as h
rows = h.training_check('$OUT', steps=200)
print('200 steps: ' + ', '.join(f\"{d} {r['seconds']:.0f} s (loss {r['loss']:.4f}, val mIoU {r['val_miou']:.1f})\" for d, r in rows.items()))"
echo "gpu_check summary (logs in $OUT):"
printf '  %s\n' "${SUMMARY[@]}"
exit $status
