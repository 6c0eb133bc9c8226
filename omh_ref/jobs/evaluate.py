"""``omh-ref eval``: a checkpoint and a labelled split in, scores, the learned hierarchy and
pictures out. The command line parses flags into :class:`EvalOptions`, calls :func:`run` and
prints :func:`format_table`; a notebook does the same."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.backend import resolve_device
from ..core.errors import InputError
from ..core.files import file_sha256, write_text
from ..core.lock import FolderLock
from ..core.options import default
from ..evaluate import granular, matching, pictures
from ..evaluate.hierarchy import UsageAccumulator, hierarchy_plans, hierarchy_text, marginals_note
from ..evaluate.metrics import PROTOCOLS
from ..evaluate.predict import UPSAMPLE, cluster_eval, label_shape, scores_json
from ..evaluate.probe import linear_eval, linear_probe
from ..extract.classes import CLASS_NAMES
from ..extract.datasets import label_hierarchy
from ..extract.images import image_paths, load_rgb
from ..features import provenance
from ..features.meta import listed_labels, path_for
from ..features.store import FeatureStore
from ..train.checkpoint import backbone_of, load_params, stored_probe


@dataclass
class EvalOptions:
    """What ``omh-ref eval`` takes (its flags, by the same names)."""

    checkpoint: str
    features: str
    labels: str | None = None            # default: the labels file feats.json names
    flipped_features: str | None = None
    train_features: str | None = None    # the linear probe's training split
    train_labels: str | None = None
    n_classes: int | None = None         # default: feats.json's n_classes, else the eval level's K
    class_names: str | None = None       # a built-in name or a text file, one name a line
    probe_epochs: int = 10
    probe_cache: str = "auto"            # auto | memmap | none (evaluate/probe.py)
    batch_size: int = 16
    seed: int = 0
    json: str | None = None
    out: str | None = None               # folder for PNGs
    crf: bool = default("crf")
    crf_workers: int = default("crf_workers")
    crf_timeout: float = default("crf_timeout")
    level_labels: str | None = None      # granularity per level, e.g. parts,classes,superclasses (granular.py)
    device: str = default("device")
    progress: bool = True
    save_match: str | None = None        # match.json: the cluster -> class matching, for segment --match
    save_masks: str | None = None        # folder: every prediction of the split as a PNG, streamed
    allow_backbone_mismatch: bool = default("allow_backbone_mismatch")
    stored_probe: bool = default("stored_probe")   # score the checkpoint's own linear probe (omh-ref import)
    upsample: str = "logits"             # logits | code: what is upsampled to label size (predict.cluster_logits)


def _check_outputs(opts: EvalOptions):
    """Output paths are checked before minutes of evaluation, not after."""
    try:
        resolve_device(opts.device)
    except ValueError as e:
        raise InputError(str(e)) from None
    if opts.upsample not in UPSAMPLE:
        raise InputError(f"--upsample: expected one of {', '.join(UPSAMPLE)}, got {opts.upsample!r}")
    if opts.out is not None and Path(opts.out).exists() and not Path(opts.out).is_dir():
        raise InputError(f"{opts.out}: is a file (expected --out to be a folder for the pictures)")
    for flag, path in (("--json", opts.json), ("--save-match", opts.save_match)):
        if path is not None and (Path(path).is_dir() or Path(path).parent.is_file()):
            raise InputError(f"{path}: cannot write the {flag} file there (expected a file path)")
    if opts.save_masks is not None and Path(opts.save_masks).exists() and not Path(opts.save_masks).is_dir():
        raise InputError(f"{opts.save_masks}: is a file (expected --save-masks to be a folder for the masks)")


def output_folders(opts: EvalOptions) -> list:
    """The folders a run writes into: ``--out``, ``--save-masks`` and those of ``--json`` and
    ``--save-match`` (each once)."""
    folders = [opts.out, opts.save_masks] + [None if p is None else Path(p).parent for p in (opts.json, opts.save_match)]
    seen = {}
    for f in folders:
        if f is not None:
            seen.setdefault(Path(f).resolve(), Path(f))
    return list(seen.values())


def crf_images(store: FeatureStore):
    """-> images(start, n): the RGB images ``feats.json`` lists for rows start .. start+n, at the
    label maps' (square) resolution, (n, H, W, 3) uint8: what the CRF refines on."""
    size = label_shape(store)
    if size[0] != size[1]:
        raise InputError(f"{store.labels_path}: --crf needs square label maps (STEGO crops), got {tuple(size)}")
    paths = image_paths(store.meta, store.path)
    if paths is None:
        raise InputError(f"{store.path.with_suffix('.json')}: --crf needs the images, but the feature "
                         "file's metadata lists none that exist (fields 'images', 'image_root')")

    def read(start, n):
        out = []
        for p in paths[start:start + n]:
            img = load_rgb(p, size[0])
            if img is None:
                raise InputError(f"{p}: cannot read this image (needed by --crf)")
            out.append(img)
        return np.stack(out)
    return read


