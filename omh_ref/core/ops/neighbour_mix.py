"""HP's local mix of codes: each patch's 3 x 3 window, weighted by its attention and divided by the
number of window cells inside the grid.

HP (hynnsk/HP @ 8913644, docs/hp_reading.md §7, §12.3) mixes the live code z over each patch's
3 x 3 window with the stored attention weights ω (``attn.npy``, omh_ref/features/attention.py; no
gradient) and divides by n_yx, the count of window cells inside the grid (4 at a corner, 6 on an
edge, 9 inside; DinoFeaturizer.py 88-113, 207), not by the weights' sum:

    m[b, y, x] = (1/n_yx) Σ_o ω[b, y, x, o] z[b, y + o_y, x + o_x]    (z = 0 outside the grid)

with the offsets o in row-major order (−1,−1), (−1,0), (−1,1), (0,−1), (0,0), (0,1), (1,−1), (1,0),
(1,1). The backward scatters each window back:

    dz[b, y + o_y, x + o_x] += ω[b, y, x, o] / n_yx · dm[b, y, x].

Nine shifted slices of a zero-padded copy: memory O(B·h·w·D), no n x n product (HP forms one
n x n x D product per image, §11).
"""
from ..backend import get_array_module

OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))   # row-major; (0, 0) is index 4


def cells_inside(xp, h, w, dtype):
    """(h, w, 1) the count n_yx of 3 x 3 window cells inside an h x w grid, as ``dtype``."""
    ys, xs = xp.arange(h), xp.arange(w)
    ny = 3 - (ys == 0).astype(dtype) - (ys == h - 1).astype(dtype)
    nx = 3 - (xs == 0).astype(dtype) - (xs == w - 1).astype(dtype)
    return (ny[:, None] * nx[None, :])[..., None]


def _check(z, omega):
    if z.ndim != 4:
        raise ValueError(f"neighbour_mix: z must be (B, h, w, D), got shape {z.shape}")
    if omega.shape != z.shape[:3] + (len(OFFSETS),):
        raise ValueError(f"neighbour_mix: omega must be (B, h, w, 9) = {z.shape[:3] + (9,)}, got {omega.shape}")


def forward(z, omega):
    """z (B, h, w, D) codes, omega (B, h, w, 9) window weights (any float dtype; used in z's dtype)
    -> m (B, h, w, D) in z's dtype."""
    _check(z, omega)
    xp = get_array_module(z, omega)
    B, h, w, D = z.shape
    om = omega.astype(z.dtype, copy=False)
    zp = xp.zeros((B, h + 2, w + 2, D), dtype=z.dtype)
    zp[:, 1:h + 1, 1:w + 1] = z
    m = xp.zeros_like(z)
    for o, (dy, dx) in enumerate(OFFSETS):
        m += om[..., o:o + 1] * zp[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
    scale = 1 / cells_inside(xp, h, w, z.dtype)          # h,w,1
    return m * scale, (om, scale)


def backward(dm, cache):
    """-> dz (the weights get no gradient)."""
    om, scale = cache
    xp = get_array_module(dm)
    B, h, w, D = dm.shape
    g = dm * scale
    dzp = xp.zeros((B, h + 2, w + 2, D), dtype=dm.dtype)
    for o, (dy, dx) in enumerate(OFFSETS):
        dzp[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] += om[..., o:o + 1] * g
    return dzp[:, 1:h + 1, 1:w + 1]
