"""A torch checkpoint read without running what its pickle names: ``omh-ref import``'s reader of
the peers' Lightning checkpoints (docs/DECISIONS.md, "Importing the peers' checkpoints").

A ``.ckpt`` / ``.pth`` written by ``torch.save`` (torch >= 1.6) is a zip: ``<name>/data.pkl``,
the pickled object, and ``<name>/data/<key>``, the raw bytes of each tensor storage. A pickle may
name any importable callable and have it called while it loads, so this reader never resolves a
name through Python's import: :class:`RestrictedUnpickler` hands out only the entries of
:func:`_allowed`, each a small function or class of its own that builds plain data, and refuses
every other name in one line (:class:`Refused`). What it gives:

* torch's tensor rebuilders (``torch._utils._rebuild_tensor_v2``, ``_v3``, ``_rebuild_parameter``,
  the storage types and dtypes) -> **NumPy arrays**, read from the zip's storage files with
  their offsets and strides checked against the storage's length (bfloat16 widened to float32).
  The dtypes are torch's bool, (u)int8-64, float16/32/64 and bfloat16; complex, float8 and the
  bit types have no storage or dtype here and are refused by name;
* ``collections.OrderedDict`` (state dicts, keeping their ``_metadata``) and ``defaultdict`` (a
  plain dict); ``set`` and ``frozenset`` of a list; the other builtin types, ``typing``'s names
  and Lightning 1.x's callback classes (the keys of a checkpoint's ``callbacks``) only as inert
  names that refuse to be called; NumPy scalars of a plain number dtype (``numpy.dtype`` of a
  ``b``/``i``/``u``/``f`` type string, numpy's own built-in dtype); protocol 2's
  ``_codecs.encode`` of bytes; ``torch.device`` and ``torch.Size`` as a string and a tuple;
* **OmegaConf's config classes** (the hyper-parameters a Lightning module saves with
  ``save_hyperparameters()`` when it is given hydra's ``DictConfig``): ``DictConfig``,
  ``ListConfig``, their metadata and value nodes, each as a :class:`Recorded` object that keeps
  the state it is given and runs nothing; :func:`plain` turns them into dicts and lists
  (``_content``: the container's entries, ``_val``: a node's value; the state omegaconf's
  ``BaseContainer.__getstate__`` and ``Node.__getstate__`` pickle, omry/omegaconf
  ``omegaconf/basecontainer.py`` @ 0019bca, ``omegaconf/base.py`` @ 0019bca, ``omegaconf/nodes.py``
  @ 01445ab). omegaconf itself is not needed;
* Lightning's ``AttributeDict`` (a dict).

A file is a hostile input, so what a small file can make this reader do is bounded (the limits
below, each a one-line :class:`Unreadable`): the zip's central directory is at most
:data:`MAX_DIRECTORY` bytes and :data:`MAX_MEMBERS` entries (zipfile makes an object of each);
zip entries must be stored uncompressed (torch never compresses) and no larger than the file; the
storages read add up to no more than the file (so zip entries cannot overlap to multiply it); what
the pickle has built (tensors, decoded bytes, set entries, the parts of tuple keys hashed) draws on
one budget of 4 x the file's size + 64 MiB; a dict key or set entry is a scalar, a name or a small
tuple (hashing walks a tuple whole, and a pickle can put one tuple twice into the next); ``BUILD``
(an object's ``__setstate__``) reaches only the objects above that keep state, so nothing one
file does changes the reader for the next; ``APPEND(S)`` reaches only lists and ``NEWOBJ`` only
the classes above; :func:`plain` visits at most :data:`PLAIN_NODES` entries and
:data:`PLAIN_CHARS` characters of strings, counting what is reached twice twice (lists shared
into each other cannot expand exponentially, nor one long string shared a million times into the
JSON record), and refuses a cycle. Messages show what came from the file through :func:`clean`
and :func:`describe` (printable ASCII, truncated). Nothing here imports torch. A legacy (pre-1.6,
not zip) torch file is refused in one line.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np

# The limits (docs/DECISIONS.md, "Importing the peers' checkpoints"). A genuine checkpoint's
# data.pkl of a few thousand tensors is well under 1 MiB, its dict keys are strings, ints and
# Lightning's callback names, its tensors have at most a handful of dimensions.
MAX_PICKLE = 16 << 20          # bytes of <name>/data.pkl
MAX_DIRECTORY = 16 << 20       # bytes of the zip's central directory (torch.save: ~60 per storage)
MAX_MEMBERS = 1 << 16          # entries of the zip (one per storage, and four more)
BUDGET_SLACK = 64 << 20        # the build budget beyond BUDGET_FACTOR x the file's size, in bytes
BUDGET_FACTOR = 4              # a tensor's bytes, twice as float32 from bfloat16, views again
MAX_DIMS = 32                  # a tensor's dimensions (NumPy's own limit is 64)
MAX_ARGS = 16                  # arguments of one call the pickle makes (ours take at most 8)
MAX_NAME = 200                 # characters of a global's module + name
KEY_NODES, KEY_DEPTH = 256, 4  # a tuple / frozenset dict key: entries in all, nesting
KEY_COST = 64                  # budget bytes a walked key entry or a set entry costs
PLAIN_NODES = 100_000          # entries plain() visits (a config has ~100)
PLAIN_CHARS = 16 << 20         # characters of strings and bytes plain() passes on


class Refused(Exception):
    """The pickle names a global this reader does not hand out (``.name``: ``module.qualname``,
    cleaned for a message)."""

    def __init__(self, name):
        self.name = clean(name, 200)
        super().__init__(self.name)


class Unreadable(Exception):
    """Not a torch zip checkpoint, or one whose pickle or storages do not fit together, or one
    past a limit of this reader."""


# --------------------------------------------------------------------------------------------------
# Messages: what came from the file, made safe to print on one line
# --------------------------------------------------------------------------------------------------
def clean(text, limit=120) -> str:
    """``text`` (a string from the file: a name, a key) for a one-line message: printable ASCII
    only (control characters, ANSI escapes and newlines escaped as ``ascii()`` escapes them), at
    most ``limit`` characters."""
    text = str(text)[:limit]
    if not (text.isascii() and text.isprintable()):
        text = ascii(text)[1:-1]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe(value, limit=60) -> str:
    """A short rendering of a value from the pickle for a message: strings and bytes as
    ``ascii()`` shows them, numbers, lists, tuples and dicts up to ``limit`` characters, names by
    name, anything else by its type. It stops at ``limit`` however large or shared the value
    (``repr()`` of a list holding one list twice, 40 times over, takes 2**40 steps)."""
    out, left = [], [limit + 1]

    def put(s):
        out.append(s)
        left[0] -= len(s)

    def walk(v, depth):
        if left[0] <= 0:
            return
        if isinstance(v, np.generic) and v.dtype.kind in "biuf":
            v = v.item()
        if v is None or isinstance(v, (bool, float)):
            put(repr(v))
        elif isinstance(v, int):               # str() of an int past 4300 digits raises
            put(str(v) if v.bit_length() <= 64 else f"<an int of {v.bit_length()} bits>")
        elif isinstance(v, (str, bytes)):
            put(ascii(v[:limit]))
        elif isinstance(v, (Name, StorageType, TorchDtype)):
            put(clean(v.name, limit))
        elif isinstance(v, np.ndarray):
            put(f"an array {v.shape} of {v.dtype}")
        elif isinstance(v, (list, tuple, dict)) and depth < 4:
            put({list: "[", tuple: "("}.get(type(v), "{"))
            items = v.items() if isinstance(v, dict) else v
            for i, x in enumerate(items):
                if left[0] <= 0:
                    break
                if i:
                    put(", ")
                if isinstance(v, dict):
                    walk(x[0], depth + 1)
                    put(": ")
                    x = x[1]
                walk(x, depth + 1)
            put({list: "]", tuple: ")"}.get(type(v), "}"))
        else:
            put(f"<{type(v).__name__}>")

    walk(value, 0)
    text = "".join(out)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_text(e: BaseException) -> str:
    """``TypeName: message`` of an exception met while reading, for one line; its arguments are
    shown through :func:`describe`, never ``str()`` (a KeyError's message is the ``repr()`` of its
    key, which may be the pickle's)."""
    args = [clean(a) if isinstance(a, str) else describe(a) for a in e.args[:3]]
    return type(e).__name__ + (": " + clean(", ".join(args), 200) if args else "")


# --------------------------------------------------------------------------------------------------
# Stand-ins
# --------------------------------------------------------------------------------------------------
class Name:
    """A global as the pickle names it (``module.qualname``). With ``fn`` it is one of this
    reader's builders and the pickle may call it; without, a value that refuses to be called
    (``typing.Any``, ``builtins.int`` as OmegaConf's key type, a Lightning callback class used as
    a dict key). Slots only: no state to set."""

    __slots__ = ("name", "fn")

    def __init__(self, name, fn=None):
        self.name, self.fn = name, fn

    def __call__(self, *args, **kwargs):
        if self.fn is None:
            raise Refused(self.name + " (called)")
        return self.fn(*args, **kwargs)

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
        return st.get(key, default) if isinstance(st, dict) and isinstance(key, str) else default


def _recorded(kind, qualname):
    return type(qualname, (Recorded,), {"kind": kind})


class StateDict(collections.OrderedDict):
    """``collections.OrderedDict`` (torch's state dicts): an OrderedDict whose ``BUILD`` state
    keeps ``_metadata`` (what ``nn.Module.state_dict`` sets) and nothing else, so no attribute of
    the pickle's shadows a method; called with no arguments only (``OrderedDict.__reduce__``
    passes none; an argument's keys would be hashed unchecked)."""

    def __init__(self, *args, **kwargs):
        if args or kwargs:
            raise Refused("collections.OrderedDict (called with arguments)")

    def __setstate__(self, state):
        if isinstance(state, dict) and "_metadata" in state:
            self._metadata = state["_metadata"]


class AttributeDict(dict):
    """Lightning's ``AttributeDict`` (the hyper-parameters' dict): a dict, nothing else; made by
    ``NEWOBJ`` with no arguments and filled by ``SETITEMS``."""

    def __init__(self, *args, **kwargs):
        if args or kwargs:
            raise Refused("AttributeDict (called with arguments)")

    def __setstate__(self, state):   # a dict subclass may carry an (empty) instance __dict__
        pass


class Storage:
    """One tensor storage of the zip: its elements as a 1-d array (``bf16``: bfloat16 bits in
    uint16, widened when a tensor is built)."""

    __slots__ = ("array", "bf16", "order")

    def __init__(self, array, bf16=False, order="<"):
        self.array, self.bf16, self.order = array, bf16, order


class StorageType:
    """A torch storage class as the pickle names it (``torch.FloatStorage``): its element type."""

    __slots__ = ("name", "dtype", "bf16")

    def __init__(self, name, dtype, bf16=False):
        self.name, self.dtype, self.bf16 = name, np.dtype(dtype), bf16

    def __call__(self, *args, **kwargs):
        raise Refused(f"torch.{self.name} (called)")


class TorchDtype(StorageType):
    """``torch.float32`` and the like, as :func:`_rebuild_tensor_v3` receives them."""

    __slots__ = ()


_STORAGES = {  # torch storage class -> (NumPy element type, bfloat16)
    "FloatStorage": ("<f4", False), "DoubleStorage": ("<f8", False), "HalfStorage": ("<f2", False),
    "BFloat16Storage": ("<u2", True), "LongStorage": ("<i8", False), "IntStorage": ("<i4", False),
    "ShortStorage": ("<i2", False), "CharStorage": ("i1", False), "ByteStorage": ("u1", False),
    "BoolStorage": ("?", False), "UntypedStorage": ("u1", False),
}
_DTYPES = {  # torch dtype -> (NumPy element type, bfloat16); uint16/32/64 come through _rebuild_tensor_v3
    "float32": ("<f4", False), "float64": ("<f8", False), "float16": ("<f2", False), "bfloat16": ("<u2", True),
    "int64": ("<i8", False), "int32": ("<i4", False), "int16": ("<i2", False), "int8": ("i1", False),
    "uint8": ("u1", False), "bool": ("?", False),
    "uint16": ("<u2", False), "uint32": ("<u4", False), "uint64": ("<u8", False),
}
_OMEGACONF = {(module, name): _recorded(kind, name) for module, classes in {
    "omegaconf.dictconfig": [("DictConfig", "dictconfig")],
    "omegaconf.listconfig": [("ListConfig", "listconfig")],
    "omegaconf.base": [("Metadata", "metadata"), ("ContainerMetadata", "metadata")],
    "omegaconf.nodes": [(n, "node") for n in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode",
                                               "BytesNode", "ValueNode")]}.items() for name, kind in classes}
