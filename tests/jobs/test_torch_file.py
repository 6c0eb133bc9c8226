"""``omh-ref import``'s reader of torch files (omh_ref/jobs/torch_file.py) against hostile files.

The files here are written by hand, not by torch.save: the pickle by :class:`_Writer`, which names
any global without importing it (:func:`_glob`), the zip by zipfile or, for what zipfile will not
write, byte by byte (:func:`_raw_zip`). Each refusal is checked through ``imports.read``, which
gives one line naming the file; the crafted files have siblings that load (the controls), so a
refusal is the check's and not a broken craft. torch is needed only by the tests that compare
with a file torch wrote."""
import io
import os
import pickle
import struct
import zipfile
import zlib

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.core.errors import InputError
from omh_ref.jobs import imports, peers, torch_file
from omh_ref_cli.main import main
from tests.builders import dictconfig, peer_modules


# --------------------------------------------------------------------------------------------------
# Writing pickles and zips by hand
# --------------------------------------------------------------------------------------------------
def _glob(qualified):
    """A global named ``module.name``, written as pickle's GLOBAL and never imported."""
    module, name = qualified.rsplit(".", 1)
    return type(name, (), {"fake_global": True, "__module__": module, "__qualname__": name})


class Call:
    """Pickles as ``fn(*args)`` (REDUCE), then ``BUILD`` with ``state`` if given."""

    def __init__(self, fn, *args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) + (() if self.state is None else (self.state,))


class Stor:
    """A storage: pickles as torch's persistent id ``('storage', torch.<kind>, key, 'cpu', numel)``."""

    def __init__(self, kind, key, numel):
        self.pid = ("storage", _glob(f"torch.{kind}"), key, "cpu", numel)


class _Writer(pickle._Pickler):
    def save_global(self, obj, name=None):
        if getattr(obj, "fake_global", False):
            self.write(pickle.GLOBAL + f"{obj.__module__}\n{obj.__qualname__}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, Stor) else None


def dumps(obj):
    f = io.BytesIO()
    _Writer(f, protocol=2).dump(obj)
    return f.getvalue()


def tensor(key, size, stride=None, offset=0, kind="FloatStorage", numel=None):
    if stride is None:
        stride = tuple(int(np.prod(size[i + 1:])) for i in range(len(size)))
    return Call(_glob("torch._utils._rebuild_tensor_v2"), Stor(kind, key, numel or 1), offset, tuple(size),
                tuple(stride), False, Call(_glob("collections.OrderedDict")))


def write(path, obj=None, storages=None, raw=None, byteorder="little", compress=False):
    """A torch zip at ``path``: the pickle of ``obj`` (or the ``raw`` pickle bytes) and ``storages``."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", dumps(obj) if raw is None else raw,
                   zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        z.writestr("archive/byteorder", byteorder)
        for k, b in (storages or {}).items():
            z.writestr(f"archive/data/{k}", b)
    return path


def raw_pickle(body: bytes, proto=2) -> bytes:
    return bytes([pickle.PROTO[0], proto]) + body + pickle.STOP


def _local(name, data, size=None):
    """A zip entry's local header (stored; ``size``: the size it declares) and its data."""
    n, size = name.encode(), len(data) if size is None else size
    crc = zlib.crc32(data)
    return struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0x21, crc, size, size, len(n), 0) + n + data


def _raw_zip(path, body, records):
    """``body`` (local headers and data), then the central directory of ``records``: (name, data,
    offset of its local header in ``body``, declared size or None), then the end record."""
    central = b"".join(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0x21, zlib.crc32(data),
                                   len(data) if size is None else size, len(data) if size is None else size,
                                   len(name.encode()), 0, 0, 0, 0, 0, at) + name.encode()
                       for name, data, at, size in records)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(records), len(records), len(central), len(body), 0)
    path.write_bytes(body + central + end)
    return path


STEGO_SHAPES = {"net.cluster1.0.weight": (3, 4, 1, 1), "net.cluster1.0.bias": (3,),
                "net.cluster2.0.weight": (4, 4, 1, 1), "net.cluster2.0.bias": (4,),
                "net.cluster2.2.weight": (3, 4, 1, 1), "net.cluster2.2.bias": (3,),
                "cluster_probe.clusters": (5, 3), "linear_probe.weight": (2, 3, 1, 1), "linear_probe.bias": (2,)}


