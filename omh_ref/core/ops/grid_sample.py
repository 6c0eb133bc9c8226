"""Bilinear grid sampling, as torch's ``grid_sample(align_corners=True, padding_mode="border")``.

Forward gathers the four corner pixels of each sample. Bilinear interpolation with border padding
is also separable into two "hat" weight vectors, ``w(i) = max(0, 1 − |u − i|)`` with the source
coordinate u clipped to [0, size−1]; their outer product is each sample's row of a dense
interpolation matrix (N, P, H·W), and the backward pass is one batched matmul with its transpose:
no scatter-add, identical on NumPy and CuPy. (The gather is far cheaper than the dense matmul for
wide inputs such as C=384 features; for the backward the matmul beats a scatter.)

On CuPy the forward is one fused kernel and the backward's interpolation matrix another (a step
samples 14 times; written as array operations each sampling launched ~50 kernels), computing
the NumPy rendering's operations in the same order (``backend``: fused kernels).
"""
from ..backend import cupy_kernel, fusing, get_array_module, is_cupy

# Element i = (image, point, channel) of an output (N, P, C): its source point as _source
# computes it (CuPy reserves the names i and n: i is the element's index).
_SOURCE = """
    const long long img = i / (P * C), pt = (i / C) % P, ch = i % C;
    T ux = min(max((coords[(img * P + pt) * 2] + (T)1) * sx, (T)0), (T)(W - 1));
    T uy = min(max((coords[(img * P + pt) * 2 + 1] + (T)1) * sy, (T)0), (T)(H - 1));
"""
# y[img, pt, ch]: the four corners and their weights as forward's NumPy lines below compute
# them, operation for operation.
_FORWARD = ("raw T x, raw T coords, raw int64 images, int64 H, int64 W, int64 C, int64 P, T sx, T sy", "T y",
            _SOURCE + """
    T fx0 = floor(ux), fy0 = floor(uy);
    T fx = ux - fx0, fy = uy - fy0;
    long long x0 = (long long)fx0, y0 = (long long)fy0;
    long long x1 = min(x0 + 1, W - 1), y1 = min(y0 + 1, H - 1);
    long long b = images[img] * (H * W);
    y = x[(b + y0 * W + x0) * C + ch] * ((1 - fx) * (1 - fy)) + x[(b + y0 * W + x1) * C + ch] * (fx * (1 - fy))
        + x[(b + y1 * W + x0) * C + ch] * ((1 - fx) * fy) + x[(b + y1 * W + x1) * C + ch] * (fx * fy);
""")
# Mi[img, pt, h * W + w] = hat_y(h) hat_x(w), as interpolation_matrix's NumPy lines (C = H * W).
_WEIGHTS = ("raw T coords, int64 H, int64 W, int64 C, int64 P, T sx, T sy", "T Mi", _SOURCE + """
    const long long h = ch / W, w = ch % W;
    Mi = max((T)1 - fabs(uy - (T)h), (T)0) * max((T)1 - fabs(ux - (T)w), (T)0);
""")


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
    cache = (c, (n_out, H, W, C))
    if is_cupy(xp):
        dt = x.dtype.type
        src = xp.arange(n_out) if images is None else xp.asarray(images, dtype=xp.int64)
        y = xp.empty((n_out, S1 * S2, C), dtype=x.dtype)
        cupy_kernel("elementwise", "omh_grid_sample", *_FORWARD)(
            xp.ascontiguousarray(x), xp.ascontiguousarray(c), src, H, W, C, S1 * S2, dt((W - 1) / 2),
            dt((H - 1) / 2), y)
        return y.reshape(n_out, S1, S2, C), cache
    src = xp.arange(N) if images is None else images                  # (on CuPy too: its own kernel)
    with fusing("grid_sample"):
        return _forward(xp, x, c, src).reshape(n_out, S1, S2, C), cache


def _forward(xp, x, c, images):
    N, H, W, C = x.shape
    ux, uy = _source(c[..., 0], W), _source(c[..., 1], H)             # N,P
    fx0, fy0 = xp.floor(ux), xp.floor(uy)
    fx, fy = (ux - fx0)[..., None], (uy - fy0)[..., None]              # N,P,1 in x's dtype
    x0, y0 = fx0.astype(xp.int64), fy0.astype(xp.int64)
    x1, y1 = xp.minimum(x0 + 1, W - 1), xp.minimum(y0 + 1, H - 1)
    flat = x.reshape(N * H * W, C)
    base = (images * (H * W))[:, None]                                  # N',1

    def at(yi, xi):
        # a row gather of the flattened grid: np.take on axis 0 is a plain copy of C-length
        # rows, ~20x faster than take_along_axis with a broadcast index
        return xp.take(flat, base + yi * W + xi, axis=0)                  # N,P,C

    return (at(y0, x0) * ((1 - fx) * (1 - fy)) + at(y0, x1) * (fx * (1 - fy))
            + at(y1, x0) * ((1 - fx) * fy) + at(y1, x1) * (fx * fy))      # N,P,C


def backward(dy, cache):
    """-> dx (N', H, W, C), the gradient of the sampled images in ``coords``' order (of
    ``x[images]`` when ``images`` was given). (No gradient for coords: sampling points are
    random, not learned.)

    Recomputes the dense interpolation matrix from the cached coordinates."""
    c, (N, H, W, C) = cache
    xp = get_array_module(dy)
    Mi = interpolation_matrix(c, H, W)                                 # N,P,HW
    dx = xp.matmul(Mi.transpose(0, 2, 1), dy.reshape(N, c.shape[1], C))   # N,HW,C
    return dx.reshape(N, H, W, C)


def interpolation_matrix(c, H, W):
    """Mi (N, P, H·W): row (n, p) holds the bilinear weights of sample p of image n over the H x W
    grid (coordinates c (N, P, 2) in [−1, 1], border padding); y = Mi x."""
    xp = get_array_module(c)
    N, P, _ = c.shape
    if is_cupy(xp):
        dt = c.dtype.type
        Mi = xp.empty((N, P, H * W), dtype=c.dtype)
        cupy_kernel("elementwise", "omh_grid_sample_weights", *_WEIGHTS)(
            xp.ascontiguousarray(c), H, W, H * W, P, dt((W - 1) / 2), dt((H - 1) / 2), Mi)
        return Mi
    with fusing("grid_sample_weights"):
        ux, uy = _source(c[..., 0], W), _source(c[..., 1], H)          # N,P
        return (hat_weights(uy, H)[..., :, None] * hat_weights(ux, W)[..., None, :]).reshape(N, P, H * W)
