"""SmooSeg (Lan et al., NeurIPS 2023) as a base: a smoothness loss on the teacher's cluster
probabilities trains the projection head, and its cluster probe is a student whose teacher is an
exponential moving average of it (docs/METHOD.md, "The SmooSeg base"; what SmooSeg's code does,
with file and line, is in docs/smooseg_reading.md, from mc-lan/SmooSeg at 1eecdec).

Teacher probabilities of the codes z against the teacher centres G (no gradient to G)::

    P = softmax(cos(z, G) / τ_t)                                   (B, h, w, K)

Smoothness loss on the dense grids (every position of one image against every position of the
other, no sampling), for the pairs of STEGO's kinds (self, KNN partner, negative)::

    L_pair = mean[(F − b) (1 − cos(P₁, P₂))] = mean(F − b) − mean(cos(P₁, P₂) (F − b))

F the feature correlations (no gradient, centred per row with ``pointwise``), b the pair's
shift: STEGO's correlation loss (:mod:`omh_ref.core.losses.correlation`, no zero clamp) on the
probabilities instead of the codes, plus a constant. ``L = w_intra L_self + w_inter L_knn +
w_neg mean L_neg``; SmooSeg's own values are one negative pairing and no KNN pair
(:data:`DEFAULTS`).

The base alone (``omh = false``): one level, the **student** centres M (trained on the detached
code by cross-entropy of softmax(cos(z, M)) against the argmax of cos(z, G), the ``teacher``
cluster target at τ = 1), and the teacher G ← α G + (1 − α) M after every step (:func:`update`,
from the step's own M, before Adam moves it); predictions come from G. With OMH on top, the OMH
levels train as on STEGO (jointly with the code, their own targets), G follows the eval level's
centres the same way, and predictions come from the eval level, as for every OMH model.
"""
from __future__ import annotations

from ..backend import get_array_module
from ..losses import correlation
from ..ops import cosine, softmax
from .stego import derangement

PROBE_TARGET = "teacher"   # the student: cross-entropy against the teacher's argmax
PROBE_TAU = 1.0            # on raw cosines (SmooSeg modules.py:254-257: no temperature)
TEACHER = "G"              # the teacher centres' parameter: no gradient, moved by update()
LOSS_PART = "smooth"

# SmooSeg's values of omh-ref's fields where they differ (docs/smooseg_reading.md, SmooSeg file:line):
DEFAULTS = {
    "dim": 64,                      # configs/train_config.yaml:26
    "dropout": 0.2,                 # modules.py:105 (Dropout2d p)
    "head_activation": "silu",      # modules.py:117-121
    "shift_intra": -0.02,           # train_config.yaml:41 (pos_intra_shift, Cityscapes, the active block)
    "shift_neg": 0.5,               # train_config.yaml:40 (neg_inter_shift)
    "weight_intra": 1.0,            # modules.py:246 (L_self + L_neg, weight 1 each)
    "weight_neg": 1.0,
    "weight_inter": 0.0,            # no KNN pairs (data.py:439-448 returns no neighbours)
    "neg_samples": 1,               # modules.py:281 (one pairing a step)
    "zero_clamp": False,            # modules.py:276 (no clamp)
    "teacher_tau": 0.1,             # train_config.yaml:33 (temperature)
    "ema_alpha": 0.998,             # train_config.yaml:34 (alpha)
}
# SmooSeg's learning rates (train_config.yaml:29-30, lr1 and lr2) and batch (:10); its steps are
# the recipe's.
LOOP_DEFAULTS = {"lr": 1e-4, "lr_clusters": 5e-4, "batch_size": 32}


def needs_partners(cfg) -> bool:
    return cfg.weight_inter > 0


def draw(cfg, B, rng) -> dict:
    """The negative pairings (SmooSeg draws one, ``neg_samples``): true derangements of the
    batch, as for STEGO (SmooSeg's own pairing can repeat a partner; docs/DECISIONS.md)."""
    return {"perms": [derangement(B, rng) for _ in range(cfg.neg_samples)] if cfg.weight_neg > 0 else []}