def stego(path, hparams=None, edit=None, **lightning):
    """A STEGO checkpoint of crafted tensors (C = 4, D = 3, K = 5, 2 classes) with ``hparams`` as its
    hyper_parameters; ``edit(state)`` changes the state dict (of :class:`Call` objects) first.
    Besides the tensors' storages ``0`` to ``8`` it holds ``x``: 10 float32 no tensor uses."""
    rng = np.random.default_rng(0)
    arrays = {k: rng.standard_normal(s).astype("<f4") for k, s in STEGO_SHAPES.items()}
    state = {k: tensor(str(i), a.shape, numel=a.size) for i, (k, a) in enumerate(arrays.items())}
    if edit:
        edit(state)
    obj = {"state_dict": state, "epoch": 1, "global_step": 10, **lightning}
    if hparams is not None:
        obj["hyper_parameters"] = hparams
    storages = {str(i): a.tobytes() for i, a in enumerate(arrays.values())}
    with peer_modules():
        return write(path, obj, {**storages, "x": np.arange(10, dtype="<f4").tobytes()}), arrays


class Pairs:
    """Pickles as an OrderedDict filled with ``pairs`` (SETITEMS), none of them hashed here."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __reduce__(self):
        return _glob("collections.OrderedDict"), (), None, None, iter(self.pairs)


def refused(path, *wanted):
    """``imports.read(path)`` raises one line that names ``path`` and holds every ``wanted``."""
    with pytest.raises(InputError) as e:
        imports.read(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg and msg.isprintable() and len(msg) < 700, msg
    for w in wanted:
        assert w in msg, (w, msg)
    return msg


HP = {"n_classes": 2, "cfg": {"arch": "dino", "projection_type": "nonlinear"}}


def hp(x):
    """Hyper-parameters whose config holds ``x`` under ``"x"`` (what import.json records)."""
    return {"n_classes": 2, "cfg": {**HP["cfg"], "x": x}}


# --------------------------------------------------------------------------------------------------
# The controls: crafted files that load
# --------------------------------------------------------------------------------------------------
def test_a_crafted_checkpoint_imports_and_its_list_config_is_a_list(tmp_path):
    """The crafted STEGO file imports: its tensors are the bytes written, and its DictConfig's list
    field (an omegaconf ListConfig, key_type int pickled as ``__builtin__ long``) is a plain list,
    nested lists and dicts included, in the hyper-parameters omh-ref records."""
    cfg = {**HP["cfg"], "crops": [224, [0.5, "five"], {"k": None}], "empty": []}
    path, arrays = stego(tmp_path / "s.ckpt", {"n_classes": 2, "cfg": dictconfig(cfg)})
    imp = imports.read(path)
    assert imp.hyper_parameters["crops"] == [224, [0.5, "five"], {"k": None}] and imp.hyper_parameters["empty"] == []
    assert type(imp.hyper_parameters["crops"]) is list and type(imp.hyper_parameters["crops"][1]) is list
    np.testing.assert_array_equal(imp.params["M0"], arrays["cluster_probe.clusters"])
    np.testing.assert_array_equal(imp.probe["W"], arrays["linear_probe.weight"][:, :, 0, 0])
    assert imp.n_classes == 2 and imp.lightning == {"epoch": 1, "global_step": 10}
    loaded = torch_file.load(path)["hyper_parameters"]["cfg"]
    assert type(loaded).__name__ == "DictConfig" and type(loaded.field("_content")["crops"]).__name__ == "ListConfig"


def test_views_offsets_and_byte_orders(tmp_path):
    """A view at an offset with strides (a transpose), a broadcast (stride 0), an empty tensor,
    big-endian storages (``byteorder`` big), bool bytes other than 0/1 (True, as torch reads them)."""
    base = np.arange(10, dtype=np.float32)
    obj = {"view": tensor("0", (2, 3), (3, 1), 2, numel=10), "t": tensor("0", (3, 2), (1, 3), 2),
           "bcast": tensor("0", (3, 2), (0, 1), 4), "empty": tensor("0", (0, 4)),
           "flag": tensor("1", (3,), kind="BoolStorage")}
    for order, fmt in (("little", "<f4"), ("big", ">f4")):
        write(tmp_path / "v.pt", obj, {"0": base.astype(fmt).tobytes(), "1": b"\x00\x02\x01"}, byteorder=order)
        got = torch_file.load(tmp_path / "v.pt")
        np.testing.assert_array_equal(got["view"], base[2:8].reshape(2, 3))
        np.testing.assert_array_equal(got["t"], base[2:8].reshape(2, 3).T)
        np.testing.assert_array_equal(got["bcast"], np.broadcast_to(base[4:6], (3, 2)))
        assert got["view"].dtype == np.float32 and got["view"].dtype.isnative and got["empty"].shape == (0, 4)
        assert got["flag"].tolist() == [False, True, True] and got["flag"].view(np.uint8).tolist() == [0, 1, 1]


def test_rebuild_tensor_v3_reads_the_unsigned_types(tmp_path):
    """torch >= 2.1 pickles uint16/32/64 as ``_rebuild_tensor_v3`` of an UntypedStorage (bytes)
    and a ``torch.<dtype>``: read here with the element offset and strides of that dtype."""
    vals = np.array([1, 2, 60000, 7, 9, 11], "<u2")
    v3 = _glob("torch._utils._rebuild_tensor_v3")
    obj = Call(v3, Stor("UntypedStorage", "0", 12), 1, (2, 2), (1, 2), False, Call(_glob("collections.OrderedDict")),
               _glob("torch.uint16"))
    write(tmp_path / "u.pt", obj, {"0": vals.tobytes()})
    got = torch_file.load(tmp_path / "u.pt")
    assert got.dtype == np.uint16
    np.testing.assert_array_equal(got, np.lib.stride_tricks.as_strided(vals[1:], (2, 2), (2, 4)))


def test_what_torch_saves_in_the_unsigned_types_and_what_it_refuses(tmp_path):
    torch = pytest.importorskip("torch")
    x = torch.arange(24).reshape(4, 6)
    obj = {str(dt): (x.to(dt), x.to(dt).t()[1:, ::2]) for dt in (torch.uint16, torch.uint32, torch.uint64)}
    torch.save(obj, tmp_path / "u.pt")
    got = torch_file.load(tmp_path / "u.pt")
    for k, ts in obj.items():
        for t, g in zip(ts, got[k]):
            want = t.numpy()
            assert g.dtype == want.dtype and np.array_equal(g, want), k
    for dt, name in ((torch.float8_e4m3fn, "torch.float8_e4m3fn"), (torch.complex64, "torch.ComplexFloatStorage")):
        torch.save({"t": torch.zeros(2, dtype=dt)}, tmp_path / "r.pt")
        with pytest.raises(torch_file.Refused, match=name):
            torch_file.load(tmp_path / "r.pt")


# --------------------------------------------------------------------------------------------------
# Globals: only inert ones
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,shown", [
    ("builtins.eval", "builtins.eval"), ("builtins.exec", "builtins.exec"), ("builtins.getattr", "builtins.getattr"),
    ("builtins.__import__", "builtins.__import__"), ("__builtin__.apply", "builtins.apply"),
    ("__builtin__.eval", "builtins.eval"), ("builtins.setattr", "builtins.setattr"), ("builtins.type", "builtins.type"),
    ("os.system", "os.system"), ("posix.mkdir", "posix.mkdir"), ("subprocess.Popen", "subprocess.Popen"),
    ("copy_reg._reconstructor", "copyreg._reconstructor"), ("functools.partial", "functools.partial"),
    ("numpy.core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct"), ("numpy.load", "numpy.load"),
    ("torch.load", "torch.load"), ("pickle.loads", "pickle.loads"), ("collections.OrderedDict.fromkeys",
                                                                      "collections.OrderedDict.fromkeys"),
    ("pytorch_lightning.callbacks.model_checkpoint.os.system", "model_checkpoint.os.system (called)"),
])
def test_a_global_that_would_run_code_is_refused_and_nothing_runs(tmp_path, name, shown):
    made = tmp_path / "made"
    code = f"__import__('os').mkdir({str(made)!r})"
    path, _ = stego(tmp_path / "e.ckpt", hp(Call(_glob(name), code)))
    refused(path, "refused: its pickle names ", shown)
    assert not made.exists()
    # the same global through pickle's STACK_GLOBAL (protocol 4) and INST (protocol 0)
    module, attr = name.rsplit(".", 1)
    for body, proto in ((b"\x8c" + bytes([len(module)]) + module.encode() + b"\x8c" + bytes([len(attr)]) + attr.encode()
                         + b"\x93X" + struct.pack("<I", len(code)) + code.encode() + b"\x85R", 4),
                        (b"(V" + code.encode() + b"\ni" + module.encode() + b"\n" + attr.encode() + b"\n", 0)):
        write(tmp_path / "g.pt", raw=raw_pickle(body, proto) if proto else body + b".")
        with pytest.raises(torch_file.Refused):
            torch_file.load(tmp_path / "g.pt")
        assert not made.exists()


def test_python_2_names_map_as_pickle_maps_them(tmp_path):
    """Protocol 2 (and 0) map Python 2's module and class names as pickle's own find_class does
    (``__builtin__ long`` is int, ``copy_reg`` is copyreg); protocol 3 and later map nothing."""
    for proto, body, want in ((2, b"c__builtin__\nlong\n", "builtins.int"),
                              (2, b"c__builtin__\nunicode\n", "builtins.str"),
                              (2, b"c__builtin__\nset\n", "builtins.set"),
                              (0, b"c__builtin__\nlong\n", "builtins.int")):
        raw = raw_pickle(body, proto) if proto else body + b"."
        assert type(pickle.loads(raw)).__name__ == "type"              # pickle's own reading: a builtin type
        write(tmp_path / "c.pt", raw=raw)
        assert torch_file.plain(torch_file.load(tmp_path / "c.pt")) == want
    for proto in (3, 4):
        write(tmp_path / "c.pt", raw=raw_pickle(b"c__builtin__\nlong\n", proto))
        with pytest.raises(torch_file.Refused, match="__builtin__.long"):
            torch_file.load(tmp_path / "c.pt")
    write(tmp_path / "c.pt", raw=raw_pickle(b"cexceptions\nStandardError\n"))
    with pytest.raises(torch_file.Refused, match="builtins.Exception"):
        torch_file.load(tmp_path / "c.pt")


@pytest.mark.parametrize("obj,shown", [
    (Call(_glob("builtins.str"), b"x"), "builtins.str (called)"),
    (Call(_glob("builtins.int"), "7"), "builtins.int (called)"),
    (Call(_glob("typing.Any")), "typing.Any (called)"),
    (Call(_glob("builtins.bytes"), 10 ** 9), "builtins.bytes (called with arguments)"),
    (Call(_glob("builtins.set"), "abc"), "builtins.set (of 'abc', not a list)"),
    (Call(_glob("collections.OrderedDict"), [(1, 2)]), "collections.OrderedDict (called with arguments)"),
    (Call(_glob("_codecs.encode"), "x", "rot13"), "_codecs.encode (other than str -> latin1 bytes)"),
    (Call(_glob("torch.FloatStorage"), 10 ** 9), "torch.FloatStorage (called)"),
    (Call(_glob("numpy.dtype"), "O", False, True), "numpy.dtype('O')"),
    (Call(_glob("numpy.dtype"), "V8", False, True), "numpy.dtype('V8')"),
    (Call(_glob("numpy.dtype"), "<U4", False, True), "numpy.dtype('<U4')"),
    (Call(_glob("numpy.dtype"), [("a", "<f4")], False, True), "numpy.dtype([('a', '<f4')])"),
    (Call(_glob("numpy.dtype"), "f4,i4", False, True), "numpy.dtype('f4,i4')"),
    (Call(_glob("pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")), "ModelCheckpoint (called)"),
    (Call(_glob("\x1b[31mos.sys\x07tem"), "x"), "its pickle names \\x1b[31mos.sys\\x07tem, which"),
])
def test_an_allowed_name_does_only_what_it_is_for(tmp_path, obj, shown):
    """Builtin types, typing's names, the storage types and Lightning's callback classes are inert
    names (called, refused); set, bytes and OrderedDict take what their pickle takes and no more;
    numpy.dtype is a plain number type; a name is shown printable."""
    path, _ = stego(tmp_path / "n.ckpt", hp(obj))
    refused(path, "refused", shown)


def test_the_allowed_builders_give_plain_values(tmp_path):
    """defaultdict is a dict, bytes come through _codecs.encode, set/frozenset of a list, torch.Size
    a tuple, torch.device a string, numpy scalars of a plain dtype (BUILD's byte order taken on a
    new dtype: numpy's own is left as it was)."""
    scalar = _glob("numpy.core.multiarray.scalar")
    be = Call(_glob("numpy.dtype"), "f8", False, True, state=(3, ">", None, None, None, -1, -1, 0))
    le = Call(_glob("numpy.dtype"), "i4", False, True, state=(3, "<", None, None, None, -1, -1, 0))
    obj = {"dd": Call(_glob("collections.defaultdict"), _glob("builtins.list")), "b": b"\x00\xffab",
           "set": Call(_glob("builtins.set"), [1, 2]), "fs": Call(_glob("builtins.frozenset"), [(1, 2)]),
           "size": Call(_glob("torch.Size"), (2, 3)), "dev": Call(_glob("torch.device"), "cuda", 1),
           "f8": Call(scalar, be, struct.pack(">d", 2.5)), "i4": Call(scalar, le, struct.pack("<i", -7))}
    write(tmp_path / "b.pt", obj)
    got = torch_file.load(tmp_path / "b.pt")
    assert got["dd"] == {} and got["b"] == b"\x00\xffab" and got["set"] == {1, 2} and got["fs"] == frozenset({(1, 2)})
    assert got["size"] == (2, 3) and got["dev"] == "cuda:1" and got["f8"] == 2.5 and got["i4"] == -7
    assert np.dtype("f8").byteorder == "=" and np.dtype(">f8").byteorder == ">" and np.float64(1.0).dtype.isnative


# --------------------------------------------------------------------------------------------------
# Opcodes: BUILD, NEWOBJ, APPEND, keys
# --------------------------------------------------------------------------------------------------
EMPTY_DICT, EMPTY_LIST, MARK, BUILD = pickle.EMPTY_DICT, pickle.EMPTY_LIST, pickle.MARK, pickle.BUILD


@pytest.mark.parametrize("body,shown", [
    (EMPTY_DICT + EMPTY_DICT + BUILD, "sets the state of {}"),
    (EMPTY_LIST + EMPTY_DICT + BUILD, "sets the state of []"),
    (b"ctyping\nAny\nN}X\x02\x00\x00\x00fnctorch._utils\n_rebuild_parameter\ns\x86b", "sets the state of typing.Any"),
    (b"ctorch\nFloatStorage\n}b", "sets the state of FloatStorage"),
    (b"comegaconf.dictconfig\nDictConfig\n}b", "sets the state of <type>"),
    (b"cbuiltins\nset\n]\x85R}b", "sets the state of <set>"),
])
def test_build_reaches_only_the_readers_own_objects(tmp_path, body, shown):
    """BUILD (``__setstate__``, or pickle's own ``__dict__`` / slots update) on a dict, a list, a
    name (which would make ``typing.Any`` a builder), a storage type, an allowed class itself, a set:
    refused; on a tensor too (ndarray's ``__setstate__`` sets any dtype and bytes)."""
    write(tmp_path / "b.pt", raw=raw_pickle(body))
    with pytest.raises(torch_file.Unreadable, match=shown.replace("[", r"\[").replace("{", r"\{")):
        torch_file.load(tmp_path / "b.pt")
    path, _ = stego(tmp_path / "t.ckpt", HP, lambda s: s.update(x=Call(_glob("torch._utils._rebuild_parameter"),
                                                                   tensor("0", (1,)), state=(1, (3,)))))
    refused(path, "sets the state of an array (1,) of float32 (BUILD)")


def test_build_on_a_state_dict_keeps_its_metadata_only(tmp_path):
    od = Call(_glob("collections.OrderedDict"), state={"_metadata": {"": {"version": 1}}, "keys": 1, "items": 2})
    write(tmp_path / "s.pt", {"sd": od, "other": Call(_glob("collections.OrderedDict"))})
    got = torch_file.load(tmp_path / "s.pt")
    assert got["sd"]._metadata == {"": {"version": 1}} and list(got["sd"].keys()) == []
    assert "items" not in vars(got["sd"]) and "keys" not in vars(got["sd"])
    assert not hasattr(got["other"], "_metadata")


def test_newobj_and_append_reach_only_their_own_targets(tmp_path):
    """NEWOBJ makes objects of the reader's own classes only; APPEND(S) adds to lists only (pickle's
    own calls ``.append`` / ``.extend`` of whatever is on the stack)."""
    for body, shown in ((b"ctyping\nAny\n)\x81", r"makes an object of typing.Any \(NEWOBJ\)"),
                        (b"X\x01\x00\x00\x00a)\x81", r"makes an object of 'a' \(NEWOBJ\)"),
                        (EMPTY_DICT + MARK + b"K\x01e", r"adds entries to \{\}, not a list"),
                        (b"cbuiltins\nset\n]\x85RK\x01a", "adds entries to <set>, not a list"),
                        (b"ccollections\nOrderedDict\n)RK\x01a", r"adds entries to \{\}, not a list")):
        write(tmp_path / "o.pt", raw=raw_pickle(body))
        with pytest.raises(torch_file.Unreadable, match=shown):
            torch_file.load(tmp_path / "o.pt")
    node = b"comegaconf.nodes\nAnyNode\n)\x81}X\x04\x00\x00\x00_valK\x05sb"
    write(tmp_path / "o.pt", raw=raw_pickle(node + EMPTY_LIST + MARK + b"K\x01K\x02e" + b"K\x03a\x86"))
    node, lst = torch_file.load(tmp_path / "o.pt")
    assert torch_file.plain(node) == 5 and lst == [1, 2, 3]


def _nested_tuple(levels):
    t = (1,)
    for _ in range(levels):
        t = (t, t)
    return t


@pytest.mark.parametrize("key,shown", [
    (2 ** 100_000, "a dict key or set entry <an int of 100001 bits>"),
    (_nested_tuple(100), "nested more than 4 deep"),
    (tuple(range(1000)), "of more than 256 parts"),
], ids=["long-int", "nested-tuple", "wide-tuple"])
def test_a_key_that_takes_long_to_hash_is_refused(tmp_path, key, shown):
    """A dict key or set entry: an int past 64 bits, a tuple of more than 256 parts or nested past
    4 (a tuple holding one tuple twice, 100 times over, hashes in 2**100 steps)."""
    for obj in (Pairs([(key, 1)]), Pairs([("a", 1), (key, 2)]), Call(_glob("builtins.set"), [key]),
                Call(_glob("builtins.frozenset"), [1, key])):
        path, _ = stego(tmp_path / "k.ckpt", hp(obj))
        refused(path, shown)
    path, _ = stego(tmp_path / "k.ckpt", hp(Pairs([(_nested_tuple(2), 1), (2 ** 60, 2)])))
    assert imports.read(path).hyper_parameters["x"] == {"[[[1], [1]], [[1], [1]]]": 1, str(2 ** 60): 2}


# --------------------------------------------------------------------------------------------------
# Tensors: sizes, strides, offsets and the budget
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,shown", [
    (dict(size=(2, 3), stride=(5, 2), offset=1), "reaches element 10 of a storage of 10"),
    (dict(size=(1,), offset=10), "reaches element 10 of a storage of 10"),
    (dict(size=(2, 3), stride=(-1, 1), offset=4), "holds -1, not an integer >= 0"),
    (dict(size=(2,), stride=(1,), offset=-1), "holds -1, not an integer >= 0"),
    (dict(size=(4, 4), stride=(1, 1)), "more elements than its storage of 10"),
    (dict(size=(10 ** 6, 10 ** 6), stride=(10 ** 6, 1)), "past 4 x the file's size + 64 MiB"),
    (dict(size=(2 ** 40,), stride=(0,)), "past 4 x the file's size + 64 MiB"),
    (dict(size=(1,) * 40, stride=(1,) * 40), "not up to 32 integers"),
    (dict(size=(2, 3), stride=(3,)), "has strides (3)"),
    (dict(size=(True, 3), stride=(3, 1)), "holds True, not an integer"),
    (dict(size=(2.0, 3), stride=(3, 1)), "holds 2.0, not an integer"),
    (dict(size=(2, 3), numel=11), "storage x holds 10 elements, the pickle says 11"),
])
def test_a_tensor_must_lie_inside_its_storage(tmp_path, args, shown):
    """Offsets and strides are checked against the storage's length (no view past it, no
    negative stride, no more elements than the storage unless broadcast), and what is built is
    charged to the load's budget before it is."""
    path, _ = stego(tmp_path / "t.ckpt", HP, lambda s: s.update({"net.cluster1.0.bias": tensor("x", **args)}))
    refused(path, "not a readable torch checkpoint", shown)
    path, _ = stego(tmp_path / "t.ckpt", HP, lambda s: s.update({"decoder.bias": tensor("x", (2, 3), (3, 1), 4)}))
    assert imports.read(path).ignored == ["decoder.bias"]


