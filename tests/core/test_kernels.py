"""The CUDA C of omh-ref's fused CuPy kernels, compiled for the CPU with g++ and run on NumPy
arrays: each computes its NumPy rendering's bits. On a GPU CuPy compiles the same source (the
cupy cases of test_ops and test_optim compare it there); here its arithmetic and its indexing are
checked without one, and, where nvcc is installed, that it compiles as CUDA device code. The emulation gives each thread's body what CuPy gives it: the element index
``i``, non-raw arguments as the element's value (an output as a reference to it), raw arguments
as whole arrays; no FMA contraction (CuPy's kernels are compiled with --fmad=false)."""
import ctypes
import hashlib
import shutil
import subprocess

import numpy as np
import pytest

from omh_ref.core import optim
from omh_ref.core.ops import grid_sample

needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is needed to compile the kernels' C")

_C_TYPES = {"int64": "long long", "bool": "bool"}
_PRELUDE = """#include <cmath>
#include <algorithm>
using std::min; using std::max; using std::floor; using std::fabs; using std::sqrt;
"""


KERNELS = {"adam": optim._ADAM_KERNEL, "grid_sample": grid_sample._FORWARD,
           "grid_sample_weights": grid_sample._WEIGHTS}


def test_every_fused_kernel_of_the_package_is_checked_here():
    """A new elementwise kernel must join KERNELS (and get its NumPy comparison below)."""
    import re
    from pathlib import Path

    root = Path(optim.__file__).resolve().parents[1]
    found = {m for f in root.rglob("*.py") for m in re.findall(r'cupy_kernel\("elementwise", "(\w+)"', f.read_text())}
    assert found == {"omh_" + name for name in KERNELS}, found


def _params(text):
    """'raw T x, int64 H' -> [(raw, type, name)]."""
    out = []
    for p in text.split(","):
        words = p.split()
        out.append((words[0] == "raw", words[-2], words[-1]))
    return out


def emulate(spec, dtype, inputs, outputs, build):
    """Run an ElementwiseKernel ``spec`` = (in_params, out_params, body) on the CPU: ``inputs``
    and ``outputs`` map names to arrays or scalars (outputs: arrays, written in place); the
    elements are the outputs'."""
    ins, outs = _params(spec[0]), _params(spec[1])
    ctype = {"float32": "float", "float64": "double"}[np.dtype(dtype).name]
    shape = next(iter(outputs.values())).shape
    decl, body = _signature(spec, ctype)
    args = []
    for raw, typ, name in ins + outs:
        is_out = any(name == o[2] for o in outs)
        value = outputs[name] if is_out else inputs[name]
        npt = np.dtype(dtype) if typ == "T" else np.dtype({"int64": np.int64, "bool": np.bool_}[typ])
        if raw:
            arr = np.ascontiguousarray(value, dtype=npt)
        elif is_out:
            arr = value
            assert arr.dtype == npt and arr.flags.c_contiguous
        else:
            arr = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=npt), shape))
        args.append(arr)
    src = (_PRELUDE + f"typedef {ctype} T;\n" + f'extern "C" void run(long long _size, {", ".join(decl)}) {{\n'
           + "  for (long long i = 0; i < _size; ++i) {\n    " + "\n    ".join(body) + "\n" + spec[2] + "\n  }\n}\n")
    lib = build(src)
    lib.run(ctypes.c_longlong(int(np.prod(shape))), *[a.ctypes.data_as(ctypes.c_void_p) for a in args])


