"""Confusion matrix, Hungarian matching and scores: STEGO's ``UnsupervisedMetrics`` in NumPy, with
both conventions for extra clusters.

Orientation: ``conf[k, c]`` is the number of pixels predicted as cluster k whose label is class c,
shape (n_clusters, n_classes), int64: STEGO's ``stats[pred, actual]``. The confusion counts every
cluster (pixels with 0 ≤ label < n_classes and 0 ≤ pred < n_clusters; other predictions are
dropped); the protocols below differ only in what they make of it.

What is reproduced from STEGO (mhamilton723/STEGO, ``src/utils.py``, ``UnsupervisedMetrics``; HP,
hynnsk/HP ``utils/seg_utils.py``, has the same class):

* Matching: ``scipy.optimize.linear_sum_assignment(conf, maximize=True)`` on pixel counts.
* Scores: the matched histogram ``H`` has row c = ``conf[cluster matched to c]``. With extra
  clusters (``n_clusters > n_classes``) STEGO appends one row, the sum of the unmatched clusters'
  rows, and one zero column, so ``H`` is (K+1, K+1) and the unmatched clusters act as one extra
  class that is never right. Then ``tp = diag H``, ``iou = tp / (rowsum + colsum − tp)``,
  ``miou = mean of the non-NaN iou`` (the extra entry included: 0 when the unmatched clusters
  hold any pixel, NaN and left out when they hold none), ``acc = Σ tp / Σ H``. All ×100.
* STEGO solves the assignment twice with extra clusters (``stats`` for the unmatched set,
  ``stats.t()`` for the histogram's row order). SciPy solves a tall matrix by transposing it
  (``rectangular_lsap.cpp``: "tall rectangular cost matrix must be transposed"), so both calls
  return the same matching even under ties; one solve is enough, and a test pins this.

Extra clusters, two protocols (:data:`PROTOCOLS`; with ``n_clusters == n_classes`` they agree):

* ``stego`` (the headline ``miou``/``acc``): STEGO's and HP's exact protocol. Their ``update``
  counts a pixel only where ``preds < n_classes``, so every pixel predicted into a cluster id ≥
  n_classes is dropped from every count, the accuracy's denominator included. The extra clusters'
  rows stay empty, the matching runs on the first n_classes cluster ids, and the extra pseudo-class
  is empty (IoU NaN, left out of the mean). Which clusters are "extra" is decided by their index,
  before any matching.
* ``strict``: every cluster counts; pixels in clusters left unmatched by the Hungarian matching
  are errors (STEGO's extra row, whose IoU, usually 0, enters the mean).

Where we differ on purpose: labels that are neither a class nor an ignore value (−1, 255) raise a
ValueError instead of being dropped; everything is float64 (STEGO's extra-cluster histogram is
float32, exact only up to 2^24 pixels per cell).

Speed: one ``bincount`` per batch over a joint index computed in the smallest unsigned dtype that
holds it (uint16 for 8-bit labels and up to 255 clusters), with no boolean masking: ignore and
invalid label values get their own histogram rows, which are then dropped (ignore) or reported
(invalid). Unsigned arithmetic wraps modulo 2^k, so −1 labels need no widening.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ..core.backend import get_array_module, to_host

IGNORE = (-1, 255)   # label values that mark unlabelled pixels (when they are not a class)


def _check_sizes(n_clusters, n_classes):
    for name, n in (("n_clusters", n_clusters), ("n_classes", n_classes)):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"{name}: expected a positive integer, got {n!r}")
    if n_clusters < n_classes:
        raise ValueError(f"n_clusters: must be >= n_classes={n_classes} "
                         f"(STEGO's extra_clusters >= 0), got {n_clusters}")
    return int(n_clusters), int(n_classes)


def _int_array(x, name, xp):
    x = xp.asarray(x)
    if x.dtype.kind not in "iu":
        raise ValueError(f"{name}: expected an integer array, got dtype {x.dtype}")
    return x


def _index_dtype(n_bins):
    if n_bins <= 2**16:
        return np.uint16
    if n_bins <= 2**32:
        return np.uint32
    return np.intp


class ConfusionAccumulator:
    """Streaming confusion matrix over batches: ``update(pred, label)`` per batch, then ``.matrix``.

    ``matrix`` (n_clusters, n_classes) int64 on the host, ``matrix[k, c]`` = pixels predicted k with
    label c. ``update`` validates a whole batch before adding it, so a rejected batch leaves the
    matrix unchanged. Inputs may be numpy or cupy arrays of any integer dtypes and any (equal)
    shape; a scratch index buffer is kept between batches to spare the allocation.
    """

    def __init__(self, n_clusters, n_classes):
        self.n_clusters, self.n_classes = _check_sizes(n_clusters, n_classes)
        self.matrix = np.zeros((self.n_clusters, self.n_classes), dtype=np.int64)
        self._scratch = None

    @property
    def n_pixels(self):
        """Pixels counted so far."""
        return int(self.matrix.sum())

    def _buffer(self, xp, n, dtype):
        s = self._scratch
        if s is None or get_array_module(s) is not xp or s.dtype != dtype or s.size < n:
            s = self._scratch = xp.empty(n, dtype=dtype)
        return s[:n]

    def update(self, pred, label):
        """Add one batch. pred: cluster ids, label: class ids (−1/255 = ignore), same shape."""
        xp = get_array_module(pred, label)
        pred, label = _int_array(pred, "pred", xp), _int_array(label, "label", xp)
        if pred.shape != label.shape:
            raise ValueError(f"pred: shape {pred.shape} does not match label shape {label.shape}")
        if label.size == 0:
            return
        K, C = self.n_clusters, self.n_classes
        pred, label = pred.reshape(-1), label.reshape(-1)

        # Label rows: every value in [lo, hi] gets a row, ignore and invalid values included.
        # uint8 needs no pass over the data (all 256 values are rows).
        if label.dtype == np.uint8:
            lo, hi = 0, 255
        else:
            lo, hi = int(label.min()), int(label.max())
            for v in (lo, hi):
                if not (0 <= v < C or v in IGNORE):
                    raise ValueError(f"label: values must be in [0, {C}) or an ignore value "
                                     f"{IGNORE}, found {v}")
        base = min(lo, 0)              # 0 or −1: the label value of row 0
        R = max(hi, C - 1) - base + 1

        # Prediction columns: in-range predictions are their own column; any out-of-range value
        # (dropped, as STEGO) sends the batch through a masked copy with one extra trash column.
        # One pass: viewed as unsigned, negative ids become huge, so the max tests both ends.
        if int(pred.view(pred.dtype.str.replace("i", "u")).max()) < K:
            P = K
        else:
            pred = xp.where((pred >= 0) & (pred < K), pred, K)
            P = K + 1

        # idx = (label − base)·P + pred, wrapping modulo 2^k on the way; the true value is < R·P.
        dt = _index_dtype(R * P)
        idx = self._buffer(xp, label.size, dt)
        xp.multiply(label, P, out=idx, dtype=dt, casting="unsafe")
        xp.add(idx, pred, out=idx, dtype=dt, casting="unsafe")
        if base:
            xp.add(idx, P, out=idx, dtype=dt, casting="unsafe")
        counts = to_host(xp.bincount(idx, minlength=R * P)).reshape(R, P)

        values = base + np.arange(R)
        is_class = (values >= 0) & (values < C)
        bad = ~is_class & ~np.isin(values, IGNORE) & (counts.sum(axis=1) > 0)
        if bad.any():
            v = int(values[bad][0])
            raise ValueError(f"label: values must be in [0, {C}) or an ignore value {IGNORE}, "
                             f"found {v} ({int(counts[values == v].sum())} pixels)")
        self.matrix += counts[is_class, :K].T


def confusion(pred, label, n_clusters, n_classes):
    """One-shot confusion matrix: ``conf[k, c] = #{pixels: pred = k, label = c}``.

    pred, label: integer arrays of one shape (any), label −1/255 = ignore (when not a class).
    Returns (n_clusters, n_classes) int64. Pixels with 0 ≤ label < n_classes and
    0 ≤ pred < n_clusters are counted; other labels raise a ValueError.
    """
    acc = ConfusionAccumulator(n_clusters, n_classes)
    acc.update(pred, label)
    return acc.matrix


@dataclass(frozen=True)
class Match:
    """A cluster→class matching.

    cluster_to_class: (n_clusters,) int64, the class of each cluster, −1 for unmatched clusters.
    class_to_cluster: (n_classes,) int64, the cluster matched to each class.
    unmatched: (n_clusters − n_classes,) int64, sorted ids of the clusters with no class.
    """
    cluster_to_class: np.ndarray
    class_to_cluster: np.ndarray
    unmatched: np.ndarray

    def to_dict(self):
        """JSON-ready lists."""
        return {"cluster_to_class": self.cluster_to_class.tolist(),
                "class_to_cluster": self.class_to_cluster.tolist(),
                "unmatched": self.unmatched.tolist()}


def _check_conf(conf):
    conf = np.asarray(to_host(conf))
    if conf.ndim != 2:
        raise ValueError(f"conf: expected a (n_clusters, n_classes) matrix, got shape {conf.shape}")
    if conf.shape[0] < conf.shape[1]:
        raise ValueError(f"conf: needs n_clusters >= n_classes, got shape {conf.shape}")
    if conf.size == 0:
        raise ValueError(f"conf: empty matrix of shape {conf.shape}")
    if not np.all(np.isfinite(conf)) or (conf < 0).any():
        raise ValueError("conf: counts must be finite and non-negative")
    return conf


def _match_from(cluster_ids, class_ids, n_clusters, n_classes):
    c2k = np.full(n_clusters, -1, dtype=np.int64)
    c2k[cluster_ids] = class_ids
    k2c = np.empty(n_classes, dtype=np.int64)
    k2c[class_ids] = cluster_ids
    return Match(c2k, k2c, np.flatnonzero(c2k < 0).astype(np.int64))


def hungarian(conf):
    """Maximum-pixel one-to-one matching of clusters to classes.

    ``linear_sum_assignment(conf, maximize=True)`` on the (n_clusters, n_classes) counts; with more
    clusters than classes the leftover clusters are reported in ``Match.unmatched``. -> Match.
    """
    conf = _check_conf(conf)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    return _match_from(rows, cols, *conf.shape)


def identity_match(n_clusters, n_classes):
    """Cluster c is class c (the linear probe's mapping; STEGO's ``compute_hungarian=False``);
    clusters ≥ n_classes are unmatched. -> Match."""
    n_clusters, n_classes = _check_sizes(n_clusters, n_classes)
    ids = np.arange(n_classes)
    return _match_from(ids, ids, n_clusters, n_classes)


def matched_histogram(conf, match):
    """STEGO's histogram: (K, K) float64 for K = n_classes, row c = the counts of the cluster
    matched to class c; with unmatched clusters one more row (their summed counts) and a zero
    column, (K+1, K+1)."""
    conf = _check_conf(conf)
    n_clusters, n_classes = conf.shape
    if (match.cluster_to_class.shape != (n_clusters,)
            or match.class_to_cluster.shape != (n_classes,)):
        raise ValueError(f"match: made for {match.cluster_to_class.size} clusters and "
                         f"{match.class_to_cluster.size} classes, conf has shape {conf.shape}")
    hist = conf[match.class_to_cluster].astype(np.float64)         # K, K
    if match.unmatched.size:
        extra = conf[match.unmatched].sum(axis=0, dtype=np.float64)  # K
        hist = np.block([[hist, np.zeros((n_classes, 1))],
                         [extra[None, :], np.zeros((1, 1))]])       # K+1, K+1
    return hist


PROTOCOLS = {
    "stego": "pixels predicted into a cluster id >= n_classes dropped (STEGO's and HP's mask preds < n_classes)",
    "strict": "every cluster counted; pixels in clusters the matching leaves unmatched are errors",
}
HEADLINE = "stego"   # the protocol of the top-level miou / acc / iou (docs/DECISIONS.md says why)


def stego_confusion(conf):
    """The confusion STEGO's ``update`` would have counted: rows of cluster ids ≥ n_classes
    emptied (its mask ``preds < n_classes`` drops those pixels)."""
    conf = _check_conf(conf).copy()
    conf[conf.shape[1]:] = 0
    return conf


def protocol_scores(conf, match=None, protocol=HEADLINE):
    """mIoU, pixel accuracy and per-class IoU of a confusion matrix under one protocol, ×100.

    ``iou_c = tp_c / (pixels predicted c + pixels labelled c − tp_c)`` on the matched histogram
    (see :func:`matched_histogram`); NaN for a class absent from both prediction and label.
    ``miou`` = mean of the non-NaN entries of iou and ``iou_unmatched``; ``acc = Σ tp / all counted
    pixels``. conf (n_clusters, n_classes); match defaults to ``hungarian`` of the protocol's counts
    (``stego``: :func:`stego_confusion`). Under ``stego`` a split whose every pixel fell into an
    extra cluster id has no counted pixel: NaN scores, as STEGO's 0/0.

    -> {"miou": float, "acc": float, "iou": (n_classes,) float64, "iou_unmatched": float (the
        unmatched clusters' pseudo-class; NaN when there are none or they hold no pixels),
        "match": Match, "pixels": int (counted)}.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol: expected one of {tuple(PROTOCOLS)}, got {protocol!r}")
    conf = stego_confusion(conf) if protocol == "stego" else _check_conf(conf)
    if match is None:
        match = hungarian(conf)
    hist = matched_histogram(conf, match)
    n_classes = conf.shape[1]
    tp = np.diag(hist)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (hist.sum(axis=1) + hist.sum(axis=0) - tp)   # 0/0 -> NaN: class never seen
        acc = tp.sum() / hist.sum()
    seen = iou[~np.isnan(iou)]
    return {"miou": 100 * float(seen.mean()) if seen.size else float("nan"),
            "acc": 100 * float(acc),
            "iou": 100 * iou[:n_classes],
            "iou_unmatched": 100 * float(iou[n_classes]) if iou.size > n_classes else float("nan"),
            "match": match, "pixels": int(hist.sum())}


def majority_classes(conf):
    """(n_clusters,) int64: each cluster's majority class (the most pixels; ties to the lower class
    id), −1 for a cluster that holds no counted pixel. Depends on no cluster's id."""
    conf = np.asarray(to_host(conf))
    out = conf.argmax(axis=1).astype(np.int64)
    out[conf.sum(axis=1) == 0] = -1
    return out


def many_to_one_scores(conf):
    """mIoU, accuracy and per-class IoU, ×100, when every cluster is its majority class
    (:func:`majority_classes`): several clusters may share a class, a class may have none (IoU 0
    where it holds pixels), and every pixel counts. The score of an over-clustered level that
    does not depend on which clusters happen to get which ids, nor punish a class split over two
    clusters; it does reward more clusters (one cluster per pixel scores 100), so it is reported
    beside the one-to-one strict score, not instead of it.

    -> {"miou", "acc", "iou" (n_classes,), "cluster_to_class" (n_clusters,), "pixels"}."""
    conf = _check_conf(conf)
    n_classes = conf.shape[1]
    c2k = majority_classes(conf)
    hist = np.zeros((n_classes, n_classes), dtype=np.float64)       # hist[predicted class, label]
    used = c2k >= 0
    np.add.at(hist, c2k[used], conf[used].astype(np.float64))
    tp = np.diag(hist)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = tp / (hist.sum(axis=1) + hist.sum(axis=0) - tp)
        acc = tp.sum() / hist.sum()
    seen = iou[~np.isnan(iou)]
    return {"miou": 100 * float(seen.mean()) if seen.size else float("nan"), "acc": 100 * float(acc),
            "iou": 100 * iou, "cluster_to_class": c2k, "pixels": int(hist.sum())}


def scores(conf, match=None):
    """Both protocols of a confusion matrix (:data:`PROTOCOLS`): the headline ``stego`` scores at
    the top level (``miou``, ``acc``, ``iou``, ``iou_unmatched``, ``match``, ``pixels``, as
    :func:`protocol_scores`), ``protocol`` naming it, and ``strict`` holding the other. A given
    ``match`` (e.g. the linear probe's identity) is used by both. A confusion with no counted
    pixel at all is a ValueError."""
    conf = _check_conf(conf)
    if conf.sum() == 0:
        raise ValueError("conf: no valid pixels counted (empty input, or every label ignored)")
    out = protocol_scores(conf, match, HEADLINE)
    out["protocol"] = HEADLINE
    out["strict"] = protocol_scores(conf, match, "strict")
    return out
