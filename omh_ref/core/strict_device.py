"""A strict stand-in for CuPy, for tests on machines without a GPU.

omh-ref promises that every forward and backward runs unchanged on CuPy arrays, but a machine
without a CUDA device cannot make a CuPy array. This module makes arrays that are *not*
``np.ndarray`` and fail where CuPy's fail, so that the mistakes a real device would reject show
on the CPU:

* implicit conversion to NumPy raises, as CuPy's does (``np.asarray(x)``, handing ``x`` to scipy,
  Pillow, ``json`` or ``np.savez``, pickling it into a checkpoint);
* a NumPy function or ufunc applied to them runs only where CuPy has the same one (CuPy dispatches
  ``np.f(x)`` to ``cupy.f`` and fails otherwise); the list is :mod:`omh_ref.core.cupy_names`,
  generated from an installed CuPy by ``python -m omh_ref.core.strict_device --write-names``;
* a host array mixed into a device operation (``x + host``, ``np.concatenate([x, host])``)
  raises, as CuPy's "Unsupported type <class 'numpy.ndarray'>" does; host arrays as indices and
  as values assigned into a device array are accepted (CuPy copies them over);
* every conversion to the host (``float``, ``int``, ``bool``, ``.item``, ``.tolist``, ``.get``,
  ``asnumpy``, printing) is counted with its call site (:func:`conversions`): each one is a
  synchronisation on a GPU;
* ``xp.random`` and ``xp.linalg`` offer only the names CuPy's do;
* every operation that would launch a kernel on CuPy is counted by name (:func:`ops`): each ufunc
  call (in place or not), each function, method or index whose result is new memory (a result
  that shares memory with an input is a view: reshape, transpose, a slice launch nothing), each
  assignment into an array; a copy from the host is counted apart (``"host->device"``). A
  function fused with :func:`omh_ref.core.backend.fused` counts as the one kernel CuPy makes of
  it.

The arithmetic is NumPy's, so the numbers are the NumPy run's. :mod:`omh_ref.core.backend` uses
it as the ``gpu`` device only inside :func:`omh_ref.core.backend.strict_device` (tests), never in a
user's run.
"""
from __future__ import annotations

import collections
import contextlib
import pprint
import sys
import traceback
from pathlib import Path

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from . import cupy_names

_CONVERSIONS: list = []
_OPS: collections.Counter = collections.Counter()
_FUSING = [0]          # inside a fused function: its operations are one kernel, counted by fused()
_SKIP = {str(Path(__file__).resolve()), str(Path(__file__).with_name("backend.py").resolve())}   # sites: the callers
_TO_HOST = {"save", "savez", "savez_compressed"}
_FROM_HOST = {"asarray", "array", "asanyarray", "ascontiguousarray"}   # host -> device: a copy, no sync
_UFUNCS = dict(cupy_names.UFUNCS)
_NAMES = {k: set(v) for k, v in cupy_names.NAMESPACES.items()}
_ATTRS = set(cupy_names.NDARRAY)


def conversions() -> list:
    """The device -> host conversions so far, as ``(what, "file:line")`` of the caller."""
    return list(_CONVERSIONS)


def reset_conversions() -> None:
    _CONVERSIONS.clear()


def ops() -> dict:
    """The kernel launches so far, by operation name (ufuncs by name, ``name.method`` for their
    methods; ``getitem``/``setitem`` for gathers and assignments; ``fused:<name>`` for a fused
    function; ``host->device`` for copies from the host, which are transfers, not kernels)."""
    return dict(_OPS)


def reset_ops() -> None:
    _OPS.clear()


def kernels(counts: dict | None = None) -> int:
    """How many kernels ``counts`` (default: :func:`ops`) holds: every operation but the copies
    from the host."""
    counts = ops() if counts is None else counts
    return sum(n for k, n in counts.items() if k != "host->device")


@contextlib.contextmanager
def fused(name: str):
    """The block is one fused kernel: counted once, as ``fused:<name>``, its operations not."""
    if not _FUSING[0]:
        _OPS[f"fused:{name}"] += 1
    _FUSING[0] += 1
    try:
        yield
    finally:
        _FUSING[0] -= 1


_NO_KERNEL = {"empty", "empty_like"}    # an allocation only


