"""Cosine logits of codes against centroids: both sides L2-normalised (torch F.normalize semantics)."""
from . import normalize


def forward(z, M):
    """s = ẑ m̂ᵀ with ẑ = z/||z|| per vector and m̂ = M/||M|| per row.

    z (..., D) codes, M (K, D) centroids -> s (..., K), every entry in [−1, 1].
    The hierarchy reuses it for centroid-to-centroid similarities (z = the child centroids).
    """
    zhat, zcache = normalize.forward(z)            # ...,D
    mhat, mcache = normalize.forward(M)            # K,D
    D = z.shape[-1]
    z2 = zhat.reshape(-1, D)                       # P,D
    s = z2 @ mhat.T                                # P,K
    return s.reshape(z.shape[:-1] + (M.shape[0],)), (z2, mhat, zcache, mcache)


def backward(ds, cache):
    """-> (dz, dM)."""
    z2, mhat, zcache, mcache = cache
    ds2 = ds.reshape(-1, mhat.shape[0])            # P,K
    dzhat = (ds2 @ mhat).reshape(zcache[0].shape)
    dmhat = ds2.T @ z2                             # K,D
    return normalize.backward(dzhat, zcache), normalize.backward(dmhat, mcache)
