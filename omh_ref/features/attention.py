"""HP's local attention weights, computed once at extraction (``omh-ref extract --attention``) and
stored as ``attn.npy`` (N, h, w, 9) float16: for every patch, the weights of its 3 x 3 window.

HP (hynnsk/HP @ 8913644, docs/hp_reading.md §7) takes the last block's pre-softmax attention logits
(``model/dino/vision_transformer.py`` 86-88, 94), drops the class row and column and averages over
the heads (``model/dino/DinoFeaturizer.py`` 162-163; the export's ``attention`` output,
:class:`omh_ref.extract.vit_layers.AttentionLogits`, is that (B, n, n) array), then, per row p (in
float32, DF:164):

1. clips the row to [its 10 % quantile, its 90 % quantile] over its n entries, the quantiles by
   ``torch.quantile``'s default linear interpolation (DF:165-167: ``max(min(a, q90), q10)``);
2. takes the softmax over the row (DF:169) and multiplies it by sigma = 28 (DF:19, 170);
3. sets the entries below the row's mean to 0 (DF:171; strict ``<``).

HP then keeps only the 3 x 3 window around p (DF:88-113, 198: a mask, cut at the border) and divides
its weighted sum of codes by the number of window cells inside the grid (DF:113, 207); that count
follows from the position, so only the window's nine weights are stored, in row-major offset
order (-1,-1), (-1,0), (-1,1), (0,-1), (0,0), (0,1), (1,-1), (1,0), (1,1), and 0 for a cell
outside the grid. The row processing needs the whole row (the quantiles, the softmax's
denominator, the mean), which is why it happens here and not in training.

NumPy only (no torch): it runs in extraction's chunks, in-process or on Dask workers.
"""
from __future__ import annotations

import numpy as np

SIGMA = 28.0                 # HP DinoFeaturizer.py line 19 (self.sigma), used at line 170
QUANTILES = (0.1, 0.9)       # HP DinoFeaturizer.py lines 165-166 (torch.quantile, linear interpolation)
OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))   # row-major; (0, 0) is index 4
FILE = "attn.npy"
DTYPE = "float16"


def quantile_linear(a: np.ndarray, q: float) -> np.ndarray:
    """The ``q`` quantile of ``a`` over its last axis, keepdims, as ``torch.quantile`` computes it
    by default (``interpolation='linear'``, numpy's ``method='linear'``): the sorted row's value at
    rank r = q (n - 1), interpolated between ranks floor(r) and floor(r) + 1 with weight
    t = r - floor(r), as a + t (b - a) for t < 0.5 and b - (1 - t)(b - a) otherwise (torch's
    ``lerp``). Uses a partition, not a full sort."""
    n = a.shape[-1]
    r = q * (n - 1)
    lo = int(np.floor(r))
    hi = min(lo + 1, n - 1)
    part = np.partition(a, sorted({lo, hi}), axis=-1)
    below, above = part[..., lo:lo + 1], part[..., hi:hi + 1]
    t = a.dtype.type(r - lo)
    diff = above - below
    return below + t * diff if t < 0.5 else above - (a.dtype.type(1) - t) * diff


def row_weights(logits: np.ndarray, sigma: float = SIGMA, quantiles=QUANTILES) -> np.ndarray:
    """(B, n, n) logits -> (B, n, n) float32 weights ω: each row clipped to its quantiles, softmaxed,
    times ``sigma``, zero below its mean (the module's steps 1-3)."""
    a = np.asarray(logits, dtype=np.float32)
    if a.ndim != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"expected attention logits of shape (B, n, n), got {a.shape}")
    q_lo, q_hi = (quantile_linear(a, q) for q in quantiles)
    a = np.maximum(np.minimum(a, q_hi), q_lo)
    a = a - a.max(axis=-1, keepdims=True)
    np.exp(a, out=a)
    a /= a.sum(axis=-1, keepdims=True)
    a *= np.float32(sigma)
    a[a < a.mean(axis=-1, keepdims=True)] = 0.0
    return a


def window(weights: np.ndarray, h: int, w: int) -> np.ndarray:
    """(B, n, n) row weights of an h x w grid (n = h w, row-major) -> (B, h, w, 9): for patch
    (y, x), ω[(y, x), (y + dy, x + dx)] at offset index 3 (dy + 1) + (dx + 1), 0 outside the grid."""
    B, n, _ = weights.shape
    if n != h * w:
        raise ValueError(f"attention of {n} patches for a {h}x{w} grid")
    full = weights.reshape(B, h, w, h, w)
    out = np.zeros((B, h, w, len(OFFSETS)), dtype=weights.dtype)
    for o, (dy, dx) in enumerate(OFFSETS):
        y0, y1 = max(0, -dy), h - max(0, dy)
        x0, x1 = max(0, -dx), w - max(0, dx)
        if y0 >= y1 or x0 >= x1:
            continue
        ys, xs = np.arange(y0, y1)[:, None], np.arange(x0, x1)[None, :]
        out[:, y0:y1, x0:x1, o] = full[:, ys, xs, ys + dy, xs + dx]
    return out


def window_weights(logits: np.ndarray, h: int, w: int, sigma: float = SIGMA, quantiles=QUANTILES) -> np.ndarray:
    """What ``attn.npy`` stores for a batch (before its float16 cast): (B, h, w, 9) float32."""
    return window(row_weights(logits, sigma, quantiles), h, w)


def cells_inside(h: int, w: int) -> np.ndarray:
    """(h, w) int: the number of window cells inside the grid (HP's divisor n_p: 4 at a corner,
    6 on an edge, 9 inside, DF:88-113), for the base that reads ``attn.npy``."""
    ny = 3 - (np.arange(h) == 0) - (np.arange(h) == h - 1)
    nx = 3 - (np.arange(w) == 0) - (np.arange(w) == w - 1)
    return ny[:, None] * nx[None, :]


def record(n_rows: int, h: int, w: int) -> dict:
    """The ``feats.json`` field ``attention``: the file and how its weights were made."""
    return {"file": FILE, "shape": [int(n_rows), int(h), int(w), len(OFFSETS)], "dtype": DTYPE,
            "sigma": SIGMA, "quantiles": list(QUANTILES), "quantile_interpolation": "linear (torch.quantile's default)",
            "offsets": [list(o) for o in OFFSETS],
            "source": "the ONNX model's attention output: last block, pre-softmax q.k/sqrt(d), mean over heads, "
                      "patch tokens only",
            "processing": "per row: clip to its quantiles, softmax over the row, times sigma, zero below the row "
                          "mean; then the 3x3 window, 0 outside the grid (HP @ 8913644 DinoFeaturizer.py 161-171, "
                          "88-113)"}
