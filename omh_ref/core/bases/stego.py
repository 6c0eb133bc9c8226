"""STEGO (Hamilton et al., 2022) as a base: the feature-correlation loss trains the projection
head, and its cluster probe is hard (one-hot) k-means on a detached code.

On S x S points sampled per image, the code correlations are pushed towards the feature
correlations minus a shift, for three kinds of pairs (docs/METHOD.md):

    L = w_intra L(f, f) + w_inter L(f, f⁺) + w_neg mean_perm L(f, f[perm])

f⁺ the image's KNN partner, perm a random derangement of the batch (the negative pairs).
"""
from __future__ import annotations

import numpy as np

from ..losses import correlation
from ..ops import grid_sample

PROBE_TARGET = "hard"    # STEGO's cluster probe: one-hot k-means on the detached code
PROBE_TAU = None         # its loss reads the cosines, not a softmax: the config's tau stays
TEACHER = None           # no teacher centres
LOSS_PART = "corr"
DEFAULTS = {}            # omh-ref's defaults are STEGO's values
LOOP_DEFAULTS = {}


def needs_partners(cfg) -> bool:
    return cfg.weight_inter > 0


def derangement(n, rng):
    """A uniformly random permutation of range(n) without fixed points (rejection sampling)."""
    if n < 2:
        raise ValueError("negative pairs need a batch of at least 2 images (batch_size >= 2)")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def draw(cfg, B, rng) -> dict:
    """Sampling coordinates (B, S, S, 2) for the image and for its partners, then the negative
    permutations, in that order."""
    S = cfg.feature_samples
    coords1 = rng.uniform(-1.0, 1.0, size=(B, S, S, 2))
    coords2 = rng.uniform(-1.0, 1.0, size=(B, S, S, 2))
    perms = [derangement(B, rng) for _ in range(cfg.neg_samples)] if cfg.weight_neg > 0 else []
    return {"coords1": coords1, "coords2": coords2, "perms": perms}


def init(params, cfg):
    """STEGO's cluster probe starts at N(0, 1) rows, as drawn (model.init_params)."""
    return params


def forward(cfg, f, x, z, draws, B, params=None):
    """-> (loss, parts, cache): the correlation loss of the B main images (``x[B:]`` and
    ``z[B:]`` the partners' features and codes, when there are partners)."""
    coords1, coords2 = draws["coords1"], draws["coords2"]
    fs1, _ = grid_sample.forward(f, coords1)                           # B,S,S,C
    zs1, g1 = grid_sample.forward(z[:B], coords1)                      # B,S,S,D
    corr = []  # (pair type, weight, loss cache, where the partner's code gradient goes)
    parts = {}
    loss_intra, cc = correlation.forward(fs1, fs1, zs1, zs1, cfg.shift_intra, cfg.pointwise, cfg.zero_clamp)
    corr.append(("intra", cfg.weight_intra, cc, None))
    parts["corr_intra"] = loss_intra
    loss = cfg.weight_intra * loss_intra
    if x.shape[0] > B:
        fs2, _ = grid_sample.forward(x[B:], coords2)
        zs2, g2 = grid_sample.forward(z[B:], coords2)
        loss_inter, cc = correlation.forward(fs1, fs2, zs1, zs2, cfg.shift_inter, cfg.pointwise, cfg.zero_clamp)
        corr.append(("inter", cfg.weight_inter, cc, g2))
        parts["corr_inter"] = loss_inter
        loss = loss + cfg.weight_inter * loss_inter
    neg = []
    for perm in draws["perms"]:
        fsn, _ = grid_sample.forward(f, coords2, images=perm)          # f[perm] sampled, no copy
        zsn, gn = grid_sample.forward(z, coords2, images=perm)         # z[:B][perm] likewise
        ln, cc = correlation.forward(fs1, fsn, zs1, zsn, cfg.shift_neg, cfg.pointwise, cfg.zero_clamp)
        corr.append(("neg", cfg.weight_neg / len(draws["perms"]), cc, (gn, perm)))
        neg.append(ln)
    if neg:
        parts["corr_neg"] = sum(neg) / len(neg)
        loss = loss + cfg.weight_neg * parts["corr_neg"]
    parts["corr"] = loss
    return loss, parts, (B, g1, corr)


def backward(dloss, cache, dz):
    """Adds d(dloss · loss)/dz into ``dz`` (2B or B, h, w, D): the main image's sampled code
    collects every pair's first-argument gradient."""
    B, g1, corr = cache
    dzs1 = 0
    for name, wt, cc, route in corr:
        dca, dcb = correlation.backward(wt * dloss, cc)
        dzs1 = dzs1 + dca
        if name == "intra":
            dzs1 = dzs1 + dcb
        elif name == "inter":
            dz[B:] += grid_sample.backward(dcb, route)
        else:
            gn, perm = route
            dz[:B][perm] += grid_sample.backward(dcb, gn)   # perm has no repeats: += is safe
    dz[:B] += grid_sample.backward(dzs1, g1)
