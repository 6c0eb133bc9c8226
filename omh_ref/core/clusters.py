"""The cluster levels: cosine cluster heads on the code, each trained by its cluster loss.

For level l with centroids M_l (K_l, D): ``s_l = cos(z, M_l)``, ``log p_l = log_softmax(s_l/τ)``
and ``L_clu(s_l, log p_l)`` against the level's no-gradient targets (``Config.cluster_target``,
:mod:`omh_ref.core.losses.cluster`). With OMH every level is trained jointly with the code; a base
alone has one level, its probe, on a detached code (the model drops the code's gradient).
"""
from __future__ import annotations

from typing import NamedTuple

from . import bases
from .losses import cluster
from .ops import cosine, log_softmax


class Level(NamedTuple):
    cosine: object      # cosine cache
    softmax: object     # log_softmax cache
    loss: object        # ClusterCache (loss.Q: the targets)
    logp: object        # (P, K) log-assignments


def forward(zmain, params, cfg, targets=None):
    """zmain (P, D) the main images' codes. -> (losses, parts, levels): each level's cluster loss
    (unweighted), the parts ``clu_l`` (and ``target_err_l`` of balanced targets), and its
    :class:`Level`.
    ``targets`` (one per level, or None) holds the targets fixed, for gradient checks."""
    losses, parts, levels = [], {}, []
    for i in range(len(cfg.levels)):
        s, sc = cosine.forward(zmain, params[f"M{i}"])                 # P,K
        logp, lc = log_softmax.forward(s, cfg.tau)
        Q = None if targets is None else targets[i]
        if Q is None and cfg.cluster_target == "relaxed":
            Q, _ = cluster.relaxed_targets(s, cfg.eps_q, cfg.sinkhorn_iters_q, cfg.rho_q, span_bound=2.0)
        elif Q is None and cfg.cluster_target == "balanced":
            Q, parts[f"target_err_{i}"] = cluster.balanced_targets(s, cfg.eps_q, cfg.sinkhorn_iters_q, span_bound=2.0)
        elif Q is None and cfg.cluster_target == "teacher":   # the argmax of the teacher centres' logits
            Q = cluster.hard_targets(cosine.forward(zmain, params[bases.teacher_centres(bases.get(cfg.base))])[0])
        lclu, kc = cluster.forward(s, logp, cfg.cluster_target, cfg.eps_q, cfg.sinkhorn_iters_q, Q=Q)
        parts[f"clu_{i}"] = lclu
        losses.append(lclu)
        levels.append(Level(sc, lc, kc, logp))
    return losses, parts, levels


def backward(dloss, levels, dlogp, dM):
    """``dloss`` the weight of every cluster loss, ``dlogp``/``dM`` the gradients the hierarchy
    already sent to each level's log-assignments and centroids (0 where none). -> (dzmain, dMs)."""
    dzmain, dMs = 0, []
    for i, lv in enumerate(levels):
        ds, dl = cluster.backward(dloss, lv.loss)
        dlp = dlogp[i] + dl
        if not (isinstance(dlp, int) and dlp == 0):     # hard targets and no hierarchy: nothing to send back
            ds = ds + log_softmax.backward(dlp, lv.softmax)
        dzi, dMi = cosine.backward(ds, lv.cosine)
        dzmain = dzmain + dzi
        dMs.append(dM[i] + dMi)
    return dzmain, dMs
