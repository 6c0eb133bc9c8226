"""Adam (omh_ref.core.optim): one in-place update per parameter, guarded by a device flag; on
CuPy each parameter's update is one fused kernel (and each gradient's squared sum one reduction)
computing the NumPy rendering's operations in the same order, so every device gives NumPy's bits."""
import numpy as np
import pytest

from omh_ref.core import backend
from omh_ref.core import strict_device as sd
from omh_ref.core.optim import adam_init, adam_step, squared_norm


def _problem(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    shapes = {"W1": (5, 3), "b1": (5,), "M0": (7, 5)}
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    grads = [{k: (rng.standard_normal(s) * 10.0 ** rng.integers(-4, 3)).astype(dtype) for k, s in shapes.items()}
             for _ in range(4)]
    return params, grads


def _reference(params, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam's formula written out, float64: what every device's steps approach."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads_seq, 1):
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            p[k] -= lr[k] * (m[k] / (1 - b1 ** t)) / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("guarded", [False, True])
def test_adam_on_every_device_gives_numpys_bits_and_adams_numbers(xp, guarded):
    params, grads = _problem()
    lr = {"W1": 3e-4, "b1": 3e-4, "M0": 7e-3}
    host = {k: v.copy() for k, v in params.items()}
    host_state = adam_init(host)
    dev = backend.to_device(params, "gpu") if xp is not np else {k: v.copy() for k, v in params.items()}
    dev_state = adam_init(dev)
    for g in grads:
        adam_step(host, g, host_state, lr)
        gd = backend.to_device(g, "gpu") if xp is not np else g
        adam_step(dev, gd, dev_state, lr, ok=xp.asarray(True) if guarded else None)
    for k in params:
        assert np.array_equal(backend.to_host(dev[k]), host[k]), k
        for s in ("m", "v"):
            assert np.array_equal(backend.to_host(dev_state[s][k]), host_state[s][k]), (s, k)
    want = _reference(params, grads, lr)
    for k in params:   # float32 steps against float64 Adam: a few ulps of a step of size lr
        np.testing.assert_allclose(host[k], want[k], rtol=0, atol=1e-6)


def test_a_step_with_ok_false_or_a_nan_gradient_changes_nothing_bit_for_bit(xp):
    params, grads = _problem(1)
    to = (lambda d: backend.to_device(d, "gpu")) if xp is not np else (lambda d: {k: v.copy() for k, v in d.items()})
    dev = to(params)
    state = adam_init(dev)
    ok = adam_step(dev, to(grads[0]), state, 1e-3, ok=xp.asarray(True))
    before = [{k: backend.to_host(v).copy() for k, v in d.items()} for d in (dev, state["m"], state["v"])]
    poisoned = dict(grads[1], b1=np.full(5, np.nan, np.float32))
    ok = adam_step(dev, to(poisoned), state, 1e-3, ok=ok)
    assert not bool(backend.to_host(ok))
    ok = adam_step(dev, to(grads[2]), state, 1e-3, ok=ok)   # frozen from the first bad step on
    assert not bool(backend.to_host(ok))
    for now, then in zip((dev, state["m"], state["v"]), before):
        for k in now:
            assert np.array_equal(backend.to_host(now[k]), then[k]), k


def test_squared_norm_is_the_sum_of_squares_and_flags_an_overflow(xp):
    g = {"a": np.array([1.0, -2.0], np.float32), "b": np.full((2, 2), 3.0, np.float32)}
    dev = backend.to_device(g, "gpu") if xp is not np else g
    assert float(backend.to_host(squared_norm(dev))) == 41.0
    big = dict(g, a=np.array([1e20, 0.0], np.float32))          # finite, but its square is not
    dev = backend.to_device(big, "gpu") if xp is not np else big
    assert not np.isfinite(float(backend.to_host(squared_norm(dev))))


def test_on_the_device_an_adam_step_is_one_kernel_a_parameter_and_one_reduction_a_gradient():
    params, grads = _problem(2)
    with backend.strict_device() as xp:
        dev, g = backend.to_device(params, "gpu"), backend.to_device(grads[0], "gpu")
        state, ok = adam_init(dev), xp.asarray(True)
        sd.reset_ops()
        adam_step(dev, g, state, 1e-3, ok=ok)
        ops = sd.ops()
    n = len(params)
    assert ops["fused:adam"] == n and ops["fused:squared_sum"] == n
    # the rest: stacking and summing the squared sums, isfinite, and-ing it into ok, the True
    assert sd.kernels(ops) == 2 * n + 4, ops
