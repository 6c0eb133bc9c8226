"""A torch checkpoint read without running what its pickle names: ``omh-ref import``'s reader of
the peers' Lightning checkpoints (docs/DECISIONS.md, "Importing the peers' checkpoints").

A ``.ckpt`` / ``.pth`` written by ``torch.save`` (torch >= 1.6) is a zip: ``<name>/data.pkl``,
the pickled object, and ``<name>/data/<key>``, the raw bytes of each tensor storage. A pickle may
name any importable callable and have it called while it loads, so this reader never resolves a
name through Python's import: :class:`RestrictedUnpickler` hands out only the entries of
:data:`ALLOWED`, each a small function or class of its own that builds plain data, and refuses
every other name in one line (:class:`Refused`). What it gives:

* torch's tensor rebuilders (``torch._utils._rebuild_tensor_v2``, ``_v3``, ``_rebuild_parameter``,
  the storage types and dtypes) -> **NumPy arrays**, read from the zip's storage files with
  their offsets and strides checked against the storage's length (bfloat16 widened to float32);
* ``collections.OrderedDict`` (state dicts) and ``defaultdict`` (a plain dict), the harmless
  builtin types, ``typing``'s names, NumPy scalars and dtypes, protocol 2's ``_codecs.encode`` of
  bytes;
* **OmegaConf's config classes** (the hyper-parameters a Lightning module saves with
  ``save_hyperparameters()`` when it is given hydra's ``DictConfig``): ``DictConfig``,
  ``ListConfig``, their metadata and value nodes, each as a :class:`Recorded` object that keeps
  the state it is given and runs nothing; :func:`plain` turns them into dicts and lists
  (``_content``: the container's entries, ``_val``: a node's value; the state omegaconf's
  ``BaseContainer.__getstate__`` and ``Node.__getstate__`` pickle, omry/omegaconf
  ``omegaconf/basecontainer.py`` @ 0019bca, ``omegaconf/base.py`` @ 0019bca, ``omegaconf/nodes.py``
  @ 01445ab). omegaconf itself is not needed;
* Lightning's bookkeeping: ``AttributeDict`` (a dict) and, as inert names that cannot be called,
  the callback classes Lightning 1.x used as the keys of a checkpoint's ``callbacks``.

Nothing here imports torch. A legacy (pre-1.6, not zip) torch file is refused in one line.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np


class Refused(Exception):
    """The pickle names a global this reader does not hand out (``.name``: ``module.qualname``)."""

    def __init__(self, name):
        super().__init__(name)
        self.name = name


class Unreadable(Exception):
    """Not a torch zip checkpoint, or one whose pickle or storages do not fit together."""


# --------------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------------
class Name:
    """A global known by name only (``typing.Any``, a Lightning callback class used as a dict
    key): a value, never called."""

    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise Refused(self.name + " (called)")

    def __repr__(self):
        return self.name

    def __hash__(self):
        return hash(("Name", self.name))

    def __eq__(self, other):
        return isinstance(other, Name) and other.name == self.name


class Recorded:
    """An object of an allowed class (OmegaConf's), never run: the pickle's constructor arguments
    and ``BUILD`` state are kept as they came (``args``, ``state``)."""

    kind = "object"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def field(self, key, default=None):
        """``key`` of the pickled state (a dict, or the dict of a (dict, slots) pair)."""
        st = self.state
        if isinstance(st, tuple) and st and isinstance(st[0], dict):
            st = st[0]
        return st.get(key, default) if isinstance(st, dict) else default


def _recorded(kind, qualname):
    return type(qualname, (Recorded,), {"kind": kind})


class AttributeDict(dict):
    """Lightning's ``AttributeDict`` (the hyper-parameters' dict): a dict, nothing else."""

    def __setstate__(self, state):   # a dict subclass may carry an (empty) instance __dict__
        pass


class Storage:
    """One tensor storage of the zip: its elements as a 1-d array (``bf16``: bfloat16 bits in
    uint16, widened when a tensor is built)."""

    def __init__(self, array, bf16=False, order="<"):
        self.array, self.bf16, self.order = array, bf16, order


class StorageType:
    """A torch storage class as the pickle names it (``torch.FloatStorage``): its element type."""

    def __init__(self, name, dtype, bf16=False):
        self.name, self.dtype, self.bf16 = name, np.dtype(dtype), bf16

    def __call__(self, *args, **kwargs):
        raise Refused(f"torch.{self.name} (called)")


class TorchDtype:
    """``torch.float32`` and the like, as :func:`_rebuild_tensor_v3` receives them."""

    def __init__(self, name, dtype, bf16=False):
        self.name, self.dtype, self.bf16 = name, np.dtype(dtype), bf16

    def __call__(self, *args, **kwargs):
        raise Refused(f"torch.{self.name} (called)")


_STORAGES = {  # torch storage class -> (NumPy element type, bfloat16)
    "FloatStorage": ("<f4", False), "DoubleStorage": ("<f8", False), "HalfStorage": ("<f2", False),
    "BFloat16Storage": ("<u2", True), "LongStorage": ("<i8", False), "IntStorage": ("<i4", False),
    "ShortStorage": ("<i2", False), "CharStorage": ("i1", False), "ByteStorage": ("u1", False),
    "BoolStorage": ("?", False), "UntypedStorage": ("u1", False),
}
_DTYPES = {  # torch dtype -> (NumPy element type, bfloat16)
    "float32": ("<f4", False), "float64": ("<f8", False), "float16": ("<f2", False), "bfloat16": ("<u2", True),
    "int64": ("<i8", False), "int32": ("<i4", False), "int16": ("<i2", False), "int8": ("i1", False),
    "uint8": ("u1", False), "bool": ("?", False),
}


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
def _ints(values, what):
    out = tuple(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in out):
        raise Unreadable(f"a tensor's {what} {out!r} is not a tuple of integers >= 0")
    return out


def _strided(base: np.ndarray, offset, size, stride) -> np.ndarray:
    """The tensor ``size`` / ``stride`` (in elements) at ``offset`` of the 1-d ``base``, copied;
    refused where it would reach past the storage."""
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    (offset,) = _ints([offset], "offset")
    if len(size) != len(stride):
        raise Unreadable(f"a tensor of size {size} has strides {stride}")
    if any(n == 0 for n in size):
        return np.zeros(size, base.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= base.size:
        raise Unreadable(f"a tensor of size {size} at offset {offset} reaches element {last} of a storage of "
                         f"{base.size}")
    view = np.lib.stride_tricks.as_strided(base[offset:], shape=size,
                                           strides=[s * base.itemsize for s in stride], writeable=False)
    return np.array(view)


def _native(a: np.ndarray, bf16: bool) -> np.ndarray:
    """In the machine's byte order; bfloat16 bits widened to float32 (exact)."""
    a = a.astype(a.dtype.newbyteorder("="), copy=False)
    if bf16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, Storage):
        raise Unreadable("a tensor without a storage")
    return _native(_strided(storage.array, storage_offset, size, stride), storage.bf16)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(storage, Storage) or not isinstance(dtype, TorchDtype):
        raise Unreadable("a tensor without a storage or a dtype")
    raw = storage.array.view(np.uint8)
    if raw.size % dtype.dtype.itemsize:
        raise Unreadable(f"a storage of {raw.size} bytes read as {dtype.name}")
    base = raw.view(dtype.dtype.newbyteorder(storage.order) if dtype.dtype.itemsize > 1 else dtype.dtype)
    return _native(_strided(base, storage_offset, size, stride), dtype.bf16)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _defaultdict(default_factory=None, *args):
    return {}