_ATTRIBUTE_DICT_MODULES = ("pytorch_lightning.utilities.parsing", "lightning_fabric.utilities.data",
                           "lightning.fabric.utilities.data", "pytorch_lightning.utilities.data")
# Lightning 1.x (before 1.5) keyed a checkpoint's "callbacks" by the callback's class: those names
# are let through as inert Names (never called, never imported).
CALLBACK_MODULES = ("pytorch_lightning.callbacks.", "lightning.pytorch.callbacks.")
# A numpy.dtype the pickle may make: one plain number type by its type string (what
# np.dtype.__reduce__ writes: 'f4', 'i8', 'b1', ...). No structured, subarray, void or object
# dtype: their fields are the pickle's to set, offsets included, and read memory outside a scalar.
_NUMPY_DTYPE = re.compile(r"[<>=|]?(?:\?|b1|[iu][1248]|f[248])")


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
def _ints(values, what):
    if not isinstance(values, (tuple, list)) or len(values) > MAX_DIMS:
        raise Unreadable(f"a tensor's {what} is {describe(values)}, not up to {MAX_DIMS} integers")
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise Unreadable(f"a tensor's {what} {describe(values)} holds {describe(v)}, not an integer >= 0")
    return tuple(values)


def _strided(base: np.ndarray, offset, size, stride, charge=None, out_itemsize=None) -> np.ndarray:
    """The tensor ``size`` / ``stride`` (in elements) at ``offset`` of the 1-d ``base``, copied;
    refused where it would reach past the storage, or where it has more elements than the
    storage without a stride of 0 (an overlapping view, which a saved tensor is not). ``charge``
    (the load's budget) is charged the bytes made (``out_itemsize`` each) before they are."""
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    (offset,) = _ints([offset], "offset")
    if len(size) != len(stride):
        raise Unreadable(f"a tensor of size {size} has strides {describe(stride)}")
    assert base.ndim == 1 and base.flags.c_contiguous
    n = math.prod(size)
    if charge is not None:
        charge(n * (out_itemsize or base.itemsize), f"a tensor of size {describe(size)}")
    if n == 0:
        return np.zeros(size, base.dtype)
    stride = tuple(s if k > 1 else 0 for k, s in zip(size, stride))   # a length-1 dimension's stride is moot
    last = offset + sum((k - 1) * s for k, s in zip(size, stride))
    if last >= base.size:
        raise Unreadable(f"a tensor of size {size} at offset {describe(offset)} reaches element {describe(last)} of "
                         f"a storage of {base.size}")
    if n > base.size and all(s for k, s in zip(size, stride) if k > 1):
        raise Unreadable(f"a tensor of size {size} (strides {stride}) has more elements than its storage of "
                         f"{base.size} without broadcasting one")
    view = np.lib.stride_tricks.as_strided(base[offset:], shape=size,
                                           strides=[s * base.itemsize for s in stride], writeable=False)
    return np.array(view)


