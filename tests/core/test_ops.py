"""Property tests of every op: gradients against finite differences (float64), invariants, and
float32 / CuPy results against float64."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from omh_ref.core.backend import to_host
from omh_ref.core.gradcheck import TOLERANCES, check_vjp
from omh_ref.core.ops import (cosine, dropout, grid_sample, kl, linear, log_softmax, normalize, relu, silu,
                         resize, softmax)
from tests.strategies import arrays, dims, grid, seeds, small

F32 = TOLERANCES["float32"]


@given(x=grid(), D=dims, seed=seeds)
def test_linear_grad(x, D, seed):
    rng = np.random.default_rng(seed)
    W, b = rng.standard_normal((D, x.shape[-1])), rng.standard_normal(D)
    assert check_vjp(linear.forward, linear.backward, (x, W, b), seed=seed).passed


@given(x=grid(), seed=seeds)
def test_relu_grad(x, seed):
    x = x + 1e-3 * np.sign(x) + (x == 0) * 1e-3  # keep every entry off the kink at 0
    assert check_vjp(relu.forward, relu.backward, (x,), seed=seed).passed


@given(x=grid(), seed=seeds)
def test_silu_grad(x, seed):
    assert check_vjp(silu.forward, silu.backward, (3 * x,), seed=seed).passed


def test_silu_is_x_sigmoid_x_without_overflow(xp):
    x = np.array([-1000.0, -30.0, -1.0, 0.0, 1.0, 30.0, 1000.0], np.float32)
    y = to_host(silu.forward(xp.asarray(x))[0])
    with np.errstate(over="ignore"):
        want = x / (1 + np.exp(-x.astype(np.float64)))
    assert np.isfinite(y).all() and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-30)


@given(x=grid(), p=st.floats(0.05, 0.9), seed=seeds)
def test_channel_dropout(x, p, seed):
    rng = np.random.default_rng(seed)
    y, mask = dropout.forward(x, p, rng)
    N, C = x.shape[0], x.shape[-1]
    assert mask.shape == (N, 1, 1, C)
    # whole channels are dropped or kept and scaled by 1/(1-p)
    assert set(np.unique(mask)) <= {0.0, 1.0 / (1.0 - p)}
    np.testing.assert_array_equal(y, x * mask)
    assert check_vjp(lambda x: dropout.forward(x, p, mask=mask), dropout.backward, (x,), seed=seed).passed


def test_dropout_identity_in_eval_and_untouched_rng():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 3, 5))
    state = rng.bit_generator.state
    y, cache = dropout.forward(x, 0.5, rng, training=False)
    assert y is x and cache is None and rng.bit_generator.state == state


@given(x=grid(), seed=seeds)
def test_normalize_grad_and_unit_norm(x, seed):
    x = x + 0.1  # away from the zero vector, where the map jumps
    y, _ = normalize.forward(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-12)
    assert check_vjp(normalize.forward, normalize.backward, (x,), seed=seed).passed


def test_normalize_zero_vector_is_finite():
    x = np.zeros((2, 4))
    x[1] = [1.0, 2.0, 0.0, -1.0]
    y, cache = normalize.forward(x)
    dx = normalize.backward(np.random.default_rng(0).standard_normal(x.shape), cache)
    assert np.all(y[0] == 0) and np.all(np.isfinite(y)) and np.all(np.isfinite(dx))


@given(z=arrays((5, 3)), M=arrays((4, 3)), seed=seeds)
def test_cosine_grad_and_range(z, M, seed):
    s, _ = cosine.forward(z, M)
    assert np.all(np.abs(s) <= 1 + 1e-12)
    z, M = z + 0.1, M + 0.1
    assert check_vjp(cosine.forward, cosine.backward, (z, M), seed=seed).passed


def test_cosine_zero_code_gives_zero_logits():
    s, _ = cosine.forward(np.zeros((2, 3)), np.ones((5, 3)))
    assert np.all(s == 0)


@pytest.mark.parametrize("mod", [softmax, log_softmax])
@given(x=arrays((small, dims), -30, 30), tau=st.sampled_from([0.05, 0.1, 1.0]), seed=seeds)
def test_softmax_family(mod, x, tau, seed):
    out, _ = mod.forward(x, tau)
    p = out if mod is softmax else np.exp(out)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-12)
    assert np.all(np.isfinite(out))
    assert check_vjp(lambda x: mod.forward(x, tau), mod.backward, (x,), seed=seed).passed


@given(K=dims, seed=seeds)
def test_kl_grad_and_invariants(K, seed):
    rng = np.random.default_rng(seed)
    q = rng.random((5, K)) + 0.01
    q /= q.sum(-1, keepdims=True)
    p = rng.random((5, K)) + 0.01
    p /= p.sum(-1, keepdims=True)
    val, _ = kl.forward(q, np.log(p))
    assert np.all(val >= -1e-15)
    np.testing.assert_allclose(kl.forward(q, np.log(q))[0], 0.0, atol=1e-15)
    assert check_vjp(kl.forward, kl.backward, (q, np.log(p)), seed=seed).passed


def test_kl_underflowed_q_is_finite():
    q = np.array([[1.0, 0.0, 0.0]])
    val, cache = kl.forward(q, np.log(np.array([[0.5, 0.25, 0.25]])))
    dq, dlogp = kl.backward(np.ones(1), cache)
    np.testing.assert_allclose(val, np.log(2.0))
    assert np.all(np.isfinite(dq)) and np.all(np.isfinite(dlogp))


@given(x=grid(), S1=small, S2=small, seed=seeds)
def test_grid_sample_grad(x, S1, S2, seed):
    coords = np.random.default_rng(seed).uniform(-1.2, 1.2, size=(x.shape[0], S1, S2, 2))
    assert check_vjp(lambda x: grid_sample.forward(x, coords), grid_sample.backward, (x,), seed=seed).passed


@given(x=grid())
def test_grid_sample_hits_pixels_and_clamps_border(x):
    N, H, W, C = x.shape
    i, j = H - 1, W // 2
    # align_corners=True: -1 and 1 are the centres of the corner pixels; (x, y) order.
    coords = np.array([[[[2 * j / (W - 1) - 1, 2 * i / (H - 1) - 1], [-1.0, -1.0]],
                        [[5.0, -7.0], [1.0, 1.0]]]] * N)
    y, _ = grid_sample.forward(x, coords)
    np.testing.assert_allclose(y[:, 0, 0], x[:, i, j], atol=1e-12)
    np.testing.assert_allclose(y[:, 0, 1], x[:, 0, 0], atol=1e-12)
    np.testing.assert_allclose(y[:, 1, 0], x[:, 0, W - 1], atol=1e-12)  # border padding
    np.testing.assert_allclose(y[:, 1, 1], x[:, H - 1, W - 1], atol=1e-12)


@given(x=grid(), Ho=dims, Wo=st.integers(1, 9), seed=seeds)
def test_resize_grad(x, Ho, Wo, seed):
    assert check_vjp(lambda x: resize.forward(x, (Ho, Wo)), resize.backward, (x,), seed=seed).passed


@given(x=grid())
def test_resize_same_size_is_identity_and_constant_preserved(x):
    np.testing.assert_allclose(resize.forward(x, x.shape[1:3])[0], x, atol=1e-12)
    c = np.full_like(x, 2.5)
    np.testing.assert_allclose(resize.forward(c, (7, 3))[0], 2.5, atol=1e-12)


def test_resize_upsample_by_two_matches_half_pixel_rule():
    # align_corners=False, 2 -> 4: output pixel centres at source 0-0.25 (clamped to 0), 0.25, 0.75, 1.25->1
    x = np.array([0.0, 1.0]).reshape(1, 2, 1, 1)
    y = resize.forward(x, (4, 1))[0].ravel()
    np.testing.assert_allclose(y, [0.0, 0.25, 0.75, 1.0])


CASES = {
    "linear": lambda r: (linear.forward, (r(3, 5, 7), r(4, 7), r(4))),
    "normalize": lambda r: (normalize.forward, (r(3, 5, 7),)),
    "cosine": lambda r: (cosine.forward, (r(3, 5, 7), r(6, 7))),
    "log_softmax": lambda r: (lambda x: log_softmax.forward(x, 0.1), (r(3, 7),)),
    "softmax": lambda r: (lambda x: softmax.forward(x, 0.1), (r(3, 7),)),
    "grid_sample": lambda r: (grid_sample.forward, (r(2, 5, 4, 3), np.tanh(r(2, 3, 5, 2)))),
    "resize": lambda r: (lambda x: resize.forward(x, (7, 3)), (r(2, 5, 4, 3),)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_and_device_match_float64(name, xp):
    rng = np.random.default_rng(7)
    fwd, args = CASES[name](lambda *s: rng.standard_normal(s))
    ref = fwd(*args)[0]
    for dtype in (np.float32, np.float64):
        out = to_host(fwd(*[xp.asarray(a, dtype=dtype) for a in args])[0])
        assert out.dtype == dtype  # no silent upcast or downcast
        np.testing.assert_allclose(out, ref, rtol=F32["rtol"], atol=F32["atol"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_grid_sample_kernels_give_numpys_bits(xp, dtype):
    """On CuPy the sampling and its interpolation matrix are one kernel each (on NumPy and the
    stand-in, the array expressions): the same operations in the same order, so the same bits,
    border clamps, chosen images and both axes' corners included."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((4, 5, 3, 6)).astype(dtype)
    coords = rng.uniform(-1.2, 1.2, size=(3, 2, 7, 2)).astype(dtype)
    coords[0, 0, :3] = [[-1, -1], [1, 1], [0.5, -1]]                 # exact corners and edges
    idx = np.array([2, 0, 3])
    for images in (None, idx):
        xs = x[:3] if images is None else x
        y, cache = grid_sample.forward(xs, coords, images=images)
        dev = grid_sample.forward(xp.asarray(xs), xp.asarray(coords),
                                  images=None if images is None else xp.asarray(images))[0]
        assert np.array_equal(to_host(dev), y)
    c = coords.reshape(3, 14, 2)
    assert np.array_equal(to_host(grid_sample.interpolation_matrix(xp.asarray(c), 5, 3)),
                          grid_sample.interpolation_matrix(c, 5, 3))


def test_grid_sample_of_chosen_images_is_sampling_their_copy():
    """``images=idx`` samples x[idx] without copying it: the same values and gradients."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 5, 3, 6))
    idx = np.array([2, 0, 3])
    coords = rng.uniform(-1.1, 1.1, size=(3, 2, 4, 2))
    y, cache = grid_sample.forward(x, coords, images=idx)
    want, wcache = grid_sample.forward(x[idx], coords)
    assert np.array_equal(y, want)
    dy = rng.standard_normal(y.shape)
    assert np.array_equal(grid_sample.backward(dy, cache), grid_sample.backward(dy, wcache))
    assert check_vjp(lambda x: grid_sample.forward(x, coords, images=idx),
                     lambda d, c: _scatter(grid_sample.backward(d, c), idx, x.shape), (x,)).passed


def _scatter(d_sel, idx, shape):
    out = np.zeros(shape)
    np.add.at(out, idx, d_sel)
    return out