def same_backbone(opts: EvalOptions, store: FeatureStore, flag: str, say) -> None:
    """The features ``flag`` names come from the backbone the checkpoint was trained on (refused
    otherwise, unless ``opts.allow_backbone_mismatch``); features of random weights are said."""
    given = provenance.of_meta(store.meta) if store.meta else None
    note = provenance.random_note(given, f"the {flag} {store.path}")
    if note:
        say(note)
    if given:
        provenance.require_same(backbone_of(opts.checkpoint), given, given_what=f"the {flag} {store.path}",
                                trained_what=f"{opts.checkpoint}'s training features",
                                allow=opts.allow_backbone_mismatch, say=say)


def run(opts: EvalOptions, say=None) -> dict:
    """Score the checkpoint; write ``--json`` and the pictures of ``--out``; ``say`` hears what the
    run chooses on its way. Every folder it writes is held locked (:func:`output_folders`,
    :class:`~omh_ref.core.lock.FolderLock`) from before its first write. -> the result
    ({'cluster', 'crf', 'linear'?, 'hierarchy', 'class_names'}), JSON-ready."""
    import contextlib

    _check_outputs(opts)
    with contextlib.ExitStack() as held:
        for folder in output_folders(opts):
            held.enter_context(FolderLock(folder, "eval", say=say or print))
        return _run(opts, say)