def _native(a: np.ndarray, bf16: bool) -> np.ndarray:
    """In the machine's byte order; bfloat16 bits widened to float32 (exact); a bool's byte other
    than 0 and 1 (which NumPy would keep as it is) read as True, as torch reads it."""
    if a.dtype == np.bool_:
        return a.view(np.uint8) != 0
    a = a.astype(a.dtype.newbyteorder("="), copy=False)
    if bf16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a


def _defaultdict(default_factory=None):
    return {}


def _codecs_encode(text, encoding="latin1"):
    if not isinstance(text, str) or not isinstance(encoding, str) or encoding not in ("latin1", "latin-1"):
        raise Refused("_codecs.encode (other than str -> latin1 bytes)")
    return text.encode("latin1")


def _numpy_dtype(spec, align=False, copy=False):
    """``numpy.dtype`` as protocol 2 pickles it (``np.dtype('f4', False, True)``, then ``BUILD``):
    numpy's own built-in dtype of a plain number type string; ``align`` and ``copy`` ignored. The
    ``BUILD`` after it is skipped (:meth:`RestrictedUnpickler.load_build`)."""
    if not isinstance(spec, str) or not _NUMPY_DTYPE.fullmatch(spec):
        raise Refused(f"numpy.dtype({describe(spec)}) (a dtype other than bool, int, uint, float)")
    dt = np.dtype(spec)
    assert dt.kind in "biuf" and dt.fields is None and dt.subdtype is None
    return dt


