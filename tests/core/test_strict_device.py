"""The strict CuPy stand-in (omh_ref.core.strict_device): it refuses what CuPy refuses, counts
what CuPy synchronises on, and computes what NumPy computes. Then the planted mistakes it exists
to catch: each must fail on it and pass on NumPy."""
import io
import json
import pickle

import numpy as np
import pytest

from omh_ref.core import backend, cupy_names, fixtures, model
from omh_ref.core import strict_device as sd


@pytest.fixture
def xp():
    with backend.strict_device() as sxp:
        sd.reset_conversions()
        sd.reset_ops()
        yield sxp


def test_device_arrays_are_not_numpy_and_numpy_asks_for_get(xp):
    x = xp.asarray(np.arange(6.0).reshape(2, 3))
    assert not isinstance(x, np.ndarray) and isinstance(x, xp.ndarray)
    assert backend.get_array_module(x) is xp and backend.resolve_device("gpu") == "gpu"
    for convert in (np.asarray, np.array, np.asanyarray):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
            convert(x)
    np.savez(io.BytesIO(), a=x)                    # cupy.savez copies to the host: it works, and syncs
    assert [w for w, _ in sd.conversions()] == ["savez"]
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(x)
    with pytest.raises(TypeError):
        json.dumps({"x": x})
    from scipy.optimize import linear_sum_assignment
    with pytest.raises(TypeError, match="Implicit conversion"):
        linear_sum_assignment(x)
    assert np.array_equal(backend.to_host(x), np.arange(6.0).reshape(2, 3))


def test_a_host_array_in_a_device_operation_raises_but_host_indices_and_values_are_copied(xp):
    x, host = xp.zeros((2, 3)), np.ones((2, 3))
    for mixed in (lambda: x + host, lambda: host * x, lambda: xp.maximum(x, host),
                  lambda: np.concatenate([x, host]), lambda: xp.where(x > 0, x, host)):
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            mixed()
    x[np.array([1])] = np.array([5.0, 6.0, 7.0])          # CuPy copies host indices and values over
    assert backend.to_host(x[np.array([1, 0])]).tolist() == [[5.0, 6.0, 7.0], [0.0, 0.0, 0.0]]
    assert type(x + 1.0) is sd.StrictArray and type(x * np.float32(2)) is sd.StrictArray   # scalars are fine


def test_only_cupys_functions_ufuncs_and_random_names_exist(xp):
    x = xp.asarray(np.linspace(0.1, 1.0, 5))
    assert "insert" not in cupy_names.NAMESPACES[""] and "spacing" not in cupy_names.UFUNCS
    with pytest.raises(TypeError, match="no implementation found"):
        np.insert(x, 0, 1.0)                       # NumPy has it, CuPy does not
    with pytest.raises(TypeError, match="cupy has no ufunc spacing"):
        np.spacing(x)
    with pytest.raises(AttributeError):
        xp.nanquantile
    with pytest.raises(AttributeError):
        xp.random.Generator                        # CuPy's random has no Generator class
    assert callable(xp.random.standard_normal) and callable(xp.linalg.norm)
    # what CuPy has works and stays on the device, reductions included (0-d arrays, not scalars)
    assert type(np.sum(x)) is sd.StrictArray and np.sum(x).shape == ()
    assert type(np.linalg.norm(x)) is sd.StrictArray and type(xp.exp(x)) is sd.StrictArray
    with pytest.raises(AttributeError):
        x.ctypes                                   # a NumPy-only attribute of ndarray


def test_host_conversions_are_counted_with_their_call_site(xp):
    x = xp.asarray(np.array([1.5, 2.5]))
    line = test_host_conversions_are_counted_with_their_call_site.__code__.co_firstlineno + 3
    float(x[0]), bool(x[1] > 2), x.tolist(), backend.to_host(x), xp.asnumpy(x)
    assert [w for w, _ in sd.conversions()] == ["float", "bool", "tolist", "get", "asnumpy"]
    assert all(site.endswith(f"test_strict_device.py:{line}") for _, site in sd.conversions()), sd.conversions()
    with pytest.raises(TypeError):
        range(x[0].astype(np.int64))               # no __index__: a device integer is not a Python int


def test_a_copy_to_the_device_is_a_copy(xp):
    """As with CuPy, writing into the device array leaves the host array alone (a stand-in whose
    asarray aliased the host memory hid in-place updates of arrays the caller still held)."""
    host = np.zeros(3)
    dev = xp.asarray(host)
    dev += 1.0
    dev[0] = 5.0
    assert host.tolist() == [0.0, 0.0, 0.0] and backend.to_host(dev).tolist() == [5.0, 1.0, 1.0]