def _run(opts: EvalOptions, say) -> dict:
    params, cfg = load_params(opts.checkpoint, opts.device)
    labels = opts.labels or listed_labels(opts.features)
    if labels is None:
        raise InputError(f"--labels: not given, and {path_for(opts.features)} names no labels file "
                         "(expected --labels labels.npy)")
    store = FeatureStore(opts.features, labels=labels)
    flipped = FeatureStore(opts.flipped_features) if opts.flipped_features else None
    if flipped is not None and (flipped.N, flipped.h, flipped.w, flipped.C) != (store.N, store.h, store.w, store.C):
        raise InputError(f"{opts.flipped_features}: shape {flipped.feats.shape} differs from {opts.features} "
                         f"{store.feats.shape}")
    same_backbone(opts, store, "--features", say or print)
    K = cfg.eval_k
    n_classes = opts.n_classes or int(store.meta.get("n_classes") or K)
    names = resolve_class_names(opts.class_names, store, n_classes)
    if K < n_classes:
        raise InputError(f"{opts.checkpoint}: the eval level has {K} clusters, fewer than the {n_classes} classes")
    released = _stored_probe(opts, cfg, n_classes) if opts.stored_probe else None
    # the hierarchy's usage marginals, averaged over the split on the way (no code is kept)
    usage = UsageAccumulator(cfg) if cfg.marginals == "usage" and len(cfg.levels) > 1 else None
    levels = _level_scorer(opts, cfg, store, n_classes, names)
    masks = MaskWriter(opts.save_masks, store, K, opts.crf) if opts.save_masks else None
    clu, preds = cluster_eval(params, cfg, store, n_classes, opts.batch_size, flipped, opts.device, keep=4,
                              crf_workers=max(opts.crf_workers, 1) if opts.crf else None,
                              crf_images=crf_images(store) if opts.crf else None,
                              crf_timeout=opts.crf_timeout, usage=usage, on_batch=masks, levels=levels,
                              upsample=opts.upsample)
    result = {"cluster": scores_json(clu), "crf": bool(opts.crf)}
    if opts.save_match or masks is not None:
        sha = file_sha256(opts.checkpoint)
        rec = matching.record(clu["match"], names, opts.checkpoint, sha, cfg.eval_index, scores=clu,
                              crf=opts.crf)
        if opts.save_match:
            matching.save(opts.save_match, rec)
        if masks is not None:
            masks.finish(opts.checkpoint, sha, opts.features, rec)
    if released is not None:   # no training: the checkpoint's probe as it was released
        lin = linear_eval(params, released, store, n_classes, opts.batch_size, flipped, opts.device, cfg=cfg)
        result["linear"] = scores_json(lin)
        result["linear_probe"] = "stored in the checkpoint"
    if opts.train_features or opts.train_labels:
        train_labels = opts.train_labels or (listed_labels(opts.train_features) if opts.train_features else None)
        if not (opts.train_features and train_labels):
            raise InputError("--train-features and --train-labels: give both for the linear probe")
        tr = FeatureStore(opts.train_features, labels=train_labels)
        same_backbone(opts, tr, "--train-features", say or print)
        probe = linear_probe(params, tr, n_classes, opts.probe_epochs, opts.batch_size, seed=opts.seed,
                             device=opts.device, progress=opts.progress, cache=opts.probe_cache, say=say, cfg=cfg)
        lin = linear_eval(params, probe, store, n_classes, opts.batch_size, flipped, opts.device, cfg=cfg)
        result["linear"] = scores_json(lin)
        result["linear_probe"] = "trained on --train-features"
    means = usage.means() if usage is not None else None
    plans = hierarchy_plans(params, cfg, means)
    tree = hierarchy_text(plans, clu["match"].cluster_to_class, names, named_level=cfg.eval_level)
    note = marginals_note(cfg, usage.images if usage is not None else None)
    result["hierarchy"] = {"marginals": note["marginals"], "trained_with": note["trained_with"],
                           "marginals_text": note["text"],
                           "usage": None if means is None else [m.round(6).tolist() for m in means],
                           "plans": [p.round(4).tolist() for p in plans], "text": tree}
    result["levels"] = levels.result(plans)
    result["class_names"] = names
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        write_text(opts.json, json.dumps(result, indent=1))
    if opts.out:
        write_pictures(Path(opts.out), store, clu, preds, plans, [f"# {note['text']}", *tree], names, n_classes)
        pictures.hierarchy_tree_png(Path(opts.out) / "hierarchy_tree.png", result["levels"], plans,
                                    levels.granularities)
    return result


def _stored_probe(opts: EvalOptions, cfg, n_classes) -> dict:
    """``--stored-probe``: the linear probe the checkpoint holds (STEGO's released one, kept by
    ``omh-ref import``), checked against the code size and the classes; refused in one line where
    there is none or the probe would be trained as well."""
    if opts.train_features or opts.train_labels:
        raise InputError("--stored-probe scores the checkpoint's own linear probe; --train-features/--train-labels "
                         "would train another: give one or the other")
    probe = stored_probe(opts.checkpoint)
    if probe is None:
        raise InputError(f"{opts.checkpoint}: holds no linear probe (--stored-probe reads the one omh-ref import "
                         "keeps from a STEGO checkpoint); train one with --train-features")
    if probe["W"].shape != (n_classes, cfg.dim):
        raise InputError(f"{opts.checkpoint}: its linear probe maps {probe['W'].shape[1]} code channels to "
                         f"{probe['W'].shape[0]} classes; the code has {cfg.dim} and the data {n_classes} classes")
    return probe


