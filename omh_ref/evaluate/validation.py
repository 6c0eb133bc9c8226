"""Validation during training: the eval level's cluster mIoU and accuracy on a labelled split
(Hungarian matching, streamed batch by batch), as the callable that
:func:`omh_ref.train.loop.train` calls every ``--val-every`` steps. It lives here, not in the
training loop, because it needs labels and metrics: the loop knows neither."""
from __future__ import annotations

from ..core.config import Config
from ..core.errors import InputError
from ..features import provenance
from ..features.meta import listed_labels, path_for
from ..features.store import FeatureStore
from .predict import cluster_eval


class Validator:
    """``Validator(features, labels=None, n_classes=None)(params, cfg) -> {"val_miou", "val_acc"}``.

    ``labels`` defaults to the file ``feats.json`` names; ``n_classes`` to its ``n_classes``, else
    the eval level's cluster count. Every problem with the split is an InputError at construction
    (:meth:`check` for the model's sizes), before any training step."""

    def __init__(self, features, labels=None, n_classes=None, batch_size=16, device="cpu"):
        labels = labels or listed_labels(features)
        if labels is None:
            raise InputError(f"--val-labels: not given, and {path_for(features)} names no labels file")
        self.store = FeatureStore(features, labels=labels)
        self.provenance = provenance.of_meta(self.store.meta) if self.store.meta else None
        self.n_classes = n_classes or self.store.meta.get("n_classes")
        self.batch_size, self.device = batch_size, device

    def check(self, cfg: Config):
        """The split fits the model: its channels, and no more classes than eval-level clusters."""
        if self.store.C != cfg.in_dim:
            raise InputError(f"{self.store.path}: validation features have C={self.store.C} channels, the "
                             f"training features {cfg.in_dim}")
        n = self.n_classes or cfg.eval_k
        if n > cfg.eval_k:
            raise InputError(f"{self.store.labels_path}: {n} classes but the eval level has {cfg.eval_k} clusters")

    def __call__(self, params, cfg: Config) -> dict:
        res, _ = cluster_eval(params, cfg, self.store, self.n_classes or cfg.eval_k, self.batch_size,
                              device=self.device)
        return {"val_miou": round(res["miou"], 4), "val_acc": round(res["acc"], 4)}
