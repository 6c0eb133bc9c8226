"""The learned hierarchy as evaluation shows it: row-normalised Sinkhorn plans between adjacent
levels, computed from the centroids, and a text tree naming the eval level's matched classes."""
from __future__ import annotations

import numpy as np

from ..core.backend import get_array_module, to_host
from ..core.config import Config
from ..core.ops import cosine, sinkhorn


def hierarchy_plans(params, cfg: Config):
    """Row-normalised plans A_l = K_l · T_l (K_l x K_{l+1}) between adjacent levels, from the
    centroids alone: cost 1 − cos(M_l, M_{l+1}), uniform marginals (no batch, so no usage), the
    config's ε and iterations. Row i is child cluster i's soft parent assignment."""
    cfg = cfg.effective()
    plans = []
    for i in range(len(cfg.levels) - 1):
        cs, _ = cosine.forward(params[f"M{i}"], params[f"M{i + 1}"])
        xp = get_array_module(cs)
        Kc, Kp = cs.shape
        T, _ = sinkhorn.forward(1 - cs, xp.full(Kc, 1.0 / Kc, dtype=cs.dtype), xp.full(Kp, 1.0 / Kp, dtype=cs.dtype),
                        cfg.eps, cfg.sinkhorn_iters)
        plans.append(to_host(T * Kc))
    return plans


def hierarchy_text(plans, class_of_cluster=None, class_names=None, threshold=0.5, named_level=-1):
    """Lines 'level l+1 cluster j <- level l clusters [i (share), ...]' for every adjacent pair.
    The clusters of ``named_level`` (the eval level, whose clusters ``class_of_cluster`` maps to
    classes; the last by default) carry their matched class, as parents or as children."""
    named = named_level % (len(plans) + 1)

    def tag(k):
        if class_of_cluster is None or class_of_cluster[k] < 0:
            return ""
        c = int(class_of_cluster[k])
        return f" [{class_names[c] if class_names else c}]"

    lines = []
    for lvl, A in enumerate(plans):
        parent = A.argmax(axis=1)
        for j in range(A.shape[1]):
            kids = [f"{i}{tag(i) if lvl == named else ''} ({A[i, j]:.2f})"
                    for i in np.flatnonzero(parent == j) if A[i, j] >= threshold]
            name = f"L{lvl + 1}:{j}" + (tag(j) if lvl + 1 == named else "")
            lines.append(f"{name:<28} <- L{lvl}: {', '.join(kids) if kids else '(none)'}")
    return lines