def _level_scorer(opts: EvalOptions, cfg, store, n_classes, names=None):
    """Every level's scorer against the label granularities (evaluate/granular.py)."""
    notes = []
    grans = granular.load_granularities(store, n_classes, notes, names, known=label_hierarchy)
    levels = cfg.levels
    assignment = granular.parse_level_labels(opts.level_labels, len(levels), grans) if opts.level_labels else None
    return granular.LevelScorer(cfg, store, grans, assignment, notes, upsample=opts.upsample)


def write_pictures(out: Path, store: FeatureStore, clu, preds, plans, tree, names, n_classes):
    """confusion_cluster.png, predictions.png (with the images and overlays where ``feats.json``
    lists readable ones), hierarchy_L{l}_L{l+1}.png and hierarchy.txt under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    match = clu["match"]
    pal = pictures.palette(n_classes)
    conf, row_names = pictures.matched_rows(clu["confusion"], match.class_to_cluster)
    pictures.confusion_png(out / "confusion_cluster.png", conf, row_names=row_names, col_names=names)
    lab = store.read_labels(np.arange(len(preds)))
    mapped = [match.cluster_to_class[p] for p in preds]
    rows = [[pictures.colorize(lab[i], n_classes, pal), pictures.colorize(mapped[i], n_classes, pal)]
            for i in range(len(preds))]
    titles = ["labels", "clusters (matched)"]
    paths = image_paths(store.meta, store.path)
    if paths is not None:   # overlays where the listed images can be read
        for i, row in enumerate(rows):
            img = load_rgb(paths[i], lab.shape[1])
            if img is not None and img.shape[:2] == lab.shape[1:]:
                row.insert(0, img)
                row.append(pictures.overlay(img, row[-1], ids=mapped[i]))
        titles = ["image", *titles, "overlay"] if all(len(r) == 4 for r in rows) else titles
    shown = set(range(n_classes)).union(pictures.present(lab), pictures.present(np.asarray(mapped)))
    legend = pictures.legend(pal, names, shown, other="ignore / unmatched")
    pictures.grid_png(out / "predictions.png", rows, titles=titles, legend=legend)
    for lvl, A in enumerate(plans):
        pictures.confusion_png(out / f"hierarchy_L{lvl}_L{lvl + 1}.png", A.T, row_title=f"L{lvl + 1} cluster",
                               col_title=f"L{lvl} cluster",
                               title=f"plan L{lvl} -> L{lvl + 1}: % of each L{lvl} cluster's mass on each L{lvl + 1} cluster")
    write_text(out / "hierarchy.txt", "\n".join(tree) + "\n")


class MaskWriter:
    """``eval --save-masks DIR``: every prediction of the split written as it streams by
    (``cluster_eval``'s ``on_batch``), at label resolution: ``DIR/clusters/<image>.png`` (eval-level
    cluster ids, a palette PNG: the pixel values are the ids, the colours visible; uint16 beyond
    256 clusters) and, with ``--crf``, ``DIR/crf/<image>.png``; ``DIR/masks.json`` last, with the
    rows' names and the cluster -> class matching (known only once the whole split is scored).
    Images are named after ``feats.json``'s list (extension replaced by ``.png``, five-crop rows
    ``<image>#tl.png`` ...), or by row number where it lists none or two names would collide."""

    def __init__(self, folder, store: FeatureStore, n_clusters, crf):
        from .segmenter import id_dtype

        self.folder, self.kinds = Path(folder), ["clusters"] + (["crf"] if crf else [])
        self.dtype = id_dtype(n_clusters)
        self.palette = pictures.palette(n_clusters)
        self.names = _mask_names(store.meta.get("images"), store.N)
        for k in self.kinds:
            (self.folder / k).mkdir(parents=True, exist_ok=True)

    def __call__(self, start, clusters, refined):
        for kind, preds in zip(self.kinds, (clusters, refined)):
            for i, pred in enumerate(preds):
                path = self.folder / kind / self.names[start + i]
                path.parent.mkdir(parents=True, exist_ok=True)
                pictures.save_png(pictures.palette_png(np.asarray(pred).astype(self.dtype), self.palette), path)

    def finish(self, checkpoint, sha256, features, match_record):
        write_text(self.folder / "masks.json", json.dumps(
            {"kind": "omh-ref eval masks", "checkpoint": str(checkpoint), "checkpoint_sha256": sha256,
             "features": str(features), "folders": self.kinds, "ids": "eval-level cluster ids",
             "rows": self.names, "match": match_record}, indent=1) + "\n")