def test_the_budget_counts_every_view_of_one_storage(tmp_path, monkeypatch):
    """A storage shared by many views is built once per view: the views are charged, so a small
    file cannot build gigabytes (here the slack is taken away, and 12 views of a 4 KiB storage
    are more than 4 x the file)."""
    store = {"0": np.zeros(1024, "<f4").tobytes()}
    write(tmp_path / "m.pt", [tensor("0", (1024,)) for _ in range(4)], store)
    monkeypatch.setattr(torch_file, "BUDGET_SLACK", 0)
    assert len(torch_file.load(tmp_path / "m.pt")) == 4
    write(tmp_path / "m.pt", [tensor("0", (1024,)) for _ in range(12)], store)
    with pytest.raises(torch_file.Unreadable, match="past 4 x the file's size"):
        torch_file.load(tmp_path / "m.pt")


@pytest.mark.parametrize("pid,shown", [
    (("storage", _glob("torch.FloatStorage"), "9", "cpu", 1), "storage 9 is not in the file"),
    (("storage", _glob("torch.float32"), "0", "cpu", 1), "storage 0 of an unknown type float32"),
    (("storage", "FloatStorage", "0", "cpu", 1), "storage 0 of an unknown type 'FloatStorage'"),
    (("storage", _glob("torch.FloatStorage"), "../0\n", "cpu", 1), r"a storage key '../0\\n'"),
    (("module", _glob("torch.FloatStorage"), "0", "cpu", 1), "an unknown persistent id ('module'"),
    (("storage", _glob("torch.DoubleStorage"), "3", "cpu", 1), "storage 3: 6 bytes are not whole DoubleStorage"),
])
def test_a_storage_must_be_one_of_the_zips(tmp_path, pid, shown):
    st = Stor("FloatStorage", "0", 1)
    st.pid = pid
    obj = Call(_glob("torch._utils._rebuild_tensor_v2"), st, 0, (1,), (1,), False, None)
    write(tmp_path / "p.pt", obj, {"0": b"\x00" * 40, "3": b"\x00" * 6})
    with pytest.raises(torch_file.Unreadable, match=shown.replace("(", r"\(")):
        torch_file.load(tmp_path / "p.pt")