def _numpy_scalar(dtype, data=None):
    if not (isinstance(dtype, np.dtype) and dtype.kind in "biuf" and dtype.fields is None):
        raise Refused("numpy scalar of a dtype other than bool, int, uint, float")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise Unreadable(f"a numpy {dtype} scalar of {describe(data)}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _torch_size(values=()):
    return _ints(values, "torch.Size")


def _torch_device(kind, index=None):
    if not isinstance(kind, str) or len(kind) > 32 or not (index is None or isinstance(index, int)):
        raise Unreadable(f"a torch.device of {describe(kind)}, {describe(index)}")
    return kind if index is None else f"{kind}:{describe(index)}"


def _empty_bytes(*args):
    if args:            # protocol 2 pickles b"" as bytes(); bytes(10**9) is a gigabyte
        raise Refused("builtins.bytes (called with arguments)")
    return b""


# --------------------------------------------------------------------------------------------------
# The unpickler
# --------------------------------------------------------------------------------------------------
class RestrictedUnpickler(pickle._Unpickler):
    """Python's unpickler with every global looked up in :func:`_allowed` (and the callbacks'
    names), never imported; storages read from the zip by key.

    It is the pure-Python one (``pickle._Unpickler``), because the opcodes that hash a key, call
    something or set an object's state are then methods that can be checked here: in the C
    unpickler they run in C. A data.pkl is small (under 1 MiB for thousands of tensors), so the
    slower interpreter costs milliseconds. What it checks beyond the names:

    * ``SETITEM(S)``, ``DICT``, ``ADDITEMS``, ``FROZENSET``: the target is a dict (a set), and each
      key passes :meth:`check_key`; ``APPEND(S)``: the target is a list (pickle's own calls the
      ``extend`` or ``append`` of whatever is on the stack);
    * ``NEWOBJ(_EX)``: the class is one of this reader's (:class:`Recorded`, :class:`StateDict`,
      :class:`AttributeDict`);
    * ``REDUCE``, ``NEWOBJ(_EX)``, ``INST``, ``OBJ``: the arguments are a tuple of at most
      :data:`MAX_ARGS` (unpacking a shared list of a million entries a million times is quadratic);
    * ``BUILD``: only on :class:`Recorded`, :class:`StateDict` and :class:`AttributeDict` objects
      (their own ``__setstate__``) and numpy's built-in dtypes (of whose state only the byte order
      is read, and given to a new dtype: numpy's ``__setstate__`` would change its shared one).
      Anything else, the stand-ins, this reader's functions and the arrays it made included, is
      refused: its state is not the pickle's to set;
    * ``EXT1/2/4`` (copyreg's extension codes, which torch never writes) are refused: the lookup
      would go through copyreg's process-wide cache.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, file_size: int):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder, self.storages = archive, prefix, byteorder, {}
        self.file_size, self.storage_bytes = file_size, 0
        self.budget = BUDGET_FACTOR * file_size + BUDGET_SLACK
        self.allowed = _allowed(self)

    # --- the budget -----------------------------------------------------------------------------
    def charge(self, nbytes, what):
        """Draw ``nbytes`` from the load's build budget, before they are built."""
        self.budget -= nbytes
        if self.budget < 0:
            raise Unreadable(f"{what} takes the pickle past {BUDGET_FACTOR} x the file's size + "
                             f"{BUDGET_SLACK >> 20} MiB built (a genuine checkpoint builds about its size)")

    def check_key(self, key):
        """A dict key or set entry: an int of up to 64 bits (hashing an int walks all its
        digits, every time), or a tuple / frozenset of at most :data:`KEY_NODES` entries,
        :data:`KEY_DEPTH` deep (hashing a tuple walks all of it, every time, and a pickle can put
        one tuple twice into the next: 100 levels of a few bytes each hash in 2**100 steps).
        Other keys hash in constant time or by their cached hash (str, bytes, names), or are
        refused by the dict itself (lists, dicts, arrays)."""
        if isinstance(key, int):
            if key.bit_length() > 64:
                raise Unreadable(f"a dict key or set entry {describe(key)}")
            return
        if not isinstance(key, (tuple, frozenset)):
            return
        todo, seen = [(key, 1)], 0
        while todo:
            k, depth = todo.pop()
            if depth > KEY_DEPTH:
                raise Unreadable(f"a dict key or set entry nested more than {KEY_DEPTH} deep: {describe(key)}")
            for x in k:
                seen += 1
                if seen > KEY_NODES:
                    raise Unreadable(f"a dict key or set entry of more than {KEY_NODES} parts: {describe(key)}")
                if isinstance(x, int) and x.bit_length() > 64:
                    raise Unreadable(f"a dict key or set entry {describe(key)}")
                if isinstance(x, (tuple, frozenset)):
                    todo.append((x, depth + 1))
        self.charge(KEY_COST * seen, "a tuple key")

    def make_set(self, items=(), kind=set):
        """``set`` / ``frozenset`` as protocol 2 pickles them: of one list."""
        if not isinstance(items, (list, tuple)):
            raise Refused(f"builtins.{kind.__name__} (of {describe(items)}, not a list)")
        self.charge(KEY_COST * len(items), f"a {kind.__name__} of {len(items)}")
        for x in items:
            self.check_key(x)
        return kind(items)

    # --- what the pickle may name ----------------------------------------------------------------
    def find_class(self, module, name):
        if len(module) + len(name) > MAX_NAME:
            raise Refused(f"{module}.{name}")
        # what pickle's own find_class does for the Python 2 names a protocol 2 pickle holds
        # (torch.save pickles with protocol 2: `__builtin__ long` is int, `unicode` is str)
        if self.proto < 3 and self.fix_imports:
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        if module.startswith(CALLBACK_MODULES) and name.isidentifier():
            return Name(f"{module}.{name}")
        raise Refused(f"{module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and isinstance(pid[0], str) and pid[0] == "storage"):
            raise Unreadable(f"an unknown persistent id {describe(pid)}")
        kind, key, numel = pid[1], pid[2], pid[4]
        if not (isinstance(key, str) and 0 < len(key) <= 64 and key.isascii() and key.isprintable()):
            raise Unreadable(f"a storage key {describe(key)}")
        if type(kind) is not StorageType:
            raise Unreadable(f"storage {key} of an unknown type {describe(kind)}")
        if key not in self.storages:
            name = f"{self.prefix}data/{key}"
            try:
                info = self.archive.getinfo(name)
            except KeyError:
                raise Unreadable(f"storage {key} is not in the file") from None
            # a genuine file stores each storage once: together they are no larger than the file
            self.storage_bytes += info.file_size
            if self.storage_bytes > self.file_size:
                raise Unreadable(f"storage {key}: the storages read add up to more than the file's "
                                 f"{self.file_size} bytes (zip entries overlap)")
            raw = read_entry(self.archive, name, self.file_size)
            order = "<" if self.byteorder == "little" else ">"
            dtype = kind.dtype.newbyteorder(order) if kind.dtype.itemsize > 1 else kind.dtype
            if len(raw) % dtype.itemsize:
                raise Unreadable(f"storage {key}: {len(raw)} bytes are not whole {kind.name} elements")
            self.storages[key] = Storage(np.frombuffer(raw, dtype=dtype), kind.bf16, order)
        st = self.storages[key]
        if isinstance(numel, int) and st.array.size < numel:
            raise Unreadable(f"storage {key} holds {st.array.size} elements, the pickle says {describe(numel)}")
        return st

    # --- what the pickle may call ----------------------------------------------------------------
    def rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                          metadata=None):
        if type(storage) is not Storage:
            raise Unreadable("a tensor without a storage")
        a = _strided(storage.array, storage_offset, size, stride, self.charge, 4 if storage.bf16 else None)
        return _native(a, storage.bf16)

    def rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                          metadata=None):
        """torch >= 2.1 for the dtypes it pickles with an ``UntypedStorage`` (uint16/32/64 here;
        float8, complex32 and the bit types have no ``torch.<dtype>`` here and are refused)."""
        if type(storage) is not Storage or type(dtype) is not TorchDtype:
            raise Unreadable("a tensor without a storage or a dtype")
        raw = storage.array.view(np.uint8)
        if raw.size % dtype.dtype.itemsize:
            raise Unreadable(f"a storage of {raw.size} bytes read as {dtype.name}")
        base = raw.view(dtype.dtype.newbyteorder(storage.order) if dtype.dtype.itemsize > 1 else dtype.dtype)
        a = _strided(base, storage_offset, size, stride, self.charge, 4 if dtype.bf16 else None)
        return _native(a, dtype.bf16)

    @staticmethod
    def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
        return data

    def codecs_encode(self, text, encoding="latin1"):
        if isinstance(text, str):
            self.charge(len(text), "a bytes value")
        return _codecs_encode(text, encoding)

    # --- the checked opcodes ---------------------------------------------------------------------
    def _args(self, args, what="a call"):
        if not isinstance(args, tuple) or len(args) > MAX_ARGS:
            raise Unreadable(f"{what} with {describe(args)} as its arguments")
        return args

    def load_reduce(self):
        args = self._args(self.stack.pop())
        self.stack[-1] = self.stack[-1](*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    @staticmethod
    def _class(cls):
        """``NEWOBJ``'s class: one of this reader's that keep state (``cls.__new__`` of anything
        else is the pickle's to choose)."""
        if not (isinstance(cls, type) and issubclass(cls, (Recorded, StateDict, AttributeDict))):
            raise Unreadable(f"its pickle makes an object of {describe(cls)} (NEWOBJ), which this reader does not "
                             "allow")
        return cls

    def load_newobj(self):
        args = self._args(self.stack.pop())
        cls = self._class(self.stack.pop())
        self.append(cls.__new__(cls, *args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self._args(self.stack.pop())
        if not isinstance(kwargs, dict) or len(kwargs) > MAX_ARGS:
            raise Unreadable(f"a call with {describe(kwargs)} as its keyword arguments")
        cls = self._class(self.stack.pop())
        self.append(cls.__new__(cls, *args, **kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):   # INST and OBJ (protocols 0 and 1)
        super()._instantiate(klass, self._args(tuple(args[:MAX_ARGS + 1])))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (Recorded, StateDict, AttributeDict)):
            inst.__setstate__(state)
        elif isinstance(inst, np.dtype) and inst.fields is None:
            # numpy's dtype state is (version, byte order, ...): the byte order is taken, on a new
            # dtype (the one on the stack is numpy's own, shared by the whole process)
            order = state[1] if isinstance(state, tuple) and len(state) > 1 else None
            if order in ("<", ">") and inst.itemsize > 1:
                self.stack[-1] = inst.newbyteorder(order)
        else:
            raise Unreadable(f"its pickle sets the state of {describe(inst)} (BUILD), which this reader does not allow")
    dispatch[pickle.BUILD[0]] = load_build

    def _target(self, kind):
        target = self.stack[-1]
        if not isinstance(target, kind):
            raise Unreadable(f"its pickle adds entries to {describe(target)}, not a {kind.__name__}")
        return target

    def load_append(self):
        value = self.stack.pop()
        self._target(list).append(value)
    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self):      # pickle's own calls .extend / .append of whatever is on the stack
        items = self.pop_mark()
        self._target(list).extend(items)
    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self):
        value, key = self.stack.pop(), self.stack.pop()
        self.check_key(key)
        self._target(dict)[key] = value
    dispatch[pickle.SETITEM[0]] = load_setitem

    def _pairs(self, items):
        if len(items) % 2:
            raise Unreadable("its pickle sets a dict entry without a value")
        for k in items[::2]:
            self.check_key(k)
        return items

    def load_setitems(self):
        items = self._pairs(self.pop_mark())
        target = self._target(dict)
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]
    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_dict(self):
        items = self._pairs(self.pop_mark())
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})
    dispatch[pickle.DICT[0]] = load_dict

    def load_additems(self):
        items = self.pop_mark()
        self._target(set).update(self.make_set(items))
    dispatch[pickle.ADDITEMS[0]] = load_additems

    def load_frozenset(self):
        self.append(self.make_set(self.pop_mark(), frozenset))
    dispatch[pickle.FROZENSET[0]] = load_frozenset

    def load_ext(self):
        raise Refused("copyreg extension codes (EXT1/2/4)")
    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = load_ext
    del _op