def _mask_names(images, n) -> list:
    """One relative ``.png`` name per feature row (see :class:`MaskWriter`)."""
    from ..extract.images import split_crop

    if images and len(images) == n:
        names = []
        for name in images:
            path, crop = split_crop(name)
            path = Path(*path.parts[1:]) if path.is_absolute() else path
            stem = path.with_suffix("")
            tag = "" if crop is None else f"#{name.rsplit('#', 1)[1]}"
            names.append((stem.parent / f"{stem.name}{tag}.png").as_posix())
        if len(set(names)) == n and not any(".." in Path(p).parts for p in names):
            return names
    return [f"{i:06d}.png" for i in range(n)]


def resolve_class_names(spec, store: FeatureStore, n_classes) -> list:
    """Names of the classes: ``spec`` (a built-in data set name or a text file, one per line),
    else ``feats.json``'s ``class_names``, else '0', '1', ...; a count that does not match
    ``n_classes`` is an InputError naming its source."""
    if spec is None:
        names = store.meta.get("class_names")
    elif spec in CLASS_NAMES:
        names = CLASS_NAMES[spec]
    else:
        p = Path(spec)
        if not p.is_file():
            raise InputError(f"--class-names {spec!r}: not a built-in ({', '.join(CLASS_NAMES)}) nor a file")
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if names is not None and len(names) != n_classes:
        source = "--class-names" if spec is not None else f"{path_for(store.path)} class_names"
        raise InputError(f"{source}: {len(names)} names for {n_classes} classes (--n-classes or the data's "
                         "n_classes); pass --class-names to name them")
    return names or [str(i) for i in range(n_classes)]


def format_table(result) -> str:
    """The printed scores: both probes under both extra-cluster protocols (named), per-class IoU
    under the headline protocol with the matched cluster, the hierarchy."""
    names = result["class_names"]
    headline = result["cluster"]["protocol"]
    lines = [f"{'probe':<10} {'protocol':<9} {'mIoU':>7} {'acc':>7}"]
    for probe in ("cluster", "linear"):
        if probe in result:
            for protocol, r in ((headline, result[probe]), ("strict", result[probe]["strict"])):
                lines.append(f"{probe:<10} {protocol:<9} {_fmt(r['miou']):>7} {_fmt(r['acc']):>7}")
    lines.append(f"({headline}: {PROTOCOLS[headline]}; strict: {PROTOCOLS['strict']})")
    if "linear" in result and result.get("linear_probe"):
        lines.append(f"(linear: the probe {result['linear_probe']}, identity mapping)")
    lines.append("")
    head = f"{'class':<24} {'cluster IoU':>11}" + (f" {'linear IoU':>11}" if "linear" in result else "")
    lines.append(head + f" {'cluster':>8}   ({headline} protocol)")
    c2k = result["cluster"]["match"]["class_to_cluster"]
    for c, name in enumerate(names):
        row = f"{name:<24} {_fmt(result['cluster']['iou'][c]):>11}"
        if "linear" in result:
            row += f" {_fmt(result['linear']['iou'][c]):>11}"
        lines.append(row + f" {c2k[c]:>8}")
    unmatched = result["cluster"]["match"]["unmatched"]
    if unmatched:
        lines.append(f"unmatched clusters ({headline}): {unmatched}; strict: "
                     f"{result['cluster']['strict']['match']['unmatched']}")
    if "levels" in result:
        lines.append("")
        lines.append("every level against its label granularity:")
        lines += ["  " + t for t in granular.format_levels(result["levels"])]
    tree = result["hierarchy"]["text"]
    if tree:
        lines.append("hierarchy (child clusters absorbed by each parent, share of the child's mass; "
                     f"{result['hierarchy']['marginals_text']}):")
        lines += ["  " + t for t in tree]
    return "\n".join(lines)


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}"
