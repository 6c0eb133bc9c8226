"""Spherical k-means: a fair cluster head for a code no cluster head was trained with.

STEGO's own cluster probe is trained beside its projection head (a hard k-means loss on the
detached code, minibatch by minibatch); on the demo data it keeps three live clusters on every
seed. A user of the field would also run k-means on the trained code and score that, so the demo
reports both: :func:`fit_codes` fits spherical k-means (cosine, k-means++ seeding, several
restarts, the best mean cosine kept) on a sample of the training split's codes, and
:func:`with_centres` puts the centres in place of a level's centroids, so the prediction and the
scores are the ones every other head gets (``cluster_eval``).

scikit-learn's KMeans is Euclidean and not a dependency; on unit vectors spherical k-means needs
the centres renormalised each step, which these twenty lines do.
"""
from __future__ import annotations

import numpy as np

from ..core.backend import to_device, to_host
from ..core.config import Config
from ..core.model import predictor
from .predict import codes


def spherical_kmeans(x, K, rng, iters=50, restarts=1):
    """x (N, C) unit rows -> (K, C) unit centres: ``restarts`` runs of k-means++ seeding from
    ``rng`` and ``iters`` Lloyd steps on the cosine, the one of highest mean cosine to its centre
    kept (restarts=1: the first run, as drawn). An emptied cluster is re-seeded on a random row."""
    best, best_score = None, -np.inf
    for _ in range(restarts):
        C = _seed(x, K, rng)
        for _ in range(iters):
            a = (x @ C.T).argmax(axis=1)
            for k in range(K):
                m = a == k
                C[k] = x[m].sum(axis=0) if m.any() else x[rng.integers(len(x))]
            C /= np.linalg.norm(C, axis=1, keepdims=True)
        score = float((x @ C.T).max(axis=1).mean())
        if score > best_score:
            best, best_score = C, score
    return best


def _seed(x, K, rng):
    C = [x[rng.integers(len(x))]]
    for _ in range(K - 1):
        d = np.maximum(1 - np.max(x @ np.stack(C).T, axis=1), 0)
        C.append(x[rng.choice(len(x), p=d / d.sum())])
    return np.stack(C)


def fit_codes(params, store, K, seed, n_fit=30000, restarts=5, batch_size=16, device="cpu", *, cfg: Config):
    """Spherical k-means centres (K, D) of ``n_fit`` code vectors drawn uniformly from the split
    ``store`` (streamed batch by batch: a fixed number of pixels per image is kept)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(11,)))
    per_image = max(1, -(-n_fit // store.N))
    sample = []
    for _, z in codes(params, store, batch_size, None, device, cfg=cfg):
        z = to_host(z).reshape(len(z), -1, z.shape[-1]).astype(np.float64)
        pick = rng.integers(z.shape[1], size=(len(z), per_image))
        sample.append(np.take_along_axis(z, pick[..., None], axis=1).reshape(-1, z.shape[-1]))
    x = np.concatenate(sample)[:n_fit]
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return spherical_kmeans(x, K, rng, restarts=restarts)


def with_centres(params, cfg: Config, centres, device="cpu") -> dict:
    """``params`` with the eval level's centroids replaced by ``centres`` (on ``device``)."""
    key = predictor(cfg, cfg.eval_index)
    return {**params, key: to_device(centres.astype(np.dtype(params[key].dtype)), device)}