def _allowed(reader: RestrictedUnpickler) -> dict:
    """(module, name) -> what the pickle gets instead; made for each load, so that whatever one
    file does to what it was handed cannot reach the next."""
    def fn(qualname, f):
        return Name(qualname, f)

    out = {
        ("collections", "OrderedDict"): StateDict,
        ("collections", "defaultdict"): fn("collections.defaultdict", _defaultdict),
        ("torch._utils", "_rebuild_tensor_v2"): fn("torch._utils._rebuild_tensor_v2", reader.rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): fn("torch._utils._rebuild_tensor_v3", reader.rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): fn("torch._utils._rebuild_parameter", reader.rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): fn("torch._utils._rebuild_parameter_with_state",
                                                              reader.rebuild_parameter),
        ("torch", "Size"): fn("torch.Size", _torch_size),
        ("torch", "device"): fn("torch.device", _torch_device),
        ("_codecs", "encode"): fn("_codecs.encode", reader.codecs_encode),
        ("numpy", "dtype"): fn("numpy.dtype", _numpy_dtype),
        ("numpy.core.multiarray", "scalar"): fn("numpy.core.multiarray.scalar", _numpy_scalar),
        ("numpy._core.multiarray", "scalar"): fn("numpy._core.multiarray.scalar", _numpy_scalar),
        ("builtins", "set"): fn("builtins.set", reader.make_set),
        ("builtins", "frozenset"): fn("builtins.frozenset", lambda items=(): reader.make_set(items, frozenset)),
        ("builtins", "bytes"): fn("builtins.bytes", _empty_bytes),
    }
    # the other builtin types are values (OmegaConf's object and key types), never called:
    # str(bytes(10**9)) is a gigabyte from a few bytes of pickle
    for t in ("dict", "list", "tuple", "int", "float", "complex", "str", "bytearray", "bool", "NoneType"):
        out[("builtins", t)] = Name(f"builtins.{t}")
    for n in ("Any", "Dict", "List", "Tuple", "Optional", "Union", "Type"):
        out[("typing", n)] = Name(f"typing.{n}")
    for n, (dt, bf16) in _STORAGES.items():
        out[("torch", n)] = StorageType(n, dt, bf16)
        out[("torch.storage", n)] = out[("torch", n)]
    for n, (dt, bf16) in _DTYPES.items():
        out[("torch", n)] = TorchDtype(n, dt, bf16)
    out.update(_OMEGACONF)
    for module in _ATTRIBUTE_DICT_MODULES:
        out[(module, "AttributeDict")] = AttributeDict
    return out