def _count(name: str, result=None, inputs=()) -> None:
    """Count ``name`` as a kernel unless we are inside a fused function or ``result`` is a view
    of one of ``inputs`` (shares its memory: no kernel on CuPy either)."""
    if _FUSING[0] or name in _NO_KERNEL:
        return
    if result is not None and _is_view(result, inputs):
        return
    _OPS[name] += 1


def _is_view(result, inputs) -> bool:
    arrays = [a for a in _flat(inputs) if isinstance(a, np.ndarray)]
    outs = [r for r in _flat((result,)) if isinstance(r, np.ndarray)]
    return bool(outs) and all(any(np.may_share_memory(o, a) for a in arrays) for o in outs)


def _flat(xs):
    for x in xs:
        if isinstance(x, StrictArray):
            yield x._a
        elif isinstance(x, (tuple, list)):
            yield from _flat(x)
        else:
            yield x


def _note(what: str) -> None:
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename not in _SKIP:
            _CONVERSIONS.append((what, f"{frame.filename}:{frame.lineno}"))
            return
    _CONVERSIONS.append((what, "?"))


class StrictArray(NDArrayOperatorsMixin):
    """A device array of the stand-in: a NumPy array inside, CuPy's manners outside."""

    __slots__ = ("_a",)
    __array_priority__ = 100.0
    __hash__ = None

    def __init__(self, a: np.ndarray):
        self._a = a

    # -- what CuPy refuses ----------------------------------------------------------------------
    def __array__(self, *a, **k):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
                        "a NumPy array explicitly. (omh-ref's strict device stand-in)")

    def __reduce_ex__(self, protocol):
        raise TypeError("a device array is being pickled (a checkpoint or a worker's message must hold host "
                        "arrays: omh_ref.core.backend.to_host first)")

    __reduce__ = __reduce_ex__

    # -- conversions to the host, counted -------------------------------------------------------
    def get(self, stream=None, order="C", out=None):
        _note("get")
        return self._a.copy()

    def __float__(self):
        _note("float")
        return float(self._a)

    def __int__(self):
        _note("int")
        return int(self._a)

    def __bool__(self):
        _note("bool")
        return bool(self._a)

    def __complex__(self):
        _note("complex")
        return complex(self._a)

    def item(self, *args):
        _note("item")
        return self._a.item(*args)

    def tolist(self):
        _note("tolist")
        return self._a.tolist()

    def tobytes(self, order="C"):
        _note("tobytes")
        return self._a.tobytes(order)

    def __repr__(self):
        _note("repr")
        return f"strict_device.{self._a!r}"

    def __str__(self):
        _note("str")
        return str(self._a)

    def __format__(self, spec):
        _note("format")
        return format(self._a, spec)

    # -- array protocol -------------------------------------------------------------------------
    @property
    def shape(self):
        return self._a.shape

    @property
    def dtype(self):
        return self._a.dtype

    @property
    def ndim(self):
        return self._a.ndim

    @property
    def size(self):
        return self._a.size

    @property
    def nbytes(self):
        return self._a.nbytes

    @property
    def itemsize(self):
        return self._a.itemsize

    @property
    def strides(self):
        return self._a.strides

    @property
    def T(self):
        return StrictArray(self._a.T)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(v) for v in self._a)

    def __copy__(self):
        return StrictArray(self._a.copy())

    def __deepcopy__(self, memo):
        return StrictArray(self._a.copy())

    def __getitem__(self, key):
        key = _index(key)
        out = self._a[key]
        if isinstance(out, np.generic):   # CuPy: one element is a 0-d view of the array, not a copy
            out = self._a[(key if isinstance(key, tuple) else (key,)) + (Ellipsis,)]
        _count("getitem", out, (self._a,))
        return _wrap(out)

    def __setitem__(self, key, value):
        self._a[_index(key)] = value._a if isinstance(value, StrictArray) else value
        _count("setitem")

    def __getattr__(self, name):
        if name.startswith("_") or name not in _ATTRS:
            raise AttributeError(f"'cupy.ndarray' object has no attribute {name!r} (strict device stand-in)")
        attr = getattr(self._a, name)
        if not callable(attr):
            return _wrap(attr)

        def method(*args, **kwargs):
            out = attr(*_device_args(args, name), **_device_kwargs(kwargs, name))
            _count(name, out, (self._a,))
            return _wrap(out)

        return method

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _call_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        sub = func.__module__.split(".")[1:] if func.__module__.startswith("numpy") else None
        where = "" if not sub else sub[0]
        if sub is None or where not in _NAMES or func.__name__ not in _NAMES[where]:
            return NotImplemented     # NumPy then raises "no implementation found for ...", as with CuPy
        if func.__name__ in _TO_HOST:  # cupy.save/savez copy to the host and write: they work, and sync
            _note(func.__name__)
        dargs, dkwargs = _device_args(args, func.__name__), _device_kwargs(kwargs, func.__name__)
        out = func(*dargs, **dkwargs)
        # a result written into ``out=`` is a kernel's output, not a view of an input
        _count(func.__name__, None if "out" in dkwargs else out,
               (dargs, tuple(v for k, v in dkwargs.items() if k != "out")))
        return _wrap(out)


