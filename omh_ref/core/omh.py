"""OMH on top of a base: the hierarchy between neighbouring cluster levels.

For each pair (child l, parent l+1) the hierarchy loss couples the levels through an entropic OT
plan between their centroids (:mod:`omh_ref.core.losses.hierarchy`). The levels themselves are
:mod:`omh_ref.core.clusters`; with ``Config.omh`` they are trained jointly with the code.
"""
from __future__ import annotations

from .losses import hierarchy


def forward(levels, params, cfg):
    """-> (losses, parts, caches): each pair's hierarchy loss (unweighted), its diagnostics
    (``hier_l``, ``hier_kl_l``, ``hier_w_l``, ``sinkhorn_err_l``, ``plan_sparsity_l``: 0-d
    arrays on the device) and its :class:`~omh_ref.core.losses.hierarchy.HierarchyCache`. None
    when ``lam_hier`` is 0."""
    losses, parts, caches = [], {}, []
    if cfg.lam_hier <= 0:
        return losses, parts, caches
    for i in range(len(levels) - 1):
        lh, hc = hierarchy.forward(levels[i].logp, levels[i + 1].logp, params[f"M{i}"], params[f"M{i + 1}"],
                                   eps=cfg.eps, n_iters=cfg.sinkhorn_iters, lam_w=cfg.lam_w,
                                   marginals=cfg.marginals, backward_mode=cfg.sinkhorn_backward, check=False)
        parts[f"hier_{i}"] = lh
        parts[f"hier_kl_{i}"] = hc.diag["kl"]
        parts[f"hier_w_{i}"] = hc.diag["wasserstein"]
        parts[f"sinkhorn_err_{i}"] = hc.diag["marginal_error"]
        parts[f"plan_sparsity_{i}"] = hc.diag["plan_sparsity"]
        losses.append(lh)
        caches.append(hc)
    return losses, parts, caches


def backward(dloss, caches, n_levels):
    """``dloss`` the weight of every hierarchy loss. -> (dlogp, dM): per level, the gradients of
    its log-assignments and centroids (0 for a level no pair touches)."""
    dlogp, dM = [0] * n_levels, [0] * n_levels
    for i, hc in enumerate(caches):
        dlc, dlp, dMc, dMp = hierarchy.backward(dloss, hc)
        dlogp[i] = dlogp[i] + dlc
        dlogp[i + 1] = dlogp[i + 1] + dlp
        dM[i] = dM[i] + dMc
        dM[i + 1] = dM[i + 1] + dMp
    return dlogp, dM
