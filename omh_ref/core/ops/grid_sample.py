"""Bilinear grid sampling, as torch's ``grid_sample(align_corners=True, padding_mode="border")``.

Forward gathers the four corner pixels of each sample. Bilinear interpolation with border padding
is also separable into two "hat" weight vectors, ``w(i) = max(0, 1 − |u − i|)`` with the source
coordinate u clipped to [0, size−1]; their outer product is each sample's row of a dense
interpolation matrix (N, P, H·W), and the backward pass is one batched matmul with its transpose:
no scatter-add, identical on NumPy and CuPy. (The gather is far cheaper than the dense matmul for
wide inputs such as C=384 features; for the backward the matmul beats a scatter.)
"""
from ..backend import get_array_module


def hat_weights(u, size):
    """Interpolation weights (..., size) for source coordinates u (...) already in pixel units."""
    xp = get_array_module(u)
    u = xp.clip(u, 0, size - 1)                                       # border padding
    grid = xp.arange(size, dtype=u.dtype)
    return xp.maximum(1 - xp.abs(u[..., None] - grid), 0)


def _source(c, size):
    """align_corners=True: −1 and 1 are the centres of the first and last pixel; then clip."""
    xp = get_array_module(c)
    return xp.clip((c + 1) * ((size - 1) / 2), 0, size - 1)


def forward(x, coords, images=None):
    """y[n, s, t] = x sampled at coords[n, s, t] = (x, y) in [−1, 1] (torch's order: x is width).

    x (N, H, W, C), coords (N', S1, S2, 2) -> y (N', S1, S2, C). ``images`` (N',) integer: sample
    image ``images[n]`` at ``coords[n]`` (the result of ``forward(x[images], coords)`` without
    copying the images); by default N' = N and image n.
    """
    xp = get_array_module(x, coords)
    N, H, W, C = x.shape
    n_out, S1, S2, _ = coords.shape
    c = coords.reshape(n_out, S1 * S2, 2).astype(x.dtype, copy=False)
    ux, uy = _source(c[..., 0], W), _source(c[..., 1], H)             # N,P
    fx0, fy0 = xp.floor(ux), xp.floor(uy)
    fx, fy = (ux - fx0)[..., None], (uy - fy0)[..., None]              # N,P,1 in x's dtype
    x0, y0 = fx0.astype(xp.int64), fy0.astype(xp.int64)
    x1, y1 = xp.minimum(x0 + 1, W - 1), xp.minimum(y0 + 1, H - 1)
    flat = x.reshape(N * H * W, C)
    base = ((xp.arange(N) if images is None else images) * (H * W))[:, None]   # N',1

    def at(yi, xi):
        # a row gather of the flattened grid: np.take on axis 0 is a plain copy of C-length
        # rows, ~20x faster than take_along_axis with a broadcast index
        return xp.take(flat, base + yi * W + xi, axis=0)                  # N,P,C

    y = (at(y0, x0) * ((1 - fx) * (1 - fy)) + at(y0, x1) * (fx * (1 - fy))
         + at(y1, x0) * ((1 - fx) * fy) + at(y1, x1) * (fx * fy))
    return y.reshape(n_out, S1, S2, C), (ux, uy, (n_out, H, W, C))


def backward(dy, cache):
    """-> dx (N', H, W, C), the gradient of the sampled images in ``coords``' order (of
    ``x[images]`` when ``images`` was given). (No gradient for coords: sampling points are
    random, not learned.)

    Recomputes the dense interpolation matrix from the cached source coordinates."""
    ux, uy, (N, H, W, C) = cache
    xp = get_array_module(dy)
    P = ux.shape[1]
    Mi = (hat_weights(uy, H)[..., :, None] * hat_weights(ux, W)[..., None, :]).reshape(N, P, H * W)
    dx = xp.matmul(Mi.transpose(0, 2, 1), dy.reshape(N, P, C))         # N,HW,C
    return dx.reshape(N, H, W, C)