def _check_ufunc(name, method):
    """CuPy has the ufunc (or, for a call, a function of that name: its matmul is not a ufunc)
    and the method."""
    known = name in _UFUNCS or (method == "__call__" and name in _NAMES[""])
    if not known or (method != "__call__" and method not in _UFUNCS.get(name, ())):
        raise TypeError(f"cupy has no ufunc {name}.{method} (strict device stand-in)")


def _wrap(x):
    """NumPy results as device results: arrays and NumPy scalars (CuPy's reductions give 0-d
    arrays) become StrictArrays; tuples and lists are wrapped element by element."""
    if isinstance(x, np.ndarray):
        return StrictArray(x)
    if isinstance(x, np.generic) and not isinstance(x, (np.str_, np.bytes_)):
        return StrictArray(np.asarray(x))
    if isinstance(x, (tuple, list)):
        return type(x)(_wrap(v) for v in x)
    return x


def _device_arg(x, what):
    """The NumPy array inside a device argument; a host array raises (CuPy's "Unsupported type");
    scalars, dtypes, None and the like pass."""
    if isinstance(x, StrictArray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} in {what} on device arrays: a host array mixed into a device "
                        "operation (move it with omh_ref.core.backend.to_device; strict device stand-in)")
    if isinstance(x, (tuple, list)):
        return type(x)(_device_arg(v, what) for v in x)
    return x


def _device_args(args, what):
    return tuple(_device_arg(a, what) for a in args)


def _device_kwargs(kwargs, what):
    return {k: _device_arg(v, what) for k, v in kwargs.items()}


def _index(key):
    """An index: device arrays unwrapped, host arrays accepted (CuPy copies them to the device)."""
    if isinstance(key, StrictArray):
        return key._a
    if isinstance(key, tuple):
        return tuple(k._a if isinstance(k, StrictArray) else k for k in key)
    return key


class _Namespace:
    """``cupy`` (or one of its submodules) with NumPy's arithmetic: only the names CuPy has."""

    def __init__(self, where: str, numpy_module):
        self._where, self._np = where, numpy_module

    def __repr__(self):
        return f"<strict device stand-in for cupy{'.' + self._where if self._where else ''}>"

    def __getattr__(self, name):
        if name.startswith("_") or name not in _NAMES.get(self._where, ()):
            raise AttributeError(f"module 'cupy{'.' + self._where if self._where else ''}' has no attribute {name!r} "
                                 "(strict device stand-in)")
        special = _SPECIAL.get((self._where, name))
        if special is not None:
            return special
        if self._where == "" and name in _SUBMODULES:
            return _SUBMODULES[name]
        obj = getattr(self._np, name)
        if isinstance(obj, np.ufunc):
            return _Ufunc(obj)
        if isinstance(obj, type) or not callable(obj):
            return obj           # dtypes, finfo, constants (pi, inf, newaxis)
        return _function(obj, name)


def _function(fn, name):
    host_ok = name in _FROM_HOST

    def call(*args, **kwargs):
        if host_ok:   # host -> device: a copy, no synchronisation
            host = args and not isinstance(args[0], StrictArray)
            args = tuple(a._a if isinstance(a, StrictArray) else a for a in args)
            out = np.asarray(fn(*args, **kwargs))
            if host:       # a copy: the device array never shares the host array's memory
                out = out.copy() if any(np.may_share_memory(out, a) for a in args if isinstance(a, np.ndarray)) else out
                _count("host->device")
            else:          # on the device: a copy or a dtype conversion, or nothing
                _count(name, out, args)
            return StrictArray(out)
        dargs, dkwargs = _device_args(args, name), _device_kwargs(kwargs, name)
        out = fn(*dargs, **dkwargs)
        _count(name, None if "out" in dkwargs else out, (dargs, tuple(v for k, v in dkwargs.items() if k != "out")))
        return _wrap(out)

    call.__name__ = name
    return call


