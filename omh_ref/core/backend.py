"""Array namespace (NumPy or CuPy), device moves and seeded generators.

This is the only module that imports CuPy. Every op picks its namespace per call from its input
arrays with :func:`get_array_module`, so the same code runs on host and device arrays. The device
is chosen only at the edges (``--device cpu|gpu``) with :func:`resolve_device` and :func:`to_device`.

Randomness: every draw goes through an explicit ``numpy.random.Generator`` (see :func:`make_rng`).
Draws are made on the host and moved to the arrays' device, so a seed gives the same numbers on
CPU and GPU.
"""
from __future__ import annotations

import contextlib

import numpy as np

_CUPY = None
_CUPY_CHECKED = False


_STRICT = [0]


@contextlib.contextmanager
def strict_device():
    """Tests only: inside this block the ``gpu`` device is the strict CuPy stand-in
    (:mod:`omh_ref.core.strict_device`): arrays that are not NumPy's and fail where CuPy's fail,
    with NumPy's arithmetic. No command line option reaches it."""
    _STRICT[0] += 1
    try:
        yield _strict_xp()
    finally:
        _STRICT[0] -= 1


def strict_device_active() -> bool:
    """Whether the ``gpu`` device is the strict stand-in now (inside :func:`strict_device`)."""
    return _STRICT[0] > 0


def _strict_xp():
    from . import strict_device as sd

    return sd.xp


def _cupy():
    """Return the cupy module when it imports *and* a CUDA device is usable, else None (the
    strict stand-in inside :func:`strict_device`).

    CuPy imports fine on machines without a GPU and only fails at the first array op, so import
    success alone is not enough (``cupy.cuda.is_available()`` decides).
    """
    global _CUPY, _CUPY_CHECKED
    if _STRICT[0]:
        return _strict_xp()
    if not _CUPY_CHECKED:
        _CUPY_CHECKED = True
        try:
            import cupy

            if cupy.cuda.is_available():
                _CUPY = cupy
        except Exception:  # ImportError, or a broken CUDA install raising at query time
            _CUPY = None
    return _CUPY


def gpu_available() -> bool:
    """True when CuPy imports and sees a CUDA device."""
    return _cupy() is not None


def _is_cupy_array(x) -> bool:
    # Decided by the type's module so that no cupy import is needed to recognise numpy arrays;
    # the strict stand-in's arrays are device arrays too.
    module = type(x).__module__
    return module.split(".")[0] == "cupy" or module == "omh_ref.core.strict_device"


def get_array_module(*arrays):
    """Return numpy or cupy for the given arrays (non-arrays such as floats and None are ignored).

    Mixed numpy/cupy inputs raise a ValueError: silently copying between devices hides bugs and
    costs transfers on every call.
    """
    kinds = {_is_cupy_array(a) for a in arrays if hasattr(a, "shape") and hasattr(a, "dtype")}
    if kinds == {True, False}:
        raise ValueError(
            "mixed numpy and cupy arrays in one call; move all inputs to one device first "
            "(omh_ref.core.backend.to_device)"
        )
    if True in kinds:
        return _cupy() or _import_cupy_or_fail(arrays)
    return np


def _import_cupy_or_fail(arrays):
    if any(type(a).__module__ == "omh_ref.core.strict_device" for a in arrays):
        return _strict_xp()
    import cupy  # a cupy array exists, so cupy imports

    return cupy


def resolve_device(device: str) -> str:
    """Validate a ``--device`` value; 'gpu' without a usable CuPy is a clear error."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"--device: expected 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and not gpu_available():
        raise ValueError(
            "--device gpu: CuPy with a CUDA device is not available (install omh-ref[gpu] "
            "on a machine with an NVIDIA GPU)"
        )
    return device


def xp_for(device: str):
    """The array namespace for a device name."""
    return _cupy() if resolve_device(device) == "gpu" else np


def to_device(x, device: str):
    """Move an array (or a dict of arrays, recursively) to 'cpu' or 'gpu'."""
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if device == "gpu":
        return xp_for("gpu").asarray(x)
    return to_host(x)


_SYNCS = [0]


def host_syncs() -> int:
    """How many device-to-host conversions :func:`to_host` has made in this process. Every such
    conversion on the training path goes through it (a GPU waits for its queue at each one), so
    counting them here counts the step's synchronisations, on NumPy arrays too."""
    return _SYNCS[0]