# --------------------------------------------------------------------------------------------------
# plain(): shared references, cycles
# --------------------------------------------------------------------------------------------------
def _shared_list(levels):
    x = [1]
    for _ in range(levels):
        x = [x, x]
    return x


def test_plain_keeps_shared_values_and_refuses_cycles_and_blow_ups(tmp_path):
    """A list shared twice is read twice (the same values); a list that holds itself, a dict that
    holds itself and a config whose node is its own value are refused as cycles; a list holding
    one list twice, 40 times over (2**40 entries) and a 1 MB string shared 100 times (100 MB of
    JSON record) are refused by plain()'s budgets, each in one line naming the file."""
    shared = [1, "a"]
    path, _ = stego(tmp_path / "c.ckpt", hp({"p": shared, "q": [shared, shared]}))
    assert imports.read(path).hyper_parameters["x"] == {"p": [1, "a"], "q": [[1, "a"], [1, "a"]]}
    loop = [1]
    loop.append(loop)
    me = {"a": 1}
    me["me"] = me
    node = Call(_glob("omegaconf.nodes.AnyNode"), state={})
    node.state["_val"] = node
    cfg = dictconfig({"a": 1, "b": [2]})
    cfg._content["b"]._content[0]._val = cfg     # a list's node whose value is the config that holds it
    for x in (loop, me, node, cfg):
        path, _ = stego(tmp_path / "c.ckpt", hp(x))
        refused(path, "a config that holds itself")
    path, _ = stego(tmp_path / "c.ckpt", hp(_shared_list(40)))
    refused(path, "a config of more than 100000 entries")
    path, _ = stego(tmp_path / "c.ckpt", hp(["y" * 1_000_000] * 100))
    refused(path, "a config of more than 16777216 characters")
    big = 2 ** 300
    path, _ = stego(tmp_path / "c.ckpt", hp([big, float("inf")]))
    assert imports.read(path).hyper_parameters["x"] == ["<an int of 301 bits>", "inf"]