def _codecs_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode (other than str -> latin1 bytes)")
    return text.encode("latin1")


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise Refused("numpy scalar of an object dtype")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _torch_size(values=()):
    return tuple(values)


def _allowed() -> dict:
    """(module, name) -> what the pickle gets instead."""
    out = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): _defaultdict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch", "Size"): _torch_size,
        ("torch", "device"): str,
        ("_codecs", "encode"): _codecs_encode,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    }
    for t in (dict, list, tuple, set, frozenset, int, float, complex, str, bytes, bytearray, bool):
        out[("builtins", t.__name__)] = t
    out[("builtins", "NoneType")] = Name("builtins.NoneType")
    for n in ("Any", "Dict", "List", "Tuple", "Optional", "Union", "Type"):
        out[("typing", n)] = Name(f"typing.{n}")
    for n, (dt, bf16) in _STORAGES.items():
        out[("torch", n)] = StorageType(n, dt, bf16)
        out[("torch.storage", n)] = out[("torch", n)]
    for n, (dt, bf16) in _DTYPES.items():
        out[("torch", n)] = TorchDtype(n, dt, bf16)
    omegaconf = {"omegaconf.dictconfig": [("DictConfig", "dictconfig")],
                 "omegaconf.listconfig": [("ListConfig", "listconfig")],
                 "omegaconf.base": [("Metadata", "metadata"), ("ContainerMetadata", "metadata")],
                 "omegaconf.nodes": [(n, "node") for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode",
                                                            "BooleanNode", "BytesNode", "ValueNode")]}
    for module, classes in omegaconf.items():
        for name, kind in classes:
            out[(module, name)] = _recorded(kind, name)
    for module in ("pytorch_lightning.utilities.parsing", "lightning_fabric.utilities.data",
                   "lightning.fabric.utilities.data", "pytorch_lightning.utilities.data"):
        out[(module, "AttributeDict")] = AttributeDict
    return out