def to_host(x):
    """Return a numpy array (a no-op for numpy input); dicts are moved recursively. The one
    device-to-host conversion: each array moved counts one synchronisation (:func:`host_syncs`)."""
    if isinstance(x, dict):
        return {k: to_host(v) for k, v in x.items()}
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        _SYNCS[0] += 1
    if _is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def host_floats(values: dict) -> dict:
    """Python floats of a dict of scalars (0-d device arrays or numbers) in one transfer: the
    device ones are stacked on the device and moved together, one synchronisation."""
    dev = {k: v for k, v in values.items() if hasattr(v, "shape")}
    out = {k: float(v) for k, v in values.items() if k not in dev}
    if dev:
        xp = get_array_module(*dev.values())
        host = to_host(xp.stack([xp.asarray(v, dtype=xp.float64).reshape(()) for v in dev.values()]))
        out.update(zip(dev, (float(v) for v in host)))
    return {k: out[k] for k in values}


# ---- fused kernels ---------------------------------------------------------------------------
# On a GPU at omh-ref's sizes a step's time is mostly kernel launches, one per array operation.
# A hot elementwise or reducing expression can be written once more as a CuPy kernel (CUDA C),
# run only on a real CuPy device; NumPy (and the strict stand-in) run the NumPy expression,
# inside ``fusing(name)`` so that the stand-in counts it as the one kernel CuPy launches. The
# kernels are compiled without FMA contraction (``--fmad=false``) and CUDA's division and square
# root are correctly rounded, so each one computes what the NumPy expression computes, operation
# for operation.
_KERNELS: dict = {}


def is_cupy(xp) -> bool:
    """Whether ``xp`` is the real CuPy (not NumPy, not the tests' stand-in)."""
    return xp is not np and getattr(xp, "__name__", "") == "cupy"


def cupy_kernel(kind: str, name: str, *spec, **kwargs):
    """A compiled ``cupy.ElementwiseKernel`` (``kind`` 'elementwise') or ``cupy.ReductionKernel``
    ('reduction') of ``spec``, made once per process and name. Only on a real CuPy device."""
    if name not in _KERNELS:
        cp = _cupy() or _import_cupy_or_fail(())
        cls = {"elementwise": cp.ElementwiseKernel, "reduction": cp.ReductionKernel}[kind]
        _KERNELS[name] = cls(*spec, name=name, options=("--fmad=false",), **kwargs)
    return _KERNELS[name]


@contextlib.contextmanager
def fusing(name: str):
    """The NumPy rendering of the fused kernel ``name``: on the strict stand-in its operations
    count as one kernel launch; elsewhere the block just runs."""
    if _STRICT[0]:
        from . import strict_device as sd

        with sd.fused(name):
            yield
    else:
        yield


def make_rng(seed) -> np.random.Generator:
    """A seeded PCG64 generator; the only source of randomness in omh-ref."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def random_normal(rng: np.random.Generator, shape, like):
    """Standard normal draws from ``rng`` with the dtype and device of ``like``."""
    xp = get_array_module(like)
    return xp.asarray(rng.standard_normal(shape).astype(like.dtype, copy=False))


def random_uniform(rng: np.random.Generator, shape, like, low=0.0, high=1.0):
    """Uniform draws in [low, high) from ``rng`` with the dtype and device of ``like``."""
    xp = get_array_module(like)
    return xp.asarray(rng.uniform(low, high, size=shape).astype(like.dtype, copy=False))


def logsumexp(x, axis):
    """Max-shifted log-sum-exp along ``axis`` (keepdims=False); finite for any finite input."""
    xp = get_array_module(x)
    m = xp.max(x, axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)  # all -inf slices stay -inf without NaN
    with np.errstate(divide="ignore"):  # log(0) = -inf for an all -inf slice is the answer
        out = xp.log(xp.sum(xp.exp(x - m), axis=axis, keepdims=True)) + m
    return xp.squeeze(out, axis=axis)


def blas_thread_count() -> int | None:
    """The number of threads NumPy's BLAS runs with in this process (threadpoolctl, which the
    ``[dist]`` and ``[test]`` extras install), or None when it cannot be told."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"]
    return max(counts) if counts else None


def blas_threads_limited(n: int | None):
    """A context in which NumPy's BLAS runs ``n`` threads (a no-op for None, or without
    threadpoolctl)."""
    import contextlib

    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=int(n), user_api="blas")