# --------------------------------------------------------------------------------------------------
# The zip
# --------------------------------------------------------------------------------------------------
def test_zip_entries_are_stored_and_bounded(tmp_path, monkeypatch):
    good, _ = stego(tmp_path / "good.ckpt", HP)
    imports.read(good)
    # compressed (a zip bomb is a small deflated entry)
    write(tmp_path / "z.ckpt", {"a": 1}, compress=True)
    refused(tmp_path / "z.ckpt", "archive/data.pkl is compressed")
    # an entry that says it is larger than the file (the control: the same entries saying their size)
    pkl = dumps(tensor("0", (1,), kind="ByteStorage"))

    def sizes(pkl_size, storage_size):
        head = _local("archive/data.pkl", pkl, pkl_size)
        body = head + _local("archive/data/0", b"\7" * 8, storage_size)
        return _raw_zip(tmp_path / "big.ckpt", body, [("archive/data.pkl", pkl, 0, pkl_size),
                                                      ("archive/data/0", b"\7" * 8, len(head), storage_size)])

    assert torch_file.load(sizes(None, None)).tolist() == [7]
    refused(sizes(10 ** 9, None), "archive/data.pkl is 1000000000 bytes, more than the")
    refused(sizes(None, 10 ** 9), "storage 0: the storages read add up to more than the file's")
    # a damaged entry (a bad CRC) and a cut file
    data = bytearray(good.read_bytes())
    i = data.index(b"net.cluster1")
    data[i] ^= 1
    (tmp_path / "crc.ckpt").write_bytes(bytes(data))
    refused(tmp_path / "crc.ckpt", "a damaged zip archive: archive/data.pkl (BadZipFile: Bad CRC-32")
    (tmp_path / "cut.ckpt").write_bytes(good.read_bytes()[:-30])
    refused(tmp_path / "cut.ckpt", "not a zip archive")
    # not one data.pkl, a pickle past its limit, a byteorder of neither
    with zipfile.ZipFile(tmp_path / "two.ckpt", "w") as z:
        z.writestr("a/data.pkl", raw_pickle(EMPTY_DICT))
        z.writestr("b/data.pkl", raw_pickle(EMPTY_DICT))
    refused(tmp_path / "two.ckpt", "without exactly one <name>/data.pkl")
    write(tmp_path / "bo.ckpt", {"a": 1}, byteorder="middle\x1b")
    refused(tmp_path / "bo.ckpt", r"byteorder b'middle\x1b'")
    monkeypatch.setattr(torch_file, "MAX_PICKLE", 100)
    refused(good, "archive/data.pkl is", "more than the 100 it may be")