class _Ufunc:
    """A CuPy ufunc: host arrays refused, results on the device, only CuPy's methods."""

    def __init__(self, uf: np.ufunc):
        self._uf = uf

    def __call__(self, *args, **kwargs):
        return _call_ufunc(self._uf, "__call__", args, kwargs)

    def __getattr__(self, method):
        if method in ("reduce", "accumulate", "reduceat", "outer", "at"):
            return lambda *a, **k: _call_ufunc(self._uf, method, a, k)
        return getattr(self._uf, method)


def _call_ufunc(uf, method, args, kwargs):
    """``uf.method(*args, **kwargs)`` on device arrays (an ``out=`` too), host arrays refused."""
    name = uf.__name__
    _check_ufunc(name, method)
    for a in args:     # CuPy's kernels take arrays and scalars only ("Unsupported type <class 'list'>")
        if isinstance(a, (list, tuple)):
            raise TypeError(f"Unsupported type {type(a)} in {name} on device arrays: a list or tuple operand "
                            "(make it an array with xp.asarray; strict device stand-in)")
    out = kwargs.pop("out", None)
    kwargs = _device_kwargs(kwargs, name)
    if out is not None:
        kwargs["out"] = _device_arg(out, name)
    res = getattr(uf, method)(*_device_args(args, name), **kwargs)
    _count(name if method == "__call__" else f"{name}.{method}")
    return None if method == "at" else _wrap(res)


def asnumpy(x, stream=None, order="C", out=None):
    """CuPy's device -> host copy (counted); host arrays pass through."""
    if isinstance(x, StrictArray):
        _note("asnumpy")
        return x._a.copy()
    return np.asarray(x)


def get_array_module(*args):
    return xp if any(isinstance(a, StrictArray) for a in args) else np


_SUBMODULES = {"linalg": _Namespace("linalg", np.linalg), "fft": _Namespace("fft", np.fft),
               "random": _Namespace("random", np.random)}
_SPECIAL = {("", "ndarray"): StrictArray, ("", "asnumpy"): asnumpy, ("", "get_array_module"): get_array_module}

xp = _Namespace("", np)
"""The stand-in's ``cupy``."""


def write_names(path: Path) -> None:
    """Write :mod:`omh_ref.core.cupy_names` from the CuPy installed here (it imports without a
    GPU): its public names, its ufuncs and their methods, its ndarray's attributes."""
    import cupy

    def public(mod):
        return sorted(n for n in dir(mod) if not n.startswith("_"))

    ufuncs = {n: [m for m in ("reduce", "accumulate", "reduceat", "outer", "at") if hasattr(getattr(cupy, n), m)]
              for n in public(cupy) if isinstance(getattr(cupy, n), cupy.ufunc)}
    spaces = {"": public(cupy), "linalg": public(cupy.linalg), "fft": public(cupy.fft), "random": public(cupy.random)}
    lines = [f'"""The public names of CuPy {cupy.__version__} that :mod:`omh_ref.core.strict_device` allows.',
             "",
             "Generated by ``python -m omh_ref.core.strict_device --write-names`` with CuPy installed (it imports",
             'without a GPU); do not edit by hand."""', "",
             f"CUPY_VERSION = {cupy.__version__!r}", "",
             "NAMESPACES = {"]
    for k, v in spaces.items():
        lines.append(f"    {k!r}: " + pprint.pformat(v, width=96, compact=True).replace("\n", "\n    ") + ",")
    lines += ["}", "", "UFUNCS = {"]
    for k, v in ufuncs.items():
        lines.append(f"    {k!r}: {v!r},")
    lines += ["}", "", "NDARRAY = " + pprint.pformat(public(cupy.ndarray), width=100, compact=True), ""]
    Path(path).write_text("\n".join(lines))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-names"]:
        sys.exit("usage: python -m omh_ref.core.strict_device --write-names   (needs cupy installed)")
    write_names(Path(__file__).with_name("cupy_names.py"))