ALLOWED = _allowed()
# Lightning 1.x (before 1.5) keyed a checkpoint's "callbacks" by the callback's class: those names
# are let through as inert Names (never called, never imported).
CALLBACK_MODULES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")
# torch.save pickles with protocol 2, which names the builtins by their Python 2 module (what
# pickle's own find_class maps back with fix_imports).
PY2_MODULES = {"__builtin__": "builtins"}


class RestrictedUnpickler(pickle.Unpickler):
    """Python's unpickler with every global looked up in :data:`ALLOWED` (and the callbacks'
    names), never imported; storages read from the zip by key."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder, self.storages = archive, prefix, byteorder, {}

    def find_class(self, module, name):
        module = PY2_MODULES.get(module, module)
        found = ALLOWED.get((module, name))
        if found is not None:
            return found
        if module.startswith(CALLBACK_MODULES) and name.isidentifier():
            return Name(f"{module}.{name}")
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise Unreadable(f"an unknown persistent id {str(pid)[:60]!r}")
        kind, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(kind, StorageType):
            raise Unreadable(f"storage {key} of an unknown type {kind!r}")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise Unreadable(f"storage {key} is not in the file") from None
            order = "<" if self.byteorder == "little" else ">"
            dtype = kind.dtype.newbyteorder(order) if kind.dtype.itemsize > 1 else kind.dtype
            if len(raw) % dtype.itemsize:
                raise Unreadable(f"storage {key}: {len(raw)} bytes are not whole {kind.name} elements")
            self.storages[key] = Storage(np.frombuffer(raw, dtype=dtype), kind.bf16, order)
        st = self.storages[key]
        if isinstance(numel, int) and st.array.size < numel:
            raise Unreadable(f"storage {key} holds {st.array.size} elements, the pickle says {numel}")
        return st


def load(path):
    """The object ``torch.save`` wrote to ``path``, tensors as NumPy arrays. Raises
    :class:`Refused` (a disallowed global) or :class:`Unreadable`."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise Unreadable("not a zip archive, the format torch.save writes since torch 1.6 (a legacy torch "
                         "file: load it in torch and save it again)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise Unreadable("a zip archive without exactly one <name>/data.pkl: not a torch checkpoint")
        prefix = pickles[0][:-len("data.pkl")]
        try:
            byteorder = archive.read(prefix + "byteorder").decode().strip()
        except KeyError:
            byteorder = "little"      # files of torch < 1.13 record none; they are little-endian
        if byteorder not in ("little", "big"):
            raise Unreadable(f"byteorder {byteorder[:20]!r}")
        data = archive.read(pickles[0])
        try:
            return RestrictedUnpickler(io.BytesIO(data), archive, prefix, byteorder).load()
        except (Refused, Unreadable):
            raise
        except Exception as e:   # a malformed pickle: any of pickle's own error types
            raise Unreadable(f"its pickle does not load ({type(e).__name__}: {e})") from None


def plain(obj, depth=0):
    """``obj`` with OmegaConf's containers as dicts and lists, their nodes as values, names as
    strings and NumPy scalars as Python numbers (arrays are kept)."""
    if depth > 64:
        raise Unreadable("a config nested more than 64 levels deep")
    if isinstance(obj, Recorded):
        if obj.kind == "node":
            return plain(obj.field("_val"), depth + 1)
        if obj.kind in ("dictconfig", "listconfig"):
            return plain(obj.field("_content"), depth + 1)
        return None
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(plain(k, depth + 1))):
                plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v, depth + 1) for v in obj]
    if isinstance(obj, (Name, StorageType, TorchDtype)):
        return obj.name
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