def test_the_central_directory_is_bounded_before_zipfile_reads_it(tmp_path, monkeypatch):
    """zipfile makes an object of every entry of the central directory: its size and the number
    of entries its end record gives are checked first (here with the limits lowered)."""
    good, _ = stego(tmp_path / "good.ckpt", HP)        # data.pkl, byteorder and 10 storages
    n = len(zipfile.ZipFile(good).namelist())
    monkeypatch.setattr(torch_file, "MAX_MEMBERS", n - 1)
    refused(good, "central directory is", f"for {n} entries, more than this reader reads")
    monkeypatch.setattr(torch_file, "MAX_MEMBERS", n)
    imports.read(good)
    monkeypatch.setattr(torch_file, "MAX_DIRECTORY", 500)
    refused(good, "central directory is", f"bytes for {n} entries")


def test_overlapping_entries_cannot_multiply_the_file(tmp_path):
    """Zip entries may overlap (each local header inside the previous entry's data, each entry
    running to the end): 12 storages of a 16 KiB payload read 200 KiB from a 20 KiB file. The
    storages read may add up to the file's size, no more."""
    payload = bytes(range(256)) * 64

    def nested(path, n):
        names = [f"archive/data/{k:02d}" for k in range(n)]
        pkl = dumps([tensor(f"{k:02d}", (1,), kind="ByteStorage") for k in range(n)])
        datas, tail = [], payload
        for name in reversed(names):              # each entry: the next ones' headers and the payload
            datas.insert(0, tail)
            tail = _local(name, tail)
        head = _local("archive/data.pkl", pkl)
        records, at = [("archive/data.pkl", pkl, 0, None)], len(head)
        for name, data in zip(names, datas):
            records.append((name, data, at, None))
            at += 30 + len(name)
        return _raw_zip(path, head + tail, records)

    ok = torch_file.load(nested(tmp_path / "one.ckpt", 1))
    assert ok[0].tolist() == [0]
    p = nested(tmp_path / "many.ckpt", 12)
    with zipfile.ZipFile(p) as z:                  # zipfile reads every entry, each to the file's end
        assert sum(len(z.read(n)) for n in z.namelist() if "/data/" in n) > 8 * p.stat().st_size
    refused(p, "the storages read add up to more than the file's")