def test_kernels_are_counted_by_name_and_views_launch_none(xp):
    x = xp.asarray(np.arange(12.0).reshape(3, 4))
    sd.reset_ops()
    y = x * 2.0 + 1.0                               # two ufunc calls: two kernels
    y += x                                          # in place: one more
    s = y.sum(-1)                                   # a reduction: one
    _views = (y.T, y.reshape(4, 3), y[1:], y[:, None], xp.expand_dims(y, 0), xp.swapaxes(y, 0, 1))
    g = y[xp.asarray(np.array([2, 0]))]            # a gather: one kernel, and one copy from the host
    y[0] = 0.0                                      # an assignment: one
    c = xp.concatenate([y, y])                      # one
    assert sd.ops() == {"multiply": 1, "add": 2, "sum": 1, "getitem": 1, "host->device": 1, "setitem": 1,
                        "concatenate": 1}
    assert sd.kernels() == 7 and s.shape == (3,) and g.shape == (2, 4) and c.shape == (6, 4)
    with backend.fusing("axpy"):                   # a fused block counts once, whatever it does
        (x * 3.0 + y).sum()
    assert sd.ops()["fused:axpy"] == 1 and sd.kernels() == 8


def test_list_operands_are_refused_one_element_is_a_view_and_out_is_a_kernel(xp):
    """Three places the stand-in once differed from CuPy: a list or tuple operand of a ufunc
    (CuPy's kernels refuse it), one element of an array (CuPy gives a 0-d view, so writing into it
    writes into the array), and a function writing into ``out=`` (a kernel, not a view)."""
    x = xp.asarray(np.arange(4.0))
    for bad in (lambda: x + [1.0, 2.0, 3.0, 4.0], lambda: xp.maximum(x, (0.0, 5.0, 0.0, 5.0))):
        with pytest.raises(TypeError, match="Unsupported type <class '(list|tuple)'>"):
            bad()
    assert backend.to_host(xp.concatenate([x, x])).shape == (8,)      # a list of arrays for a function is fine
    sd.reset_ops()
    one = x[1]
    one += 100.0
    assert backend.to_host(x).tolist() == [0.0, 101.0, 2.0, 3.0] and sd.ops() == {"add": 1}
    y = xp.zeros(4)
    sd.reset_ops()
    xp.cumsum(x, out=y)
    assert sd.ops() == {"cumsum": 1}


def test_the_stand_in_is_only_the_gpu_inside_the_block():
    with backend.strict_device():
        assert backend.gpu_available()
    assert backend.xp_for("cpu") is np
    if not backend.gpu_available():
        with pytest.raises(ValueError, match="--device gpu"):
            backend.resolve_device("gpu")


def _step(cfg, seed=0):
    rng = np.random.default_rng(seed)
    params = model.init_params(cfg, rng, dtype=np.float64)
    batch = fixtures.random_batch(cfg, rng, dtype=np.float64)
    return params, batch


@pytest.mark.parametrize("over", [{}, {"omh": False}, {"cluster_target": "balanced", "marginals": "uniform"}])
def test_a_training_step_on_the_stand_in_is_the_numpy_step(over, xp):
    cfg = fixtures.small_config(**over)
    params, batch = _step(cfg)
    want = model.loss_and_grads(params, batch, cfg, np.random.default_rng(1))
    got = model.loss_and_grads(backend.to_device(params, "gpu"), backend.to_device(batch, "gpu"), cfg,
                               np.random.default_rng(1))
    assert sd.conversions() == []
    assert float(backend.to_host(got[0])) == float(want[0])
    for k in want[2]:
        assert np.array_equal(backend.to_host(got[2][k]), want[2][k]), k


# ---- planted mistakes: each passes on NumPy and fails on the stand-in --------------------------
def _plant(monkeypatch, module, name, wrap):
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: wrap(real, *a, **k))


def test_a_planted_np_asarray_in_a_loss_fails(monkeypatch):
    from omh_ref.core.losses import correlation

    _plant(monkeypatch, correlation, "forward", lambda real, *a, **k: (np.asarray(a[0]), real(*a, **k))[1])
    cfg = fixtures.small_config()
    params, batch = _step(cfg)
    model.loss_and_grads(params, batch, cfg, np.random.default_rng(1))         # NumPy: unnoticed
    with backend.strict_device():
        with pytest.raises(TypeError, match="Implicit conversion"):
            model.loss_and_grads(backend.to_device(params, "gpu"), backend.to_device(batch, "gpu"), cfg,
                                 np.random.default_rng(1))


def test_a_planted_host_array_in_the_linear_probe_fails(monkeypatch, tmp_path):
    from omh_ref.evaluate import probe
    from tests.builders import known_world

    store, _ = known_world(tmp_path)
    cfg = fixtures.small_config(in_dim=store.C)
    params = model.init_params(cfg, np.random.default_rng(0))
    _plant(monkeypatch, probe, "loss_and_grads",
           lambda real, pr, z, *a, **k: real(pr, z + np.zeros(z.shape, dtype=z.dtype), *a, **k))
    probe.linear_probe(params, store, 3, epochs=1, progress=False, cfg=cfg)     # NumPy: unnoticed
    with backend.strict_device():
        with pytest.raises(TypeError, match="Unsupported type <class 'numpy.ndarray'>"):
            probe.linear_probe(backend.to_device(params, "gpu"), store, 3, epochs=1, progress=False, device="gpu",
                               cfg=cfg)
