"""Codes, cluster predictions and their scores for a trained checkpoint (docs/METHOD.md).

* Codes: the projection head (:mod:`omh_ref.core.head`) without dropout, batch by batch over a
  memory-mapped feature file; with a flipped feature file, the flipped code is flipped back and
  averaged (STEGO).
* Cluster predictions: the eval level's cosine logits, bilinearly upsampled (align_corners=False)
  to label resolution, argmax; scored by Hungarian matching on the confusion over the whole split
  (:mod:`.metrics`), optionally after the dense CRF (:mod:`.crf`).
"""
from __future__ import annotations

import numpy as np

from ..core import head
from ..core.backend import to_device, to_host
from ..core.config import Config
from ..core.errors import InputError
from ..core.model import predictor
from ..core.ops import cosine, resize
from ..features.store import FeatureStore
from . import metrics


def code(params, f, cfg: Config):
    """The code z (B, h, w, D) of features f (B, h, w, C): the projection head (with the config's
    activation), no dropout."""
    return head.forward(params, f, cfg.head_activation)[0]


def codes(params, store: FeatureStore, batch_size=16, flipped: FeatureStore | None = None, device="cpu", *,
          cfg: Config):
    """Yield (start, z) over the store; z (B, h, w, D) on ``device``."""
    dt = params["W1"].dtype
    for s, f in store.batches(batch_size):
        z = code(params, to_device(f.astype(dt), device), cfg)
        if flipped is not None:
            ff = to_device(flipped.read(np.arange(s, s + len(f))).astype(dt), device)
            z = (z + code(params, ff, cfg)[:, :, ::-1]) / 2
        yield s, z


def check_compat(params, cfg: Config, store: FeatureStore):
    if store.C != params["W1"].shape[1]:
        raise InputError(f"{store.path}: features have C={store.C} channels but the checkpoint's head expects "
                         f"{params['W1'].shape[1]}")


def label_shape(store: FeatureStore):
    if store.labels is None:
        raise InputError(f"{store.path}: no labels given (expected --labels labels.npy)")
    return store.labels.shape[1:]


UPSAMPLE = ("logits", "code")   # what is upsampled to label resolution: omh-ref's order, the peers'


def cluster_logits(params, cfg: Config, z, size, upsample="logits"):
    """Eval-level cosine logits of codes z (B, h, w, D) at ``size`` -> (B, H, W, K): the logits
    upsampled (``upsample="logits"``, omh-ref's), or the code upsampled and its cosines taken at
    ``size`` (``"code"``: STEGO's and SmooSeg's order, STEGO src/eval_segmentation.py line 128,
    SmooSeg eval_segmentation.py line 90; the argmax differs near cluster boundaries, the cosine
    not being linear in the code)."""
    M = params[predictor(cfg, cfg.eval_index)]
    if upsample == "code":
        return cosine.forward(resize.forward(z, size)[0], M)[0]
    s, _ = cosine.forward(z, M)
    return resize.forward(s, size)[0]


def level_predictions(params, cfg: Config, store: FeatureStore, rows, flipped=None, device="cpu") -> list:
    """Every level's cluster predictions of the rows ``rows`` of ``store`` (a few: a report's
    pictures), finest first, as the levels are scored: the code (flipped features averaged as
    :func:`codes` does), each level's cosine logits upsampled to label resolution, argmax ->
    [(len(rows), H, W) host arrays]."""
    rows = np.asarray(rows)
    dt = params["W1"].dtype
    z = code(params, to_device(store.read(rows).astype(dt), device), cfg)
    if flipped is not None:
        z = (z + code(params, to_device(flipped.read(rows).astype(dt), device), cfg)[:, :, ::-1]) / 2
    size = label_shape(store)
    return [to_host(resize.forward(cosine.forward(z, params[predictor(cfg, lvl)])[0], size)[0].argmax(axis=-1))
            for lvl in range(len(cfg.levels))]


