"""Bilinear grid sampling, as torch's ``grid_sample(align_corners=True, padding_mode="border")``.

Bilinear interpolation with border padding is separable into two "hat" weight vectors,
``w(i) = max(0, 1 − |u − i|)`` with the source coordinate u clipped to [0, size−1]. Their outer
product is each sample's row of a dense interpolation matrix (N, P, H·W), so the forward pass is one
batched matmul and the backward its transpose: no scatter, identical on NumPy and CuPy.
"""
from ..backend import get_array_module


def hat_weights(u, size):
    """Interpolation weights (..., size) for source coordinates u (...) already in pixel units."""
    xp = get_array_module(u)
    u = xp.clip(u, 0, size - 1)                                       # border padding
    grid = xp.arange(size, dtype=u.dtype)
    return xp.maximum(1 - xp.abs(u[..., None] - grid), 0)


def forward(x, coords):
    """y[n, s, t] = x sampled at coords[n, s, t] = (x, y) in [−1, 1] (torch's order: x is width).

    x (N, H, W, C), coords (N, S1, S2, 2) -> y (N, S1, S2, C).
    """
    xp = get_array_module(x, coords)
    N, H, W, C = x.shape
    _, S1, S2, _ = coords.shape
    c = coords.reshape(N, S1 * S2, 2).astype(x.dtype, copy=False)
    wx = hat_weights((c[..., 0] + 1) * ((W - 1) / 2), W)              # N,P,W
    wy = hat_weights((c[..., 1] + 1) * ((H - 1) / 2), H)              # N,P,H
    Mi = (wy[..., :, None] * wx[..., None, :]).reshape(N, S1 * S2, H * W)  # N,P,HW
    y = xp.matmul(Mi, x.reshape(N, H * W, C))                         # N,P,C
    return y.reshape(N, S1, S2, C), (Mi, x.shape)


def backward(dy, cache):
    """-> dx (N, H, W, C). (No gradient for coords: sampling points are random, not learned.)"""
    Mi, xshape = cache
    xp = get_array_module(dy)
    N, P, _ = Mi.shape
    dx = xp.matmul(Mi.transpose(0, 2, 1), dy.reshape(N, P, xshape[-1]))  # N,HW,C
    return dx.reshape(xshape)
