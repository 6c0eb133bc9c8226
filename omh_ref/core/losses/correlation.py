"""STEGO's contrastive correlation loss on sampled features and codes.

For a pair of sampled point sets (x, y) of N image pairs:
``F = <f̂_x, f̂_y>`` (no gradient), optionally centred per row as ``F − mean_row F + mean F``
(STEGO's ``pointwise``, the means over the whole batch); ``Sc = <ĉ_x, ĉ_y>``;
``L = −mean(clamp(Sc, 0) · (F − shift))`` (``zero_clamp``; without it Sc is used as is).
Normalisation uses STEGO's eps 1e-10 (a zero vector gives zero correlations, not NaN).
"""
from ..backend import get_array_module
from ..ops import normalize

NORM_EPS = 1e-10


def _flat_normalized(x):
    N = x.shape[0]
    return normalize.forward(x.reshape(N, -1, x.shape[-1]), NORM_EPS)   # N,P,C


def forward(f1, f2, c1, c2, shift, pointwise=True, zero_clamp=True):
    """f1 (N,S1,S2,C), f2 (N,S1',S2',C) sampled features; c1, c2 the codes (N,·,·,D) at the
    same points. -> (loss (0-d array), cache)."""
    xp = get_array_module(f1, f2, c1, c2)
    fn1, _ = _flat_normalized(f1)
    fn2, _ = _flat_normalized(f2)
    F = xp.matmul(fn1, xp.swapaxes(fn2, 1, 2))                    # N,P1,P2 (no gradient)
    if pointwise:
        old_mean = F.mean()
        F = F - F.mean(axis=2, keepdims=True)
        F = F - F.mean() + old_mean
    cn1, k1 = _flat_normalized(c1)
    cn2, k2 = _flat_normalized(c2)
    Sc = xp.matmul(cn1, xp.swapaxes(cn2, 1, 2))                  # N,P1,P2
    Fs = F - F.dtype.type(shift)
    if zero_clamp:
        mask = Sc >= 0                 # torch's clamp(min=0) passes the gradient where Sc >= 0
        Sc = Sc * mask
    else:
        mask = None
    loss = -(Sc * Fs).mean()
    return loss, (Fs, mask, cn1, cn2, k1, k2, c1.shape, c2.shape)


def backward(dloss, cache):
    """-> (dc1, dc2). When c1 and c2 are the same array (a self pair) the caller adds both."""
    Fs, mask, cn1, cn2, k1, k2, s1, s2 = cache
    xp = get_array_module(Fs)
    dSc = Fs * Fs.dtype.type(-dloss / Fs.size)                   # N,P1,P2
    if mask is not None:
        dSc = dSc * mask
    dcn1 = xp.matmul(dSc, cn2)                                   # N,P1,D
    dcn2 = xp.matmul(xp.swapaxes(dSc, 1, 2), cn1)                # N,P2,D
    return normalize.backward(dcn1, k1).reshape(s1), normalize.backward(dcn2, k2).reshape(s2)
