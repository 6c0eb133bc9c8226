"""Small valid configs and random batches for gradient checks, tests, benchmarks and outside
checkers (not used in training)."""
from __future__ import annotations

import numpy as np

from .config import Config

# Loss weights of :func:`small_config`: distinct from each other and from 1 (and from the
# defaults), so that a weight dropped, swapped or applied twice in a backward changes the gradient.
SMALL_WEIGHTS = dict(lam_clu=0.7, lam_hier=1.3, lam_w=0.37, weight_intra=0.45, weight_inter=0.85,
                     weight_neg=1.55)


def small_config(**overrides) -> Config:
    """A tiny valid config with odd, distinct sizes (so transposes fail loudly) and distinct,
    non-unit loss weights (so a wrong weight in a backward fails loudly: :data:`SMALL_WEIGHTS`)."""
    base = dict(in_dim=7, dim=5, levels=(6, 4, 3), feature_samples=3, neg_samples=2,
                sinkhorn_iters=10, sinkhorn_iters_q=5, eps=0.3, eps_q=0.3, tau=0.5, **SMALL_WEIGHTS)
    base.update(overrides)
    return Config(**base)


def random_batch(cfg: Config, rng, B=3, h=5, w=4, dtype=np.float64) -> dict:
    """A valid batch of random features: {'feats', 'feats_pos'} each (B, h, w, C)."""
    shape = (B, h, w, cfg.in_dim)
    return {"feats": rng.standard_normal(shape).astype(dtype),
            "feats_pos": rng.standard_normal(shape).astype(dtype)}