# --------------------------------------------------------------------------------------------------
# The zip
# --------------------------------------------------------------------------------------------------
def read_entry(archive: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """The bytes of the zip entry ``name``: stored (torch.save never compresses, and an inflated
    entry could be any size), at most ``limit`` bytes; a damaged entry (a bad CRC, a truncated
    file) is :class:`Unreadable`."""
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise Unreadable(f"{clean(name)} is compressed (torch.save stores its entries uncompressed)")
    if info.file_size > limit or info.compress_size != info.file_size:
        raise Unreadable(f"{clean(name)} is {info.file_size} bytes, more than the {limit} it may be")
    try:
        data = archive.read(info)
    except Exception as e:   # zipfile's BadZipFile (bad CRC), EOFError, OSError (truncated)
        raise Unreadable(f"a damaged zip archive: {clean(name)} ({error_text(e)})") from None
    if len(data) != info.file_size:
        raise Unreadable(f"a damaged zip archive: {clean(name)} is short")
    return data


def load(path):
    """The object ``torch.save`` wrote to ``path``, tensors as NumPy arrays. Raises
    :class:`Refused` (a disallowed global) or :class:`Unreadable` (anything else, in one line)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise Unreadable("not a zip archive, the format torch.save writes since torch 1.6 (a legacy torch "
                         "file: load it in torch and save it again)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            _check_directory(f, size)
            with zipfile.ZipFile(f) as archive:
                if len(archive.infolist()) > MAX_MEMBERS:
                    raise Unreadable(f"a zip archive of {len(archive.infolist())} entries, more than {MAX_MEMBERS}")
                return _load(archive, size)
    except (Refused, Unreadable):
        raise
    except Exception as e:   # zipfile's own errors reading the central directory
        raise Unreadable(f"a damaged zip archive ({error_text(e)})") from None


def _check_directory(f, size):
    """The zip's central directory (what ``zipfile.ZipFile`` reads whole, an object per entry)
    is at most :data:`MAX_DIRECTORY` bytes and says it has at most :data:`MAX_MEMBERS` entries,
    read from its end record (zip64's included) before zipfile parses it. ``zipfile._EndRecData``
    is the function ``ZipFile`` itself reads the record with (private: where a Python lacks it,
    the entries are counted after zipfile has read them, :func:`load`)."""
    read_end = getattr(zipfile, "_EndRecData", None)
    if read_end is None:
        return
    end = read_end(f)
    if end is None:
        raise Unreadable("a damaged zip archive (no end of central directory record)")
    directory, entries = end[zipfile._ECD_SIZE], end[zipfile._ECD_ENTRIES_TOTAL]
    if directory > min(MAX_DIRECTORY, size) or entries > MAX_MEMBERS:
        raise Unreadable(f"a zip archive whose central directory is {directory} bytes for {entries} entries, more "
                         f"than this reader reads ({MAX_DIRECTORY} bytes, {MAX_MEMBERS} entries)")
    f.seek(0)


def _load(archive: zipfile.ZipFile, size: int):
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise Unreadable("a zip archive without exactly one <name>/data.pkl: not a torch checkpoint")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"      # files of torch < 1.13 record none; they are little-endian
    if prefix + "byteorder" in archive.namelist():
        raw = read_entry(archive, prefix + "byteorder", 16)
        byteorder = raw.decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise Unreadable(f"byteorder {describe(raw)}")
    data = read_entry(archive, pickles[0], min(MAX_PICKLE, size))
    try:
        return RestrictedUnpickler(io.BytesIO(data), archive, prefix, byteorder, size).load()
    except (Refused, Unreadable):
        raise
    except Exception as e:   # a malformed pickle: any of pickle's own error types, a failed call
        raise Unreadable(f"its pickle does not load ({error_text(e)})") from None


# --------------------------------------------------------------------------------------------------
# Plain data
# --------------------------------------------------------------------------------------------------
def plain(obj, budget=PLAIN_NODES, chars=PLAIN_CHARS):
    """``obj`` with OmegaConf's containers as dicts and lists, their nodes as values, names as
    strings, sets as lists and NumPy scalars as Python numbers (arrays are kept). The pickle's
    memo lets one object appear many times, so what it passes on is bounded as if each appearance
    were a copy (the JSON record writes it so): at most ``budget`` entries and ``chars``
    characters of strings and bytes, counting an entry reached twice twice (a list holding one
    list twice, 40 times over, is 2**40 entries; a long string shared 100,000 times, gigabytes of
    JSON: both refused, as are configs nested past 64 levels). A container that holds itself (a
    cycle, which a config never is) is refused."""
    left = [budget, chars]
    path = set()           # ids of the containers being walked: the way down to the current one

    def walk(o, depth):
        left[0] -= 1
        if left[0] < 0:
            raise Unreadable(f"a config of more than {budget} entries (counted as often as they are reached)")
        if depth > 64:
            raise Unreadable("a config nested more than 64 levels deep")
        if isinstance(o, (str, bytes)):
            left[1] -= len(o)
            if left[1] < 0:
                raise Unreadable(f"a config of more than {chars} characters (counted as often as they are reached)")
            return o
        if not isinstance(o, (Recorded, dict, list, tuple, set, frozenset)):
            if isinstance(o, (Name, StorageType)):
                return o.name
            if isinstance(o, type):
                return o.__name__
            if isinstance(o, np.generic):
                return o.item()
            return o
        if id(o) in path:
            raise Unreadable(f"a config that holds itself ({describe(o)})")
        path.add(id(o))
        try:
            if isinstance(o, Recorded):
                if o.kind == "node":
                    return walk(o.field("_val"), depth + 1)
                if o.kind in ("dictconfig", "listconfig"):
                    return walk(o.field("_content"), depth + 1)
                return None
            if isinstance(o, dict):
                return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(walk(k, depth + 1))):
                        walk(v, depth + 1) for k, v in o.items()}
            return [walk(v, depth + 1) for v in o]
        finally:
            path.discard(id(o))

    return walk(obj, 0)