# --------------------------------------------------------------------------------------------------
# The conversion: one line whatever the file holds
# --------------------------------------------------------------------------------------------------
def test_what_the_state_dict_and_the_settings_hold_is_checked(tmp_path):
    """State-dict keys are strings and values tensors; a head weight has its dimensions; a stored
    setting that is no string is shown, not repr()'d; Lightning's step and version, when odd, are
    left out with a note; a hyper-parameter that Config cannot take (an int past a float) is one
    line."""
    path, _ = stego(tmp_path / "a.ckpt", HP, lambda s: s.update({3: tensor("0", (1,))}))
    refused(path, "its state dict has the key 3, not a string")
    path, _ = stego(tmp_path / "a.ckpt", HP, lambda s: s.update({"decoder.weight": "x" * 500}))
    refused(path, "its state dict's decoder.weight is 'xxxx", "not a tensor")
    path, _ = stego(tmp_path / "a.ckpt", HP, lambda s: s.update({"net.cluster1.0.weight": tensor("0", (3, 4))}))
    refused(path, "net.cluster1.0.weight has shape (3, 4), expected 4 dimensions")
    path, _ = stego(tmp_path / "a.ckpt", HP, lambda s: s.update({"cluster_probe.clusters": tensor("0", (12,))}))
    refused(path, "cluster_probe.clusters has shape (12,), expected 2 dimensions")
    path, _ = stego(tmp_path / "a.ckpt", {"n_classes": 2, "cfg": {"dino_feat_type": ["KK"] * 1000}})
    refused(path, "its stored dino_feat_type = ['KK', 'KK',")
    path, _ = stego(tmp_path / "a.ckpt", {"n_classes": 2, "cfg": {"neg_inter_shift": 10 ** 400}})
    refused(path, "give no valid omh-ref config")
    path, _ = stego(tmp_path / "a.ckpt", HP, **{"epoch": -1, "pytorch-lightning_version": "\x1b" * 100})
    imp = imports.read(path)
    assert imp.lightning == {"global_step": 10} and len(imp.notes) == 2 and all(n.isprintable() for n in imp.notes)
    assert "its Lightning epoch is -1, left out" in imp.notes[0]


