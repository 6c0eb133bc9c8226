"""What the tests build, in one place: feature files and known worlds with labels (the package's
own synthetic data, omh_ref.features.synthetic, is the demo's; these are the small, exact ones).
Test modules import these instead of each other's helpers."""
import numpy as np
from numpy.lib.format import open_memmap

from omh_ref.features.store import FeatureStore


def write_feats(path, N=24, h=6, w=5, C=7, dtype=np.float16, seed=0) -> str:
    """A feature file (N, h, w, C) of standard normal values, written through a memmap (as
    extraction writes it), in its folder (made if missing). -> its path as a string."""
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    f = open_memmap(path, mode="w+", dtype=dtype, shape=(N, h, w, C))
    f[:] = np.random.default_rng(seed).standard_normal(f.shape)
    f.flush()
    del f
    return str(path)


def known_world(tmp_path, N=6, h=4, C=5, K=3, patch=2, seed=0):
    """Features that are exactly one of K orthogonal prototypes per patch, labels at patch x2
    (one ignored pixel). -> (FeatureStore with its labels, the prototypes (K, C))."""
    rng = np.random.default_rng(seed)
    protos = np.eye(C)[:K] * 3.0
    lab_grid = rng.integers(0, K, size=(N, h, h))
    feats = open_memmap(tmp_path / "feats.npy", mode="w+", dtype=np.float32, shape=(N, h, h, C))
    feats[:] = protos[lab_grid]
    feats.flush()
    labels = np.repeat(np.repeat(lab_grid, patch, axis=1), patch, axis=2).astype(np.uint8)
    labels[0, 0, 0] = 255                          # an ignored pixel
    np.save(tmp_path / "labels.npy", labels)
    del feats
    return FeatureStore(tmp_path / "feats.npy", labels=tmp_path / "labels.npy"), protos


def identity_params(cfg, protos, perm):
    """A model whose code is the features (identity head) and whose eval level's centroids are the
    prototypes in the order ``perm`` (cluster c = prototype perm[c]); the other levels zero."""
    C, D = cfg.in_dim, cfg.dim
    p = {"W1": np.eye(D, C, dtype=np.float32), "b1": np.zeros(D, np.float32),
         "W2": np.zeros((C, C), np.float32), "b2": np.zeros(C, np.float32),
         "W3": np.zeros((D, C), np.float32), "b3": np.zeros(D, np.float32)}
    for i, k in enumerate(cfg.levels):
        p[f"M{i}"] = np.zeros((k, D), np.float32)
    p[f"M{len(cfg.levels) - 1}"] = protos[perm].astype(np.float32)   # clusters = permuted classes
    return p
