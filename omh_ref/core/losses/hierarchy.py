"""OMH hierarchy loss between a child level and its parent level.

``C = 1 − cos(M_child, M_parent)`` (K_c x K_p); ``T = Sinkhorn(C, a, b, ε)`` with uniform marginals
or, with ``marginals="usage"``, the batch's mean soft assignments (gradients flow into both),
smoothed as ``(mean p + δ) / (1 + K δ)`` with δ = USAGE_FLOOR so that a cluster no pixel uses
(its mean assignment underflowed to 0) still gets the positive mass Sinkhorn's logarithms need;
``A = diag(1/a) T`` row-normalised: child cluster i's soft, nearly sparse parent assignment;
``q = p_child A`` the child assignment pushed through the hierarchy;
``L = mean_pixels KL(q || p_parent) + λ_W <T, C>`` (``form="kl"``, the default).

Other formulations (``form``; docs/ablations.md measures them):

* ``centroids``: ``L = λ_W <T, C>`` only: the levels are coupled through their centroids (the
  Wasserstein pull), not through the pixels' assignments;
* ``targets``: ``L = −mean_pixels Σ_k Q_parent,k log q_k + λ_W <T, C>``: the parent level's
  no-gradient cluster targets predicted through the plan from the child
  (:mod:`.plan_targets`);

and with any of them ``lam_sparse · H(parent | child)`` (:mod:`.plan_sparsity`), a penalty on the
entropy of the rows of A, weighted by the child marginal.
"""
from ..backend import get_array_module
from ..ops import cosine, kl
from ..ops import sinkhorn
from . import plan_sparsity, plan_targets

MARGINALS = ("uniform", "usage")
FORMS = ("kl", "centroids", "targets")
USAGE_FLOOR = 1e-6   # far below 1/K for any K in use, far above float32's tiny


def usage_marginal(mean_p):
    """The smoothed usage marginal ``(mean p + δ) / (1 + K δ)`` of a level's mean assignment
    (K,) (δ = USAGE_FLOOR), and the factor 1 / (1 + K δ) its gradient carries."""
    K = mean_p.shape[-1]
    scale = mean_p.dtype.type(1.0 / (1.0 + K * USAGE_FLOOR))
    return (mean_p + mean_p.dtype.type(USAGE_FLOOR)) * scale, scale


def _usage(p):
    """Smoothed mean assignment (K,) of p (P, K) and the factor its gradient carries."""
    return usage_marginal(p.mean(axis=0))


def forward(logp_child, logp_parent, M_child, M_parent, eps=0.05, n_iters=50, lam_w=0.1,
            marginals="uniform", backward_mode="unrolled", form="kl", lam_sparse=0.0, Q_parent=None,
            check=True):
    """logp_child (P, K_c), logp_parent (P, K_p) log-assignments; M_child (K_c, D),
    M_parent (K_p, D) raw centroids; ``Q_parent`` (P, K_p) the parent's no-gradient cluster
    targets (``form="targets"`` only). -> (loss, cache); ``cache[-1]`` holds diagnostics (kl (the
    assignment term of the form, 0 for ``centroids``), wasserstein, entropy (H(parent | child);
    0, not computed, when ``lam_sparse`` is 0),
    marginal_error, plan_sparsity, the plan).

    The Sinkhorn's domain comes from bounds that hold by construction (the cost 1 − cos spans at
    most 2; uniform marginals are equal, usage ones within USAGE_FLOOR of each other's scale), so
    choosing it reads nothing from the device. ``check=False`` also skips Sinkhorn's value checks
    (the training step: non-finite values then surface in the loss, which the loop watches)."""
    xp = get_array_module(logp_child, logp_parent, M_child, M_parent)
    if marginals not in MARGINALS:
        raise ValueError(f"marginals must be one of {MARGINALS}, got {marginals!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "targets" and (Q_parent is None or Q_parent.shape != logp_parent.shape):
        raise ValueError("form 'targets' needs the parent's cluster targets Q_parent of shape "
                         f"{logp_parent.shape}, got {getattr(Q_parent, 'shape', None)}")
    P, Kc = logp_child.shape
    Kp = logp_parent.shape[1]
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
    if form == "centroids":
        l_kl, kcache = C.dtype.type(0), None
    elif form == "kl":
        kl_rows, kcache = kl.forward(p_child @ A, logp_parent)           # q = p_child A  (P,Kp)
        l_kl = kl_rows.mean()
    else:
        l_kl, kcache = plan_targets.forward(p_child @ A, Q_parent)
    l_w = (T * C).sum()
    loss = l_kl + C.dtype.type(lam_w) * l_w
    ent, pcache = plan_sparsity.forward(T, a) if lam_sparse > 0 else (C.dtype.type(0), None)
    if pcache is not None:
        loss = loss + C.dtype.type(lam_sparse) * ent
    diag = {"kl": l_kl, "wasserstein": l_w, "entropy": ent, "marginal_error": scache.marginal_error,
            "plan_sparsity": A.max(axis=1).mean(), "plan": T}
    cache = (p_child, p_parent, C, a, A, T, scache, kcache, ccache, lam_w, marginals, form, lam_sparse,
             pcache, diag)
    return loss, cache


def backward(dloss, cache):
    """-> (dlogp_child, dlogp_parent, dM_child, dM_parent)."""
    (p_child, p_parent, C, a, A, T, scache, kcache, ccache, lam_w, marginals, form, lam_sparse, pcache,
     _) = cache
    xp = get_array_module(C)
    P = p_child.shape[0]
    dt = C.dtype.type
    if form == "centroids":
        dq, dlogp_parent = None, xp.zeros_like(p_parent)
    elif form == "kl":
        dq, dlogp_parent = kl.backward(xp.full((P,), dloss / P, dtype=C.dtype), kcache)
    else:
        dq, dlogp_parent = plan_targets.backward(dloss, kcache)[0], xp.zeros_like(p_parent)
    if dq is None:
        dp_child, dA = xp.zeros_like(p_child), xp.zeros_like(A)
    else:
        dp_child = dq @ A.T                                              # P,Kc
        dA = p_child.T @ dq                                              # Kc,Kp
    dT = dA / a[:, None] + dt(lam_w * dloss) * C
    da_ent = 0
    if pcache is not None:
        dT_ent, da_ent = plan_sparsity.backward(lam_sparse * dloss, pcache)
        dT = dT + dT_ent
    dC_s, da, db = sinkhorn.backward(dT, scache)
    dC = dC_s + dt(lam_w * dloss) * T
    if marginals == "usage":
        da = da + da_ent - (dA * T).sum(axis=1) / (a * a)                # through A = T / a
        sa, sb = _usage(p_child)[1], _usage(p_parent)[1]
        dp_child = dp_child + da[None, :] * (sa / dt(P))
        dlogp_parent = dlogp_parent + p_parent * (db[None, :] * (sb / dt(P)))
    dM_child, dM_parent = cosine.backward(-dC, ccache)
    return dp_child * p_child, dlogp_parent, dM_child, dM_parent