def cluster_eval(params, cfg: Config, store: FeatureStore, n_classes, batch_size=16, flipped=None,
                 device="cpu", keep=0, crf_workers=None, crf_timeout=600.0, usage=None, on_batch=None,
                 levels=None, crf_images=None, upsample="logits"):
    """Confusion over the whole split, Hungarian matching and scores.

    crf_workers: None = no CRF; else refine every prediction with the dense CRF (serially for 1, a
    process pool otherwise) on the images ``crf_images(start, n)`` gives, (n, H, W, 3) uint8 at
    label resolution (the eval job reads those ``feats.json`` lists). usage: a
    :class:`~omh_ref.evaluate.hierarchy.UsageAccumulator` given every batch's codes on the way
    (the levels' mean assignments over the split, for the hierarchy's usage marginals). levels: a
    :class:`~omh_ref.evaluate.granular.LevelScorer` given every batch's codes on the way (every
    level's scores against its label granularity).
    on_batch: called as ``on_batch(start, clusters, refined)`` for every batch, with the cluster
    predictions (B, H, W) and the CRF's (or None without it), as they stream by. upsample: see
    :func:`cluster_logits`.
    -> (result dict: :func:`omh_ref.evaluate.metrics.scores`' keys (the headline protocol's miou, acc,
    iou, match ..., and ``strict``) and ``confusion``, the first ``keep`` predictions)."""
    check_compat(params, cfg, store)
    size = label_shape(store)
    K = cfg.levels[cfg.eval_level]
    acc = metrics.ConfusionAccumulator(K, n_classes)
    if crf_workers is not None and crf_images is None:
        raise ValueError("cluster_eval: the CRF needs the images (crf_images)")
    refine = crf_workers is not None
    kept = []
    for s, z in codes(params, store, batch_size, flipped, device, cfg=cfg):
        if usage is not None:
            usage.update(params, z)
        if levels is not None:
            levels.update(params, z, s)
        logits = cluster_logits(params, cfg, z, size, upsample)
        raw = to_host(logits.argmax(axis=-1)) if not refine or on_batch is not None else None
        if not refine:
            pred = raw
        else:
            from . import crf

            pred = crf.refine_batch(crf_images(s, len(z)), to_host(logits), crf_workers, crf_timeout)
        if on_batch is not None:
            on_batch(s, raw, pred if refine else None)
        update_confusion(acc, pred, store, s)
        if len(kept) < keep:
            kept.extend(pred[: keep - len(kept)])
    return summarize(acc.matrix, store), np.asarray(kept)


def update_confusion(acc, pred, store, start):
    """Accumulate one batch; bad labels become an InputError naming the labels file."""
    try:
        acc.update(pred, store.read_labels(np.arange(start, start + len(pred))))
    except ValueError as e:
        raise InputError(f"{store.labels_path}: {e}") from None


def scores_json(res) -> dict:
    """JSON-ready scores (NaN -> None): the headline protocol's miou, acc, per-class iou, the
    unmatched clusters' iou and match, ``protocol`` naming it, and the same under ``strict``."""
    def num(v):
        return None if np.isnan(v) else float(v)

    def one(r):
        return {"miou": num(r["miou"]), "acc": num(r["acc"]), "iou": [num(v) for v in r["iou"]],
                "iou_unmatched": num(r["iou_unmatched"]), "pixels": r["pixels"], "match": r["match"].to_dict()}
    return {"protocol": res["protocol"], **one(res), "strict": one(res["strict"])}


def summarize(conf, store, match=None):
    """Scores of a confusion matrix under both protocols (Hungarian matching unless ``match`` is
    given); a split with no labelled pixel is an InputError naming the labels file."""
    if conf.sum() == 0:
        raise InputError(f"{store.labels_path}: no labelled pixels in this split (every label is "
                         "ignore, 255 or -1, or outside [0, n_classes)); nothing to score")
    return {**metrics.scores(conf, match), "confusion": conf}


