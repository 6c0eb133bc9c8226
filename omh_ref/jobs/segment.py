"""``omh-ref segment``: a folder (or files) of images in, masks at each image's own size out.

For an image ``DIR/a/b.jpg`` (``--images DIR``; a file given by itself is named by its file
name), under ``--out OUT``:

* ``OUT/a/b.clusters.png``: the eval level's cluster ids at the image's size; with ``--match``
  ``OUT/a/b.classes.png`` instead, class ids (255, or 65535, where a cluster has no class);
* ``OUT/a/b.L0.png`` ... (``--levels all``): every level's cluster ids, finest first (always
  cluster ids, so these names keep no ``.clusters``);
* ``OUT/a/b.overlay.png`` (and ``b.L0.overlay.png`` ...) with ``--overlay``: the masks' colours
  over the image, the regions' edges in the pure colours, a legend under it naming the ids
  present (the class names with ``--match``);
* ``OUT/segment.json``: the settings, the checkpoint's and backbone's sha256, the palettes, the
  file names, the class names with ``--match``, the images done and the images skipped with the
  reason.

Masks are palette PNGs (mode "P"): the pixel values are the ids, the palette shows them in the
colours of the overlays (one palette per level in which children wear shades of their parent's
colour; with ``--match`` the classes' colours, those of ``omh-ref eval``'s pictures). More than
256 ids do not fit a palette: those masks are 16-bit grey (mode "I;16").

Every file is written atomically and an image's main mask last, so its presence means the
image is done: a rerun with the same settings skips those (and redoes one whose image is newer
than its mask); other settings, or a folder of the first naming (``b.png``, ``segment.json``
format 1), are refused unless ``--overwrite``. Unreadable images are skipped and listed
(``--on-error fail``: a one-line error). The work is :class:`~.segment.Segmenter`'s; this module
lists, resumes and writes. Images are decoded one batch ahead in a helper thread.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.errors import InputError
from ..core.files import write_json
from ..core.lock import FolderLock
from ..core.progress import bar as progress_bar
from ..evaluate import pictures
from ..extract.datasets import IMAGE_SUFFIXES, ImageError, read_rgb
from .segmenter import Segmenter, check_aspect

FORMAT = 2             # 1: the first naming (b.png, single-channel masks); 2: b.clusters.png / b.classes.png
INDEX = "segment.json"
MASK_TAGS = {False: ".clusters.png", True: ".classes.png"}   # with --match: True


@dataclass
class SegmentOptions:
    """What ``omh-ref segment`` takes (its flags, by the same names)."""

    model: str
    checkpoint: str
    images: list = field(default_factory=list)   # folders (searched recursively) and files
    out: str = "segments"
    resolution: int | None = None   # short side in px; None: the model's input size (224 if dynamic)
    windows: str = "auto"           # auto | always
    levels: str = "eval"            # eval | all
    overlay: bool = False
    flip: bool = False
    crf: bool = False
    crf_workers: int = 1
    crf_timeout: float = 600.0
    match: str | None = None
    device: str = "cpu"
    batch_size: int = 8
    threads: int | None = None
    on_error: str = "skip"          # skip | fail
    overwrite: bool = False
    allow_backbone_mismatch: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Item:
    name: str        # relative path: the outputs' names follow it
    path: Path


def list_images(sources) -> list:
    """[:class:`Item`] of every image under the given folders (recursively, sorted, as extraction's
    folder reader) and of the given files, in that order."""
    if not sources:
        raise InputError("--images: give a folder of images or image files")
    items, seen = [], set()
    for src in sources:
        p = Path(src)
        if p.is_dir():
            found = sorted((q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES
                            and (q.is_file() or q.is_symlink())), key=lambda q: q.relative_to(p).as_posix())
            if not found:
                raise InputError(f"{p}: no images found (expected files ending in {', '.join(IMAGE_SUFFIXES)})")
            new = [Item(q.relative_to(p).as_posix(), q) for q in found]
        elif p.is_file():
            new = [Item(p.name, p)]
        else:
            raise InputError(f"{p}: no such file or folder (expected --images to name images or a folder of them)")
        for it in new:   # a file named twice (a folder and a file in it) is segmented once
            key = os.path.normcase(os.path.abspath(it.path))
            if key not in seen:
                seen.add(key)
                items.append(it)
    return items


def output_files(out: Path, name: str, n_levels: int, levels_all: bool, overlay: bool, classes: bool = False) -> dict:
    """{kind: path} of one image's outputs; "mask" (``<name>.clusters.png``, with ``classes``
    ``<name>.classes.png``) is written last."""
    stem = out / Path(name).with_suffix("")

    def f(tag):
        return stem.with_name(stem.name + tag)

    files = {}
    if levels_all:
        for lvl in range(n_levels):
            files[f"L{lvl}"] = f(f".L{lvl}.png")
            if overlay:
                files[f"L{lvl}.overlay"] = f(f".L{lvl}.overlay.png")
    if overlay:
        files["overlay"] = f(".overlay.png")
    files["mask"] = f(MASK_TAGS[classes])
    return files


def stale_files(out: Path, name: str, n_levels: int) -> list:
    """Every file an earlier run of any settings may have left for one image: both main masks,
    the first naming's ``<name>.png``, every level's mask and every overlay."""
    files = [output_files(out, name, n_levels, True, True, c) for c in (False, True)]
    stem = out / Path(name).with_suffix("")
    old = stem.with_name(stem.name + ".png")
    return sorted({*files[0].values(), *files[1].values(), old})


def _check_names(items, plans, out: Path):
    """Two images whose outputs would share a file, or an output that would replace an input
    image, are named before anything is read."""
    owner = {}
    for it, files in zip(items, plans):
        for p in files.values():
            key = os.path.normcase(os.path.abspath(p))
            if key in owner and owner[key] != it.path:
                raise InputError(f"{p}: both {owner[key]} and {it.path} would write it (rename one of them)")
            owner[key] = it.path
    for it in items:
        key = os.path.normcase(os.path.abspath(it.path))
        if key in owner:
            raise InputError(f"{it.path}: an output of {owner[key]} would replace this image; choose another --out")


def _done(it: Item, files: dict) -> bool:
    """Every output of ``files`` (this run's names: a folder of the first naming is refused by
    :func:`_start` before this is asked) exists and the main mask is not older than its image."""
    try:
        if not all(p.is_file() for p in files.values()):
            return False
        return os.stat(files["mask"]).st_mtime_ns >= os.stat(it.path).st_mtime_ns
    except OSError:
        return False


def _load(items, on_error):
    """[(item, rgb or None, error message or None)] of one batch."""
    out = []
    for it in items:
        try:
            rgb = np.asarray(read_rgb(it.path))
            check_aspect(rgb.shape[:2], str(it.path))
            out.append((it, rgb, None))
        except ImageError as e:
            msg = str(e) if str(e).startswith(str(it.path)) else f"{it.path}: {e}"
            if on_error == "fail":
                raise InputError(f"{msg} (--on-error fail; --on-error skip leaves it out)") from None
            out.append((it, None, msg))
    return out


def run(opts: SegmentOptions, log=print, segmenter: Segmenter | None = None) -> dict:
    """Segment every image; -> the ``segment.json`` record. ``segmenter``: one already built for
    these options (a notebook or a benchmark reusing a loaded model); by default built here."""
    if opts.on_error not in ("skip", "fail"):
        raise InputError(f"--on-error: expected skip or fail, got {opts.on_error!r}")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file (expected --out to be a folder for the masks)")
    seg = segmenter or Segmenter(opts.model, opts.checkpoint, resolution=opts.resolution, windows=opts.windows,
                                 levels=opts.levels, flip=opts.flip, crf=opts.crf, crf_workers=opts.crf_workers,
                                 crf_timeout=opts.crf_timeout, match=opts.match, device=opts.device,
                                 batch_size=opts.batch_size, threads=opts.threads,
                                 allow_backbone_mismatch=opts.allow_backbone_mismatch, say=log)
    items = list_images(opts.images)
    n_levels = len(seg.level_sizes)
    plans = [output_files(out, it.name, n_levels, seg.levels_mode == "all", opts.overlay, seg.match is not None)
             for it in items]
    _check_names(items, plans, out)
    settings = {**seg.settings, "overlay": bool(opts.overlay)}
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out, "segment", say=log):
        return _run(opts, log, seg, items, plans, settings, out)


def _run(opts, log, seg, items, plans, settings, out):
    index_path = out / INDEX
    _start(out, index_path, settings, items, len(seg.level_sizes), opts.overwrite)
    palettes = seg.palettes()
    looks = Looks(palettes, seg.eval_level, seg.class_palette(),
                  seg.match["class_names"] if seg.match is not None else None)
    record = _record(seg, opts, settings, palettes)
    todo = [(it, files) for it, files in zip(items, plans) if not _done(it, files)]
    if len(todo) < len(items):
        log(f"resuming: {len(items) - len(todo)} of {len(items)} image(s) already segmented in {out}")
    skipped = []
    write_json(index_path, {**record, "complete": False, "images": [], "skipped": []})
    bar = progress_bar(len(todo), "segment", opts.progress, unit="img")
    groups = [todo[s:s + seg.batch_size] for s in range(0, len(todo), seg.batch_size)]
    complete = False
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_load, [it for it, _ in groups[0]], opts.on_error) if groups else None
            for g, group in enumerate(groups):
                loaded = pending.result()
                if g + 1 < len(groups):
                    pending = pool.submit(_load, [it for it, _ in groups[g + 1]], opts.on_error)
                ok = [(it, rgb, files) for (it, rgb, err), (_, files) in zip(loaded, group) if err is None]
                for it, _, err in loaded:
                    if err is not None:
                        skipped.append({"image": it.name, "error": err})
                        log(f"skipped: {err}")
                if ok:
                    for (it, rgb, files), m in zip(ok, seg.segment_batch([rgb for _, rgb, _ in ok])):
                        try:
                            _write(rgb, m, files, looks)
                        except OSError as e:
                            n = sum(_done(i, f) for i, f in zip(items, plans))
                            raise InputError(f"{e.filename or files['mask']}: cannot write the masks of {it.name} "
                                             f"({e.strerror}); the {n} image(s) segmented in {out} are intact; "
                                             "run the same command again to continue") from None
                bar.update(len(group))
        complete = True
    finally:
        bar.close()
        done = [{"image": it.name, "mask": files["mask"].relative_to(out).as_posix()}
                for it, files in zip(items, plans) if _done(it, files)]
        record.update(complete=complete, images=done, skipped=skipped)
        try:
            write_json(index_path, record)
        except OSError:
            if complete:
                raise
            # after a failed run the index stays as it was; the masks on disk say what is done
    log(f"segmented {len(todo) - len(skipped)} image(s), {len(items) - len(todo)} already done, "
        f"{len(skipped)} skipped -> {index_path}")
    return record


def _start(out, index_path, settings, items, n_levels, overwrite):
    """Resume a run with the same settings; refuse another run's folder, or one of the first
    naming, unless ``overwrite``. ``overwrite`` starts over: whatever any run may have written for
    the listed images (:func:`stale_files`) is removed first (so none of them passes for done,
    and no mask of another naming stays beside the new ones); input images are never removed."""
    import json

    if index_path.is_file() and not overwrite:
        try:
            old = json.loads(index_path.read_text())
            old_settings = old["settings"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise InputError(f"{index_path}: unreadable ({type(e).__name__}); pass --overwrite to start "
                             "again") from None
        if old.get("format") != FORMAT:
            raise InputError(f"{out}: holds masks of an older omh-ref segment (format {old.get('format')}: "
                             "<name>.png, now <name>.clusters.png or <name>.classes.png); pass --overwrite to "
                             "redo them, or choose another --out")
        if old_settings != settings:
            diff = sorted(k for k in settings if not isinstance(old_settings, dict) or old_settings.get(k) != settings[k])
            raise InputError(f"{out}: holds masks made with other settings ({', '.join(diff)} differ); pass "
                             "--overwrite to replace them, or choose another --out")
    if overwrite:
        inputs = {os.path.normcase(os.path.abspath(it.path)) for it in items}
        for it in items:
            for p in stale_files(out, it.name, n_levels):
                if os.path.normcase(os.path.abspath(p)) not in inputs:
                    p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _record(seg: Segmenter, opts: SegmentOptions, settings, palettes) -> dict:
    import onnxruntime

    rec = {"format": FORMAT, "kind": "omh-ref segment", "settings": settings,
           "checkpoint": str(opts.checkpoint),
           "backbone": {"path": str(opts.model), "sha256": seg.bb.sha256, "dim": seg.bb.dim, "patch": seg.bb.patch,
                        "input": "dynamic" if seg.bb.dynamic else seg.bb.resolution},
           "inputs": [str(Path(p)) for p in opts.images],
           "levels": list(seg.level_sizes), "eval_level": seg.eval_level,
           "mask": "class ids" if seg.match is not None else "eval-level cluster ids",
           "files": _files_record(seg.match is not None, seg.levels_mode == "all", opts.overlay),
           "mask_png": {"mask": _png_mode(seg.n_clusters),
                        **({f"L{lvl}": _png_mode(k) for lvl, k in enumerate(seg.level_sizes)}
                           if seg.levels_mode == "all" else {})},
           "palette": {f"L{lvl}": ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in pal]
                       for lvl, pal in enumerate(palettes)},
           "run": {"device": opts.device, "batch_size": seg.batch_size, "threads": opts.threads,
                   "omh_ref_version": __version__, "onnxruntime_version": onnxruntime.__version__}}
    if seg.match is not None:
        unmatched = 255 if seg.match["n_classes"] < 255 else 65535
        rec.update(match=str(opts.match), class_names=seg.match["class_names"],
                   cluster_to_class=seg.match["lut"].tolist(), unmatched=unmatched,
                   class_palette=["#%02x%02x%02x" % tuple(int(v) for v in c) for c in seg.class_palette()])
        rec["mask_png"]["mask"] = _png_mode(unmatched + 1)
    return rec


def _files_record(classes, levels_all, overlay) -> dict:
    """The names of an image's outputs, as segment.json states them."""
    rec = {"mask": "<name>" + MASK_TAGS[classes]}
    if levels_all:
        rec["levels"] = "<name>.L<level>.png"
    if overlay:
        rec["overlay"] = "<name>.overlay.png"
        if levels_all:
            rec["level_overlays"] = "<name>.L<level>.overlay.png"
    return rec


