"""OMH hierarchy loss between a child level and its parent level.

``C = 1 − cos(M_child, M_parent)`` (K_c x K_p); ``T = Sinkhorn(C, a, b, ε)`` with uniform marginals
or, with ``marginals="usage"``, the batch's mean soft assignments (gradients flow into both),
smoothed as ``(mean p + δ) / (1 + K δ)`` with δ = USAGE_FLOOR so that a cluster no pixel uses
(its mean assignment underflowed to 0) still gets the positive mass Sinkhorn's logarithms need;
``A = diag(1/a) T`` row-normalised: child cluster i's soft, nearly sparse parent assignment;
``q = p_child A`` the child assignment pushed through the hierarchy;

    L = mean_pixels KL(q || p_parent) + λ_W <T, C>.

Other couplings (the Wasserstein pull alone, the parent's targets predicted through the plan, a
plan-entropy penalty) lost in the method study and were retired; docs/ablations.md names the
commit that has them.
"""
from typing import NamedTuple

from ..backend import get_array_module
from ..ops import cosine, kl
from ..ops import sinkhorn

MARGINALS = ("uniform", "usage")
USAGE_FLOOR = 1e-6   # far below 1/K for any K in use, far above float32's tiny


class HierarchyCache(NamedTuple):
    p_child: object       # (P, K_c) assignments
    p_parent: object      # (P, K_p)
    C: object             # (K_c, K_p) cost 1 − cos
    a: object             # (K_c,) child marginal
    T: object             # (K_c, K_p) the plan
    A: object             # (K_c, K_p) the plan, rows normalised
    sinkhorn: object      # SinkhornCache
    kl: object            # the KL's cache
    cosine: object        # the cost's cosine cache
    lam_w: float
    marginals: str
    diag: dict            # kl, wasserstein, marginal_error, plan_sparsity, plan (0-d / device arrays)


def usage_marginal(mean_p):
    """The smoothed usage marginal ``(mean p + δ) / (1 + K δ)`` of a level's mean assignment
    (K,) (δ = USAGE_FLOOR), and the factor 1 / (1 + K δ) its gradient carries."""
    K = mean_p.shape[-1]
    scale = mean_p.dtype.type(1.0 / (1.0 + K * USAGE_FLOOR))
    return (mean_p + mean_p.dtype.type(USAGE_FLOOR)) * scale, scale


def _usage(p):
    """Smoothed mean assignment (K,) of p (P, K) and the factor its gradient carries."""
    return usage_marginal(p.mean(axis=0))


def forward(logp_child, logp_parent, M_child, M_parent, *, eps=0.05, n_iters=50, lam_w=0.1,
            marginals="uniform", backward_mode="unrolled", check=True):
    """logp_child (P, K_c), logp_parent (P, K_p) log-assignments; M_child (K_c, D),
    M_parent (K_p, D) raw centroids. -> (loss, HierarchyCache); ``cache.diag`` holds the
    diagnostics (kl, wasserstein, marginal_error, plan_sparsity, the plan).

    The Sinkhorn's domain comes from bounds that hold by construction (the cost 1 − cos spans at
    most 2; uniform marginals are equal, usage ones within USAGE_FLOOR of each other's scale), so
    choosing it reads nothing from the device. ``check=False`` also skips Sinkhorn's value checks
    (the training step: non-finite values then surface in the loss, which the loop watches)."""
    xp = get_array_module(logp_child, logp_parent, M_child, M_parent)
    if marginals not in MARGINALS:
        raise ValueError(f"marginals must be one of {MARGINALS}, got {marginals!r}")
    Kc, Kp = logp_child.shape[1], logp_parent.shape[1]
    p_child = xp.exp(logp_child)
    p_parent = xp.exp(logp_parent)
    cs, ccache = cosine.forward(M_child, M_parent)                       # Kc,Kp
    C = 1 - cs
    if marginals == "usage":
        (a, _), (b, _) = _usage(p_child), _usage(p_parent)
    else:
        a = xp.full((Kc,), 1.0 / Kc, dtype=C.dtype)
        b = xp.full((Kp,), 1.0 / Kp, dtype=C.dtype)
    ratio = USAGE_FLOOR / (1 + USAGE_FLOOR) if marginals == "usage" else 1.0
    T, scache = sinkhorn.forward(C, a, b, eps, n_iters, backward=backward_mode, check=check,
                                 bounds=(2.0, ratio))                    # Kc,Kp
    A = T / a[:, None]                                                   # rows sum to 1
    kl_rows, kcache = kl.forward(p_child @ A, logp_parent)               # q = p_child A  (P,Kp)
    l_kl = kl_rows.mean()
    l_w = (T * C).sum()
    loss = l_kl + C.dtype.type(lam_w) * l_w
    diag = {"kl": l_kl, "wasserstein": l_w, "marginal_error": scache.marginal_error,
            "plan_sparsity": A.max(axis=1).mean(), "plan": T}
    return loss, HierarchyCache(p_child, p_parent, C, a, T, A, scache, kcache, ccache, lam_w, marginals, diag)


def backward(dloss, cache: HierarchyCache):
    """-> (dlogp_child, dlogp_parent, dM_child, dM_parent)."""
    c = cache
    xp = get_array_module(c.C)
    P = c.p_child.shape[0]
    dt = c.C.dtype.type
    dq, dlogp_parent = kl.backward(xp.full((P,), dloss / P, dtype=c.C.dtype), c.kl)
    dp_child = dq @ c.A.T                                                # P,Kc
    dA = c.p_child.T @ dq                                                # Kc,Kp
    dT = dA / c.a[:, None] + dt(c.lam_w * dloss) * c.C
    dC_s, da, db = sinkhorn.backward(dT, c.sinkhorn)
    dC = dC_s + dt(c.lam_w * dloss) * c.T
    if c.marginals == "usage":
        da = da - (dA * c.T).sum(axis=1) / (c.a * c.a)    # through A = T / a
        sa, sb = _usage(c.p_child)[1], _usage(c.p_parent)[1]
        dp_child = dp_child + da[None, :] * (sa / dt(P))
        dlogp_parent = dlogp_parent + c.p_parent * (db[None, :] * (sb / dt(P)))
    dM_child, dM_parent = cosine.backward(-dC, c.cosine)
    return dp_child * c.p_child, dlogp_parent, dM_child, dM_parent
