"""The learned hierarchy as evaluation shows it: row-normalised Sinkhorn plans between adjacent
levels, computed from the centroids with the marginals the model was trained with, and a text tree
naming the eval level's matched classes.

Marginals (``Config.marginals``): ``uniform`` is 1/K per cluster, as in training. ``usage`` in
training is each batch's smoothed mean assignment; at evaluation there is no batch, so the plans
use the same smoothed mean over the whole evaluation split (:class:`UsageAccumulator`, summed
batch by batch beside the predictions: no code is held). Which marginals a plan was computed with
is part of the result (:func:`marginals_note`)."""
from __future__ import annotations

import numpy as np

from ..core.backend import get_array_module, to_host
from ..core.config import Config
from ..core.losses.hierarchy import usage_marginal
from ..core.model import predictor
from ..core.ops import cosine, sinkhorn, softmax


class UsageAccumulator:
    """Each level's mean soft assignment ``p_l = softmax(cos(z, M_l) / τ)`` over every pixel
    (feature-grid patch) of the codes given to :meth:`update`, summed in float64 on the host."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.sums = [np.zeros(k, dtype=np.float64) for k in self.cfg.levels]
        self.pixels = 0
        self.images = 0

    def update(self, params, z):
        """Add the codes z (B, h, w, D) of one batch."""
        for i, acc in enumerate(self.sums):
            s, _ = cosine.forward(z, params[predictor(self.cfg, i)])
            p, _ = softmax.forward(s, self.cfg.tau)
            acc += to_host(p.reshape(-1, p.shape[-1]).sum(axis=0)).astype(np.float64)
        self.pixels += int(np.prod(z.shape[:-1]))
        self.images += int(z.shape[0])

    def means(self):
        """Per level, the mean assignment (K_l,) over the pixels seen."""
        if not self.pixels:
            raise ValueError("usage: no codes were added")
        return [acc / self.pixels for acc in self.sums]


def hierarchy_plans(params, cfg: Config, usage=None):
    """Row-normalised plans A_l = diag(1/a_l) T_l (K_l x K_{l+1}) between adjacent levels: cost
    1 − cos(M_l, M_{l+1}), the config's ε and iterations, and the marginals the model was trained
    with: uniform, or for ``marginals="usage"`` the smoothed mean assignments ``usage`` (a list
    of (K_l,) arrays, :meth:`UsageAccumulator.means`). ``usage=None`` gives uniform marginals
    whatever the config (say so: :func:`marginals_note`). Row i is child cluster i's soft parent
    assignment."""
    plans = []
    for i in range(len(cfg.levels) - 1):
        cs, _ = cosine.forward(params[f"M{i}"], params[f"M{i + 1}"])
        xp = get_array_module(cs)
        Kc, Kp = cs.shape
        if usage is not None and cfg.marginals == "usage":
            a, b = (xp.asarray(usage_marginal(np.asarray(u, dtype=np.float64))[0], dtype=cs.dtype)
                    for u in (usage[i], usage[i + 1]))
            b = b * (a.sum() / b.sum())            # equal masses to the last bit
        else:
            a, b = xp.full(Kc, 1.0 / Kc, dtype=cs.dtype), xp.full(Kp, 1.0 / Kp, dtype=cs.dtype)
        T, _ = sinkhorn.forward(1 - cs, a, b, cfg.eps, cfg.sinkhorn_iters)
        plans.append(to_host(T / a[:, None]))
    return plans


def marginals_note(cfg: Config, usage_images=None) -> dict:
    """Which marginals :func:`hierarchy_plans` used -> {'marginals': 'uniform' | 'usage',
    'trained_with': cfg.marginals, 'text': one line for the printed table}. ``usage_images``: the
    number of evaluation images the usage was averaged over (None: no usage was given)."""
    trained = cfg.marginals
    if trained == "usage" and usage_images:
        return {"marginals": "usage", "trained_with": trained,
                "text": f"usage marginals as trained: mean assignments over the {usage_images} evaluation images"}
    if trained == "usage":
        return {"marginals": "uniform", "trained_with": trained,
                "text": "uniform marginals (trained with usage marginals; no usage was measured)"}
    return {"marginals": "uniform", "trained_with": trained, "text": "uniform marginals, as trained"}


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
