"""Multi-granular evaluation: every cluster level scored against the label granularity that
matches it, and the learned hierarchy's consistency with the labels' own hierarchy.

**Granularities** (finest first) come from ``feats.json``'s ``label_hierarchy``
(:func:`omh_ref.features.meta.granularity`: parts -> classes -> superclasses for the synthetic
data), else from the data set's name by the ``known`` function the caller gives (the eval job
gives :func:`omh_ref.extract.datasets.label_hierarchy`: COCO-Stuff 182 -> 27 -> things/stuff,
Cityscapes 27 -> 7 categories, Potsdam 6 -> 3), else the labels file alone. A granularity whose labels file is missing is left out and said (``notes``).

**Which granularity a level is scored against**: the one with the largest number of classes not
above the level's cluster count (the closest from below), or the ``--level-labels`` choice
(:func:`parse_level_labels`). A level with fewer clusters than every granularity is not scored.

**Scores per level**: the level's own predictions (argmax of its cosine logits, bilinearly
upsampled to label resolution, as the eval level's) against the granularity's labels, a confusion
over the whole split accumulated batch by batch (nothing held), then two scores, neither of which
depends on which clusters got which ids (tested: permuting them changes no number):

* ``strict`` (the headline): one-to-one Hungarian matching, every pixel counted, the pixels of the
  clusters left unmatched errors (:func:`omh_ref.evaluate.metrics.protocol_scores`). With as many
  clusters as classes this is STEGO's protocol too. STEGO's protocol is not used for a level with
  more clusters than classes: it drops the pixels of every cluster whose *id* is ≥ n_classes, so
  the same clusters score 25 or 100 depending on their ids.
* ``many_to_one``: every cluster counted as its majority class
  (:func:`omh_ref.evaluate.metrics.many_to_one_scores`); a class split over several clusters is
  not punished, so over-clustered levels score higher here (more clusters, higher score).

**Hierarchy consistency** of adjacent levels l (child) -> l+1 (parent), with A_l the row-normalised
plan the model's hierarchy computes (:func:`omh_ref.evaluate.hierarchy.hierarchy_plans`), by a
many-to-one matching at the parent's granularity: every child and every parent cluster is given
its majority class of the *parent's* granularity (the child's pixels' labels mapped up the label
hierarchy), and a child is consistent when its parent in the plan has the child's class. Over the
child level's labelled pixels: ``consistency`` takes each child's parent as ``argmax_j A_l[i, j]``,
``consistency_soft`` weighs every parent by A_l[i, j], and ``consistency_chance`` is what a blind
plan gets, one that sends every child to the parents in proportion to their pixels (so a parent
level of one class scores 1 with every plan, and says so). Nesting is what this measures: a child
cluster that is a second cluster of its class under a parent that is another cluster of the same
class is consistent (the one-to-one matching called it "another class" before, so a perfectly
nested hierarchy could score 0). A perfect model, one whose every level is its granularity's
partition (or a refinement of it) and whose plans send each child to a parent of its class, scores
consistency 1 (tested, also with over-clustered levels and permuted ids).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.backend import to_host
from ..core.config import Config
from ..core.errors import InputError
from ..core.model import predictor
from ..core.ops import cosine, resize
from ..features.meta import check_label_hierarchy
from ..features.store import FeatureStore
from . import metrics

SKIP = "-"                  # --level-labels: this level is not scored
MAX_ELEMENTS = 1 << 25      # upsampled logits held at once (floats), per level


@dataclass
class Granularity:
    """One label granularity: ``lut`` (256,) uint8 maps its labels file's values to classes (255:
    ignore), or None when the values are the classes as they are (then values outside the classes
    are reported by name, not ignored); ``parent`` (n_classes,) int64 the class of the next coarser granularity, or None."""
    name: str
    n_classes: int
    class_names: list
    labels: Path
    lut: np.ndarray | None
    parent: np.ndarray | None

    def to_dict(self):
        return {"name": self.name, "n_classes": self.n_classes, "labels": self.labels.name}


def _lut(mapping):
    if mapping is None:             # the values are the classes: invalid ones are reported by name
        return None
    lut = np.full(256, 255, dtype=np.uint8)
    lut[: len(mapping)] = mapping
    return lut


def load_granularities(store: FeatureStore, n_classes=None, notes=None, class_names=None, known=None) -> list:
    """The granularities of ``store``'s labels, finest first (see the module's doc). The one read
    from the labels file ``feats.json`` names is read from ``store.labels_path`` (the labels
    evaluation was given). ``notes`` (a list) hears what was left out and why. Without a label
    hierarchy, the labels' one granularity has ``n_classes`` classes named ``class_names`` (else
    ``feats.json``'s names where they are as many, else their numbers). ``known(dataset, fine)``:
    the label hierarchy of a known data set (with its fine labels or not), or None, for a
    ``feats.json`` written before label hierarchies."""

    notes = [] if notes is None else notes
    meta, folder = store.meta, store.path.parent
    main = meta.get("labels") or "labels.npy"
    recs = meta.get("label_hierarchy")
    if recs is None:
        fine = meta.get("labels_fine")
        if fine and not (folder / fine).is_file():
            notes.append(f"the fine labels feats.json names, {folder / fine}, do not exist: their granularity is left out")
        recs = None if known is None else known(meta.get("dataset"), bool(fine) and (folder / fine).is_file())
    if recs is None:
        n = int(n_classes or meta.get("n_classes") or 0)
        if n < 1:
            raise InputError(f"{store.path}: cannot tell the number of classes (no n_classes in feats.json)")
        names = class_names or meta.get("class_names")
        names = list(names) if names and len(names) == n else [str(i) for i in range(n)]
        return [Granularity("classes", n, names, store.labels_path, None, None)]
    check_label_hierarchy(recs, f"{store.path.with_suffix('.json')}: label_hierarchy")
    # the labels given stand in for the file feats.json names, unless they are another
    # granularity's file (eval --labels labels_fine.npy): then every granularity reads its own
    given = store.labels_path
    own = {(folder / r["labels"]).resolve() for r in recs if r["labels"] != main}
    swap = given is not None and given.resolve() not in own
    out = []
    for rec in recs:
        path = given if swap and rec["labels"] == main else folder / rec["labels"]
        if not path.is_file():
            notes.append(f"granularity {rec['name']!r} left out: its labels file {path} does not exist")
            continue
        parent = None if rec["parent"] is None else np.asarray(rec["parent"], dtype=np.int64)
        out.append(Granularity(rec["name"], rec["n_classes"], rec["class_names"], path,
                               _lut(rec["map"]), parent))
    # a granularity left out breaks the parent chain: compose the parents across the gap
    for i, g in enumerate(out[:-1]):
        j0 = [r["name"] for r in recs].index(g.name)
        j1 = [r["name"] for r in recs].index(out[i + 1].name)
        if j1 != j0 + 1:
            p = np.arange(g.n_classes)
            for r in recs[j0:j1]:
                p = np.asarray(r["parent"])[p]
            g.parent = p
    if not out:
        raise InputError(f"{store.path}: none of the label granularities has its labels file")
    out[-1].parent = None
    return out


def parse_level_labels(text, n_levels, granularities) -> list:
    """``--level-labels``: one granularity name (or index) per level, finest level first,
    comma-separated, ``-`` for a level not to score; e.g. ``parts,classes,superclasses``.
    -> [granularity index or None] per level."""
    names = [g.name for g in granularities]
    items = [t.strip() for t in str(text).split(",")]
    if len(items) != n_levels:
        raise InputError(f"--level-labels: {len(items)} entries for the model's {n_levels} levels "
                         f"(expected one per level, finest first, from {', '.join(names)} or '{SKIP}')")
    out = []
    for t in items:
        if t == SKIP:
            out.append(None)
        elif t in names:
            out.append(names.index(t))
        elif t.isdigit() and int(t) < len(names):
            out.append(int(t))
        else:
            raise InputError(f"--level-labels: unknown granularity {t!r} (expected one of {', '.join(names)}, "
                             f"an index, or '{SKIP}')")
    return out


def closest_granularities(levels, granularities) -> list:
    """Per level, the index of the granularity with the most classes not above the level's cluster
    count (None when every granularity has more)."""
    out = []
    for k in levels:
        fit = [i for i, g in enumerate(granularities) if g.n_classes <= k]
        out.append(max(fit, key=lambda i: (granularities[i].n_classes, -i)) if fit else None)
    return out


def contains(granularities, gi, gj) -> np.ndarray:
    """(n_gi, n_gj) bool: class c of granularity gi lies inside class d of gj (gi <= gj, finest
    first; a class contains itself)."""
    if gi > gj:
        raise ValueError(f"contains: granularity {gi} is coarser than {gj}")
    idx = np.arange(granularities[gi].n_classes)
    for g in granularities[gi:gj]:
        idx = g.parent[idx]
    out = np.zeros((granularities[gi].n_classes, granularities[gj].n_classes), dtype=bool)
    out[np.arange(len(idx)), idx] = True
    return out


def consistency(plan, child_conf, parent_conf):
    """Hierarchy consistency of one adjacent pair (see the module's doc).

    plan (K_c, K_p) row-normalised; child_conf (K_c, n) the child level's confusion against the
    *parent's* granularity (pixels of child cluster i with parent-granularity class c);
    parent_conf (K_p, n) the parent level's confusion. -> {'consistency', 'consistency_soft',
    'consistency_chance' (None where the child level holds no labelled pixel), 'consistent' (per
    child cluster: whether its argmax parent has its class; None for a child with no pixels)}."""
    plan = np.asarray(plan, dtype=np.float64)
    child_conf, parent_conf = np.asarray(child_conf), np.asarray(parent_conf)
    child_class, parent_class = metrics.majority_classes(child_conf), metrics.majority_classes(parent_conf)
    ok = (child_class[:, None] >= 0) & (child_class[:, None] == parent_class[None, :])      # K_c, K_p
    mass = child_conf.sum(axis=1).astype(np.float64)
    hard = ok[np.arange(len(plan)), plan.argmax(axis=1)]
    per_child = [None if m == 0 else bool(h) for m, h in zip(mass, hard)]
    total = mass.sum()
    if total <= 0:
        return {"consistency": None, "consistency_soft": None, "consistency_chance": None, "consistent": per_child}
    share = parent_conf.sum(axis=1).astype(np.float64)
    share = share / share.sum() if share.sum() > 0 else share
    return {"consistency": float((mass * hard).sum() / total),
            "consistency_soft": float((mass * (plan * ok).sum(axis=1)).sum() / total),
            "consistency_chance": float((mass * (ok @ share)).sum() / total),
            "consistent": per_child}


def level_scores_json(conf) -> dict:
    """A level's JSON scores (NaN -> None): the strict protocol's miou, acc, iou, iou_unmatched,
    pixels and match at the top (``protocol: "strict"``), the many-to-one scores under
    ``many_to_one`` (see the module's doc)."""
    def num(v):
        return None if np.isnan(v) else float(v)

    st = metrics.protocol_scores(conf, protocol="strict")
    mo = metrics.many_to_one_scores(conf)
    return {"protocol": "strict", "miou": num(st["miou"]), "acc": num(st["acc"]), "iou": [num(v) for v in st["iou"]],
            "iou_unmatched": num(st["iou_unmatched"]), "pixels": st["pixels"], "match": st["match"].to_dict(),
            "many_to_one": {"miou": num(mo["miou"]), "acc": num(mo["acc"]), "iou": [num(v) for v in mo["iou"]],
                            "cluster_to_class": mo["cluster_to_class"].tolist()}}


class LevelScorer:
    """Every scored level's confusion against its granularity, accumulated batch by batch:
    :meth:`update` with each batch's codes (as :func:`omh_ref.evaluate.predict.cluster_eval` gives
    them), then :meth:`result` with the hierarchy's plans."""

    def __init__(self, cfg: Config, store: FeatureStore, granularities, assignment=None, notes=None,
                 upsample="logits"):
        self.cfg, self.upsample = cfg, upsample     # upsample: the logits or the code (predict.cluster_logits)
        self.granularities = granularities
        self.notes = list(notes or [])
        levels = self.cfg.levels
        self.rule = "closest number of classes <= K" if assignment is None else "--level-labels"
        self.assignment = closest_granularities(levels, granularities) if assignment is None else list(assignment)
        for l, gi in enumerate(self.assignment):
            if gi is not None and granularities[gi].n_classes > levels[l]:
                raise InputError(f"--level-labels: level {l} has {levels[l]} clusters, fewer than the "
                                 f"{granularities[gi].n_classes} classes of {granularities[gi].name!r}")
        self.acc = {l: metrics.ConfusionAccumulator(levels[l], granularities[gi].n_classes)
                    for l, gi in enumerate(self.assignment) if gi is not None}
        self.readers = {}
        used = {granularities[gi].labels for gi in self.assignment if gi is not None}
        for path in used:
            self.readers[path] = store if path == store.labels_path else FeatureStore(store.path, labels=path)
        shapes = {p: r.labels.shape for p, r in self.readers.items()}
        if len(set(shapes.values())) > 1:
            raise InputError("label files of different shapes: " + ", ".join(f"{p} {s}" for p, s in shapes.items()))
        self.size = next(iter(shapes.values()))[1:] if shapes else None

    def update(self, params, z, start):
        """Add the codes z (B, h, w, D) of rows start .. start + B."""
        if not self.acc:
            return
        rows = np.arange(start, start + z.shape[0])
        labels = {p: r.read_labels(rows) for p, r in self.readers.items()}
        H, W = self.size
        for l, acc in self.acc.items():
            g = self.granularities[self.assignment[l]]
            lab = labels[g.labels]
            if g.lut is not None:
                lab = g.lut[np.where((lab >= 0) & (lab <= 255), lab, 255).astype(np.intp)]
            M = params[predictor(self.cfg, l)]
            s = z if self.upsample == "code" else cosine.forward(z, M)[0]         # B,h,w,D or K
            step = max(1, MAX_ELEMENTS // (H * W * s.shape[-1]))
            for b in range(0, len(rows), step):
                up = resize.forward(s[b:b + step], (H, W))[0]
                pred = to_host((cosine.forward(up, M)[0] if self.upsample == "code" else up).argmax(axis=-1))
                try:
                    acc.update(pred, lab[b:b + step])
                except ValueError as e:
                    raise InputError(f"{g.labels} (granularity {g.name!r}): {e}") from None

    def result(self, plans=None) -> dict:
        """JSON-ready: the granularities, each level's scores (:func:`level_scores_json`; None for
        a level not scored) and each adjacent pair's consistency (:func:`consistency`; None where
        either level is not scored, the child's granularity is coarser than the parent's, or there
        is no plan), with ``parents``: each child cluster's parent in the plan (the argmax of its
        row; None without plans), what a drawing of the tree needs."""
        levels, scored = self.cfg.levels, set()
        out = {"rule": self.rule, "granularities": [g.to_dict() for g in self.granularities], "levels": [],
               "consistency": [], "notes": list(self.notes)}
        for l, k in enumerate(levels):
            gi = self.assignment[l]
            entry = {"level": l, "clusters": k, "granularity": None, "n_classes": None, "scores": None}
            if gi is not None:
                conf = self.acc[l].matrix
                if conf.sum() == 0:    # said, not raised: the headline scores are already computed
                    out["notes"].append(f"level {l} not scored: {self.granularities[gi].labels} has no labelled "
                                        f"pixels of granularity {self.granularities[gi].name!r} in this split")
                    out["levels"].append(entry)
                    continue
                scored.add(l)
                entry.update(granularity=self.granularities[gi].name, n_classes=self.granularities[gi].n_classes,
                             scores=level_scores_json(conf), mass=conf.sum(axis=1).tolist())
            out["levels"].append(entry)
        for l in range(len(levels) - 1):
            gc, gp = self.assignment[l], self.assignment[l + 1]
            item = {"child": l, "parent": l + 1, "consistency": None, "consistency_soft": None,
                    "consistency_chance": None, "consistent": None,
                    "parents": None if plans is None else np.asarray(plans[l]).argmax(axis=1).tolist()}
            if plans is not None and l in scored and l + 1 in scored and gc <= gp:
                up = self.acc[l].matrix @ contains(self.granularities, gc, gp).astype(np.int64)   # K_c, n_gp
                item.update(consistency(plans[l], up, self.acc[l + 1].matrix))
            out["consistency"].append(item)
        return out


def format_levels(rep) -> list:
    """Lines of the printed per-level table and the consistency of each adjacent pair."""
    def f(v, scale=1.0):
        return "n/a" if v is None else f"{v * scale:.2f}"

    lines = [f"{'level':<6} {'clusters':>8} {'granularity':<14} {'classes':>7} {'mIoU':>7} {'acc':>7} "
             f"{'many-to-one mIoU':>16} {'m-t-o acc':>9}"]
    for e in rep["levels"]:
        s = e["scores"]
        if s is None:
            lines.append(f"L{e['level']:<5} {e['clusters']:>8} {'(not scored)':<14}")
            continue
        lines.append(f"L{e['level']:<5} {e['clusters']:>8} {e['granularity'][:14]:<14} {e['n_classes']:>7} "
                     f"{f(s['miou']):>7} {f(s['acc']):>7} {f(s['many_to_one']['miou']):>16} "
                     f"{f(s['many_to_one']['acc']):>9}")
    for c in rep["consistency"]:
        lines.append(f"consistency L{c['child']} -> L{c['parent']}: {f(c['consistency'])} (soft "
                     f"{f(c['consistency_soft'])}; a blind plan: {f(c['consistency_chance'])})")
    lines.append(f"(levels scored against the granularity with the {rep['rule']}; mIoU/acc: one-to-one Hungarian, "
                 "every pixel counted (STEGO's protocol where clusters = classes); many-to-one: every cluster as "
                 "its majority class; consistency: share of the child level's pixels whose cluster's parent in the "
                 "plan has the same majority class at the parent's granularity)")
    lines += [f"note: {n}" for n in rep["notes"]]
    return lines
