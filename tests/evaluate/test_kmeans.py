"""Spherical k-means, where the right answer is known: well-separated directions are found
exactly (every point with its own direction's cluster), restarts keep the best of their runs, a
bad single start is beaten by restarts, and the head built from the centres scores a planted
code perfectly through the evaluation every other head goes through."""
import numpy as np

from omh_ref.core.config import Config
from omh_ref.evaluate.kmeans import fit_codes, spherical_kmeans, with_centres
from omh_ref.evaluate.predict import cluster_eval
from tests.builders import identity_params, known_world


def _blobs(K=5, n=80, C=8, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    dirs = np.linalg.qr(rng.standard_normal((C, C)))[0][:K]
    lab = np.repeat(np.arange(K), n)
    x = dirs[lab] + noise * rng.standard_normal((K * n, C))
    return x / np.linalg.norm(x, axis=1, keepdims=True), lab, dirs


def test_separated_directions_are_found_exactly():
    x, lab, dirs = _blobs()
    C = spherical_kmeans(x, 5, np.random.default_rng(1), restarts=3)
    a = (x @ C.T).argmax(axis=1)
    # one cluster per true direction: the partition equals the labels up to renaming
    assert len({(t, p) for t, p in zip(lab, a)}) == 5 and len(set(a)) == 5
    assert np.allclose(np.abs(np.sort((C @ dirs.T).max(axis=1))), 1, atol=0.01)


def test_restarts_keep_the_best_run():
    """restarts=r is the best (highest mean cosine) of the r runs a generator draws in turn."""
    x, _, _ = _blobs(K=6, noise=0.4, seed=3)
    score = lambda C: (x @ C.T).max(axis=1).mean()   # noqa: E731
    rng = np.random.default_rng(7)
    singles = [score(spherical_kmeans(x, 6, rng)) for _ in range(4)]
    best = score(spherical_kmeans(x, 6, np.random.default_rng(7), restarts=4))
    assert best == max(singles) and len(set(np.round(singles, 9))) > 1


def test_a_head_of_kmeans_centres_on_a_planted_code_scores_perfectly(tmp_path):
    """Features that are one of K prototypes per patch, an identity code: k-means finds the
    prototypes, and the eval level with those centres is matched perfectly (mIoU 100) where
    random centroids are not."""
    store, protos = known_world(tmp_path, N=6, h=4, C=5, K=3)
    cfg = Config(in_dim=5, dim=5, levels=(3,), eval_level=0)
    params = identity_params(cfg, np.random.default_rng(0).standard_normal((3, 5)), [0, 1, 2])
    centres = fit_codes(params, store, 3, seed=0, n_fit=96, restarts=3, cfg=cfg)
    fitted = with_centres(params, cfg, centres)
    assert cluster_eval(fitted, cfg, store, 3)[0]["miou"] == 100.0
    assert cluster_eval(params, cfg, store, 3)[0]["miou"] < 100.0
    assert np.allclose(np.sort((centres @ (protos / np.linalg.norm(protos, axis=1, keepdims=True)).T).max(1)), 1)