def _png_mode(n_ids) -> str:
    return ("P (palette PNG: pixel values are the ids)" if n_ids <= 256
            else "I;16 (16-bit grey: more than 256 ids do not fit a palette)")


@dataclass
class Looks:
    """The colours and names of one run's pictures: every level's cluster palette, and with a
    match the classes' palette (``pictures.palette``, as eval's pictures) and names."""
    levels: list
    eval_level: int
    classes: np.ndarray | None = None
    class_names: list | None = None

    def of(self, m, kind):
        """(ids, palette, names) that output ``kind`` of the masks ``m`` shows."""
        if kind in ("mask", "overlay") and m.classes is not None:
            return m.classes, self.classes, self.class_names
        if kind in ("mask", "overlay"):
            pal = self.levels[self.eval_level]
            return m.clusters, pal, [f"cluster {k}" for k in range(len(pal))]
        lvl = int(kind[1:].split(".")[0])
        return m.levels[lvl], self.levels[lvl], [f"L{lvl} cluster {k}" for k in range(len(self.levels[lvl]))]


def _write(rgb, m, files, looks: Looks):
    """One image's outputs, its main mask last: masks as palette PNGs, overlays with a legend of
    the ids present."""
    files["mask"].parent.mkdir(parents=True, exist_ok=True)
    for kind in sorted(files, key=lambda k: k == "mask"):
        ids, pal, names = looks.of(m, kind)
        if kind.endswith("overlay"):
            colours = pictures.colorize(ids, len(pal), pal)
            entries = pictures.legend(pal, names, pictures.present(ids), other="unmatched")
            img = pictures.with_legend(pictures.overlay(rgb, colours, ids=ids), entries)
        else:
            img = pictures.palette_png(ids, pal)
        pictures.save_png(img, files[kind])
