"""Backend: namespace selection, device validation, seeded generators, stable logsumexp."""
import numpy as np
import pytest

from omh_ref.core import backend


class _FakeCupyArray:
    """Looks like a cupy array to get_array_module (its type lives in a 'cupy' module)."""
    shape = (2,)
    dtype = np.dtype(np.float64)


_FakeCupyArray.__module__ = "cupy._core.core"


def test_numpy_inputs_pick_numpy():
    assert backend.get_array_module(np.zeros(2), 1.0, None) is np


def test_mixed_numpy_and_cupy_rejected():
    with pytest.raises(ValueError, match="mixed numpy and cupy"):
        backend.get_array_module(np.zeros(2), _FakeCupyArray())


@pytest.mark.parametrize("device", ["tpu", "cuda", ""])
def test_unknown_device(device):
    with pytest.raises(ValueError, match="--device"):
        backend.resolve_device(device)


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is present")
def test_gpu_without_cupy_device_is_a_clear_error():
    with pytest.raises(ValueError, match="--device gpu"):
        backend.resolve_device("gpu")


def test_to_device_cpu_round_trip():
    d = {"a": np.arange(3.0), "b": {"c": np.ones(2)}}
    out = backend.to_device(d, "cpu")
    assert np.array_equal(out["a"], d["a"]) and np.array_equal(out["b"]["c"], d["b"]["c"])


def test_seeded_generators_repeat():
    a = backend.random_normal(backend.make_rng(3), (4,), np.zeros(1, np.float32))
    b = backend.random_normal(backend.make_rng(3), (4,), np.zeros(1, np.float32))
    assert a.dtype == np.float32 and np.array_equal(a, b)
    g = np.random.default_rng(1)
    assert backend.make_rng(g) is g


def test_logsumexp_stable():
    x = np.array([[1000.0, 1000.0], [-1000.0, -np.inf], [-np.inf, -np.inf]])
    out = backend.logsumexp(x, axis=-1)
    np.testing.assert_allclose(out[:2], [1000.0 + np.log(2.0), -1000.0])
    assert out[2] == -np.inf and not np.isnan(out).any()
