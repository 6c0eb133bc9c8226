#!/usr/bin/env bash
# Every check that needs a GPU, in one run of at most 8 minutes on one GPU, and one summary:
#   1. the test cases parametrised over CuPy (pytest -k cupy: every op, loss, Sinkhorn and the
#      model on CuPy arrays against NumPy, the fused kernels bit for bit),
#   2. the gradient-check suite on CuPy arrays (omh-ref gradcheck --device gpu),
#   3. the benchmark's GPU rows: the step on CuPy against torch CUDA autograd of the same model,
#      and the hierarchy's Sinkhorn against POT on CUDA (said, not failed, where POT is missing),
#   4. 200 training steps on the demo data on the GPU, validated at the end, beside the same run
#      on the CPU (their final losses must agree to float32 rounding).
# Each stage has its own time limit (STAGE_LIMITS below, 470 s in all). On a machine without a
# GPU it says so and exits 0. Run from anywhere: bash benchmarks/gpu_check.sh (PYTHON=... picks
# the interpreter). Nothing is installed and nothing is downloaded: omh-ref is imported from this
# checkout (the package from the root, the command line's folder cli/ through a link named
# omh_ref_cli), so a GPU machine with no network needs only CuPy, torch, onnxruntime, numpy,
# scipy, pillow, click, tqdm, pytest and hypothesis installed (POT optional).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
OUT=${GPU_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SHIM=$(mktemp -d)
trap 'rm -rf "$SHIM"' EXIT
ln -s "$REPO/cli" "$SHIM/omh_ref_cli"
export PYTHONPATH="$REPO:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
declare -A STAGE_LIMITS=([cupy-tests]=200 [gradcheck-gpu]=60 [gpu-benchmarks]=90 [train-200]=120)

# the same test as omh_ref.core.backend.gpu_available, before anything of omh-ref is needed
if ! $PY -c "import sys, cupy; sys.exit(0 if cupy.cuda.is_available() else 3)" 2>/dev/null; then
  echo "gpu_check: no GPU here (CuPy with a CUDA device is not available to $PY): nothing to check"
  exit 0
fi
if ! $PY -c "import omh_ref_cli.main, omh_ref; assert omh_ref.__file__.startswith('$REPO')" 2>"$OUT/import.log"; then
  echo "gpu_check: cannot import omh-ref from $REPO with $PY: $(tail -n 1 "$OUT/import.log")"
  exit 1
fi
$PY -c "
import cupy, numpy, onnxruntime
try:
    import torch; t = f'torch {torch.__version__} (CUDA {torch.cuda.is_available()})'
except ImportError:
    t = 'no torch'
try:
    import ot; p = f'POT {ot.__version__}'
except ImportError:
    p = 'no POT'
d = cupy.cuda.runtime.getDeviceProperties(0)
print(f\"gpu_check on {d['name'].decode()}: CuPy {cupy.__version__} (CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}), \"
      f'numpy {numpy.__version__}, onnxruntime {onnxruntime.__version__}, {t}, {p}')"

declare -a SUMMARY
status=0
run() {   # name, command...: the command under its stage's time limit, its last line in the summary
  local name=$1; shift
  local t0=$SECONDS rc
  timeout "${STAGE_LIMITS[$name]}" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 0 ]; then
    SUMMARY+=("ok    $name ($((SECONDS - t0)) s): $(tail -n 1 "$OUT/$name.log")")
  elif [ $rc -eq 124 ]; then
    SUMMARY+=("FAIL  $name: stopped at its limit of ${STAGE_LIMITS[$name]} s; $(tail -n 1 "$OUT/$name.log")")
    status=1
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
