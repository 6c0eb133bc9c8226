"""The match file: evaluation's Hungarian cluster -> class matching, saved (``omh-ref eval
--save-match match.json``) so that ``omh-ref segment --match match.json`` can give class ids and
names instead of cluster ids.

A match belongs to one checkpoint's eval level: the file records the checkpoint's sha256 and the
number of clusters, and :func:`load` refuses it for another checkpoint (cluster ids of another
training run mean nothing).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.files import write_json

FORMAT = 1


def record(match, class_names, checkpoint, checkpoint_sha256, eval_level, scores=None, crf=False) -> dict:
    """The JSON record of a :class:`omh_ref.evaluate.metrics.Match`."""
    return {"format": FORMAT, "kind": "omh-ref cluster->class match",
            "checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256,
            "eval_level": int(eval_level), "n_clusters": int(len(match.cluster_to_class)),
            "n_classes": int(len(match.class_to_cluster)), "class_names": list(class_names),
            **match.to_dict(), "crf": bool(crf),
            **({"miou": scores["miou"], "acc": scores["acc"]} if scores else {})}


def save(path, rec: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rec)


def load(path, checkpoint_sha256=None, n_clusters=None) -> dict:
    """A match file, checked: its format, its fields, and (when given) that it was made for the
    checkpoint with this sha256 and an eval level of ``n_clusters`` clusters. Adds
    ``lut`` (n_clusters,) int64: the class of each cluster, -1 where none."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--match {path}: no such file (expected the match.json of omh-ref eval --save-match)")
    try:
        rec = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"--match {path}: not a JSON file ({e})") from None
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise InputError(f"--match {path}: not a match file of this omh-ref (expected format {FORMAT}, "
                         "written by omh-ref eval --save-match)")
    try:
        lut = np.asarray(rec["cluster_to_class"], dtype=np.int64)
        names = [str(n) for n in rec["class_names"]]
        n_classes = int(rec["n_classes"])
        sha = rec["checkpoint_sha256"]
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"--match {path}: a field is missing or malformed ({type(e).__name__}: {e})") from None
    if lut.ndim != 1 or len(names) != n_classes or lut.size and (lut.min() < -1 or lut.max() >= n_classes):
        raise InputError(f"--match {path}: cluster_to_class and class_names disagree with n_classes={n_classes}")
    if checkpoint_sha256 is not None and sha != checkpoint_sha256:
        raise InputError(f"--match {path}: made for another checkpoint ({rec.get('checkpoint')}, sha256 "
                         f"{str(sha)[:12]}...); run omh-ref eval --save-match on this checkpoint")
    if n_clusters is not None and len(lut) != n_clusters:
        raise InputError(f"--match {path}: maps {len(lut)} clusters, but the checkpoint's eval level has {n_clusters}")
    return {**rec, "lut": lut, "class_names": names, "n_classes": n_classes}
