"""Structured sparsity of a hierarchy plan: the conditional entropy of the parent given the child.

With the plan T (K_c x K_p) and the child marginal a (K_c,), A = diag(1/a) T is child cluster i's
soft parent assignment; the penalty is the a-weighted entropy of its rows,

    H(parent | child) = Σ_i a_i H(A_i) = −Σ_ij T_ij log(T_ij / a_i),

0 when every child has exactly one parent, log K_p when every child spreads evenly. Added to the
hierarchy loss with weight ``lam_sparse`` (``Config.lam_sparse``), its gradient reaches the plan
(and through Sinkhorn's backward the centroids' cost) and, with usage marginals, the child
marginal a. Entries of T that underflowed to 0 contribute 0 (x log x → 0); their log is floored at
the dtype's smallest normal number, so the gradient stays finite (Sinkhorn's backward multiplies
it by T = 0 anyway).
"""
from ..backend import get_array_module


def forward(T, a):
    """T (K_c, K_p) a plan, a (K_c,) its child marginal (> 0). -> (H, cache)."""
    xp = get_array_module(T, a)
    log_ratio = xp.log(xp.maximum(T, xp.finfo(T.dtype).tiny)) - xp.log(a)[:, None]   # log A
    return -(T * log_ratio).sum(), (T, a, log_ratio)


def backward(dH, cache):
    """-> (dT, da): dH/dT_ij = −log(T_ij / a_i) − 1, dH/da_i = Σ_j T_ij / a_i."""
    T, a, log_ratio = cache
    dt = T.dtype.type(dH)
    return -dt * (log_ratio + 1), dt * T.sum(axis=1) / a