def init(params, cfg):
    """SmooSeg's centres start as unit rows (modules.py:145, 155: Xavier-normal, then normalised),
    the teacher an exact copy of the centres it follows (the eval level's)."""
    for k in [k for k in params if k.startswith("M")]:
        M = params[k]
        params[k] = (M / ((M * M).sum(-1, keepdims=True) ** 0.5)).astype(M.dtype)
    params[TEACHER] = params[f"M{cfg.eval_index}"].copy()
    return params


def update(params, cfg, ok):
    """The teacher's step, G ← α G + (1 − α) M_eval, where ``ok`` holds (the training loop's
    divergence flag, so a frozen state stays frozen); called before the optimiser moves M
    (SmooSeg train_segmentation.py:98 runs it inside the training step)."""
    G, M = params[TEACHER], params[f"M{cfg.eval_index}"]
    xp = get_array_module(G)
    dt = G.dtype.type
    G[...] = xp.where(ok, G * dt(cfg.ema_alpha) + M * dt(1 - cfg.ema_alpha), G)


def teacher_probabilities(z, G, tau):
    """P = softmax(cos(z, G) / τ): (..., K), with the caches of both steps."""
    s, sc = cosine.forward(z, G)
    P, pc = softmax.forward(s, tau)
    return P, (sc, pc)


def forward(cfg, f, x, z, draws, B, params):
    """-> (loss, parts, cache): the smoothness loss of the B main images (``x[B:]``, ``z[B:]``:
    the KNN partners' features and codes, when there are partners)."""
    G = params[TEACHER]
    P, pcache = teacher_probabilities(z, G, cfg.teacher_tau)                # 2B or B,h,w,K
    P1 = P[:B]
    pairs, parts = [], {}   # (kind, weight, loss cache, where the partner's gradient goes)

    def pair(kind, weight, f2, P2, shift, route):
        loss, cc = correlation.forward(f, f2, P1, P2, shift, cfg.pointwise, cfg.zero_clamp)
        loss = loss + cc[0].mean()                                     # + mean(F − b): SmooSeg's value
        pairs.append((kind, weight, cc, route))
        return loss

    parts["smooth_self"] = pair("self", cfg.weight_intra, f, P1, cfg.shift_intra, None)
    loss = cfg.weight_intra * parts["smooth_self"]
    if x.shape[0] > B:
        parts["smooth_knn"] = pair("knn", cfg.weight_inter, x[B:], P[B:], cfg.shift_inter, "partners")
        loss = loss + cfg.weight_inter * parts["smooth_knn"]
    neg = [pair("neg", cfg.weight_neg / len(draws["perms"]), f[perm], P1[perm], cfg.shift_neg, perm)
           for perm in draws["perms"]]
    if neg:
        parts["smooth_neg"] = sum(neg) / len(neg)
        loss = loss + cfg.weight_neg * parts["smooth_neg"]
    parts[LOSS_PART] = loss
    return loss, parts, (B, pcache, pairs, P.shape)


def backward(dloss, cache, dz):
    """Adds d(dloss · loss)/dz into ``dz``: each pair's probability gradients, gathered on P, then
    through the softmax and the cosine (the teacher's own gradient is dropped)."""
    B, (sc, pc), pairs, shape = cache
    xp = get_array_module(dz)
    dP = xp.zeros(shape, dtype=dz.dtype)
    for kind, weight, cc, route in pairs:
        d1, d2 = correlation.backward(weight * dloss, cc)
        dP[:B] += d1
        if kind == "self":
            dP[:B] += d2
        elif kind == "knn":
            dP[B:] += d2
        else:
            dP[:B][route] += d2            # a derangement has no repeats: += is safe
    ds = softmax.backward(dP, pc)
    dzp, _ = cosine.backward(ds, sc)
    dz[:shape[0]] += dzp