def _signature(spec, ctype):
    """The body's declarations as CuPy makes them: raw arguments whole, the others the element's
    value (outputs a reference to it)."""
    ins, outs = _params(spec[0]), _params(spec[1])
    decl, body = [], []
    for raw, typ, name in ins + outs:
        c = ctype if typ == "T" else _C_TYPES[typ]
        if raw:
            decl.append(f"const {c}* {name}")
        elif name in [o[2] for o in outs]:
            decl += [f"{c}* _{name}"]
            body.append(f"{c}& {name} = _{name}[i];")
        else:
            decl += [f"const {c}* _{name}"]
            body.append(f"const {c} {name} = _{name}[i];")
    return decl, body


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is needed to compile CUDA device code")
def test_every_kernel_compiles_as_cuda_device_code(tmp_path):
    """Each kernel's body in a __global__ function, float and double, with CuPy's compile option
    (--fmad=false): names, overloads (min, max, floor, fabs, sqrt on device) and types resolve."""
    units = []
    for name, spec in KERNELS.items():
        for ctype in ("float", "double"):
            decl, body = _signature(spec, ctype)
            units.append(f"namespace {name}_{ctype} {{\ntypedef {ctype} T;\n__global__ void k(long long _size, "
                         f"{', '.join(decl)}) {{\n  long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;\n"
                         f"  if (i >= _size) return;\n  " + "\n  ".join(body) + spec[2] + "\n}\n}\n")
    (tmp_path / "kernels.cu").write_text("\n".join(units))
    res = subprocess.run(["nvcc", "--fmad=false", "-c", "-o", str(tmp_path / "kernels.o"), str(tmp_path / "kernels.cu")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kernels")
    libs = {}

    def compile_(src):
        key = hashlib.sha256(src.encode()).hexdigest()[:16]
        if key not in libs:
            so = folder / f"{key}.so"
            (folder / f"{key}.cpp").write_text(src)
            res = subprocess.run(["g++", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC", "-o",
                                  str(so), str(folder / f"{key}.cpp")], capture_output=True, text=True)
            assert res.returncode == 0, res.stderr[-3000:]
            libs[key] = ctypes.CDLL(str(so))
        return libs[key]

    return compile_


def _coords(rng, shape, dtype):
    c = rng.uniform(-1.2, 1.2, size=shape).astype(dtype)
    c.reshape(-1, 2)[:3] = [[-1, -1], [1, 1], [0.5, -1]]             # exact corners and edges
    return c


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chosen", [False, True])
def test_the_grid_sample_kernel_is_the_numpy_sampling(build, dtype, chosen):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 5, 3, 6)).astype(dtype)
    coords = _coords(rng, (3, 2, 7, 2), dtype)
    images = np.array([2, 0, 3]) if chosen else None
    want, _ = grid_sample.forward(x if chosen else x[:3], coords, images=images)
    y = np.empty((3, 14, 6), dtype)
    H, W = 5, 3
    emulate(grid_sample._FORWARD, dtype, {"x": x if chosen else x[:3], "coords": coords,
                                          "images": images if chosen else np.arange(3), "H": H, "W": W, "C": 6,
                                          "P": 14, "sx": dtype((W - 1) / 2), "sy": dtype((H - 1) / 2)},
            {"y": y}, build)
    assert np.array_equal(y.reshape(want.shape), want)


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_interpolation_matrix_kernel_is_the_numpy_matrix(build, dtype):
    rng = np.random.default_rng(4)
    c = _coords(rng, (3, 9, 2), dtype)
    H, W = 4, 6
    want = grid_sample.interpolation_matrix(c, H, W)
    Mi = np.empty((3, 9, H * W), dtype)
    emulate(grid_sample._WEIGHTS, dtype, {"coords": c, "H": H, "W": W, "C": H * W, "P": 9,
                                          "sx": dtype((W - 1) / 2), "sy": dtype((H - 1) / 2)}, {"Mi": Mi}, build)
    assert np.array_equal(Mi, want)


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("ok", [True, False])
def test_the_adam_kernel_is_the_numpy_update(build, dtype, ok):
    rng = np.random.default_rng(5)
    p, g = rng.standard_normal(37).astype(dtype), (rng.standard_normal(37) * 1e-3).astype(dtype)
    m, v = (rng.standard_normal(37) * 1e-3).astype(dtype), (rng.random(37) * 1e-6).astype(dtype)
    b1, b2, step, c2, eps = 0.9, 0.999, 1e-3 / (1 - 0.9 ** 3), 1 - 0.999 ** 3, 1e-8
    want = [a.copy() for a in (p, m, v)]
    optim._adam_update(*want[:1], g, *want[1:], np.asarray(ok), b1, b2, step, c2, eps)
    got = [a.copy() for a in (p, m, v)]
    dt = np.dtype(dtype).type
    emulate(optim._ADAM_KERNEL, dtype, {"g": g, "ok": ok, "b1": dt(b1), "one_b1": dt(1 - b1), "b2": dt(b2),
                                        "one_b2": dt(1 - b2), "step": dt(step), "c2": dt(c2), "eps": dt(eps)},
            dict(zip("pmv", got)), build)
    for name, a, b in zip("pmv", got, want):
        assert np.array_equal(a, b), name
    assert ok or all(np.array_equal(a, b) for a, b in zip(got, (p, m, v)))
