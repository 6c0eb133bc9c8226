"""Bilinear resize, as torch's ``interpolate(mode="bilinear", align_corners=False)``.

Separable: y = R_h x R_wᵀ per image and channel, with hat-weight matrices built from the
half-pixel source coordinates ``(i + 0.5)·in/out − 0.5`` (negative values clamped to 0, as torch).

:func:`resize_matrix` also takes the ``extent`` the output spans in input cells when that is not
the whole input: segmentation pads an image to whole patches, and only the first ``extent`` cells
of the padded feature grid lie over the image.
"""
from ..backend import get_array_module
from .grid_sample import hat_weights


def resize_matrix(n_out, n_in, xp, dtype, extent=None):
    """(n_out, n_in) interpolation matrix of 1-D bilinear resizing (align_corners=False).

    ``extent`` (default ``n_in``): the number of input cells, from the first one's left edge, that
    the ``n_out`` outputs cover; source coordinates are ``(i + 0.5)·extent/n_out − 0.5``."""
    extent = n_in if extent is None else extent
    u = (xp.arange(n_out, dtype=dtype) + 0.5) * (extent / n_out) - 0.5
    return hat_weights(xp.maximum(u, 0), n_in)


def forward(x, size):
    """x (N, H, W, C) -> y (N, Ho, Wo, C) with size = (Ho, Wo)."""
    xp = get_array_module(x)
    N, H, W, C = x.shape
    Ho, Wo = size
    Rh = resize_matrix(Ho, H, xp, x.dtype)                           # Ho,H
    Rw = resize_matrix(Wo, W, xp, x.dtype)                           # Wo,W
    t = xp.matmul(Rh, x.reshape(N, H, W * C)).reshape(N * Ho, W, C)  # N·Ho,W,C
    y = xp.matmul(Rw, t)                                             # N·Ho,Wo,C
    return y.reshape(N, Ho, Wo, C), (Rh, Rw, x.shape)


def backward(dy, cache):
    """-> dx, the transpose of the forward map."""
    Rh, Rw, (N, H, W, C) = cache
    xp = get_array_module(dy)
    Ho, Wo = Rh.shape[0], Rw.shape[0]
    t = xp.matmul(Rw.T, dy.reshape(N * Ho, Wo, C))                   # N·Ho,W,C
    dx = xp.matmul(Rh.T, t.reshape(N, Ho, W * C))                     # N,H,W·C
    return dx.reshape(N, H, W, C)