def test_an_error_no_check_foresaw_is_one_line_too(tmp_path, monkeypatch):
    path, _ = stego(tmp_path / "a.ckpt", HP)

    def boom(obj, p):
        raise KeyError("\x1b[2J" + "k" * 10_000)

    monkeypatch.setattr(peers, "convert", boom)
    refused(path, "not a readable torch checkpoint (KeyError: \\x1b[2Jkkk")


def test_the_command_line_says_one_line(tmp_path):
    """``omh-ref import`` of a crafted file: exit 2, one ``error:`` line naming it, no traceback."""
    made = tmp_path / "made"
    past = tensor("x", (2, 3), (5, 2), 1)
    files = [stego(tmp_path / "e.ckpt", hp(Call(_glob("os.mkdir"), str(made))))[0],
             write(tmp_path / "b.ckpt", raw=raw_pickle(EMPTY_DICT + EMPTY_DICT + BUILD)),
             stego(tmp_path / "s.ckpt", HP, lambda s: s.update({"net.cluster1.0.bias": past}))[0]]
    for path in files:
        res = CliRunner().invoke(main, ["import", str(path), "--out", str(tmp_path / "out")])
        lines = res.output.strip().splitlines()
        assert res.exit_code == 2 and "Traceback" not in res.output and len(lines) == 1, res.output
        assert lines[0].startswith(f"error: {path}: "), lines
    assert not made.exists() and not os.path.exists(tmp_path / "out" / "ckpt.npz")
