"""``omh-ref extract``: images -> DINO patch features with onnxruntime (no torch).

Preprocessing is STEGO's (``get_transform(res, False, "center")``), bit for bit: resize the short
side to ``res`` with NEAREST (torchvision's size rule), centre-crop ``res x res``, ``/255`` then
ImageNet mean/std, all in float32. ``--crop five`` first cuts torchvision's five crops of half the
image's height and width (STEGO's ``crop_datasets.py``, used for its training sets; STEGO saved
those crops as JPEG and reloaded them, we do not re-encode) and then treats each crop as above:
image i owns rows ``5i .. 5i+4`` in the order tl, tr, bl, br, centre. Label maps go through the same
geometry (NEAREST) and the data set's class lookup (255 = ignore).

Outputs under ``--out`` (:mod:`omh_ref.features.meta`): ``feats.npy`` (N, h, w, C) float16 by default,
``labels.npy`` uint8 (N, res, res) when the data set has labels, ``labels_fine.npy`` beside it when it
also has finer labels (COCO-Stuff's 182 fine ids, Potsdam's 6 classes), ``feats_flip.npy`` with ``--flip``
(features of the horizontally flipped crops, in their own orientation: ``eval`` flips them back),
and ``feats.json``. For the HP base (docs/hp_reading.md §14): ``attn.npy`` (N, h, w, 9) float16
with ``--attention`` (each patch's 3 x 3 window of HP's attention weights, :mod:`.attention`, from
the model's second output: ``omh-ref export --attention``), and ``feats_aug.npy`` with
``--augment`` (the features of one seeded photometric augmentation of each crop, :mod:`.augment`,
seeded by ``--seed`` and the crop's row name). Both are written like ``feats.npy``, row by row
with the chunks, and recorded in ``feats.json`` (``attention``, ``augmented``).

Work is cut into chunks of whole forward batches. Rows are written straight into preallocated
``*.partial.npy`` files (``os.pwrite`` at the row's byte offset, then ``fsync``) and a chunk is
recorded in ``extract.progress.json`` (atomically replaced) only after its rows are on disk. An
interrupted run (Ctrl-C, a killed process, a lost Dask worker) continues from the chunks not yet
recorded; nothing already recorded is redone, unless the size or modification time of one of its
images or labels changed since (a file replaced, a broken one repaired: that chunk is redone; once
finalising has begun, such a change is refused and asks for ``--overwrite``). The
progress file also pins every setting that decides the output (model hash, image list, crop, dtype,
--on-error, device, batch and chunk sizes), so a resumed run cannot mix settings. When every
chunk is done, images that could not be read (``--on-error skip``) are left out by copying the
kept rows, the partial files are renamed into place, ``feats.json`` is written last and the
progress file is removed.

The same chunk function runs in-process or on Dask workers (``scheduler="local:N"`` or a scheduler
address): batches are identical either way, so the outputs are byte-identical. Workers need the
output folder on a shared file system and omh-ref installed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..core.errors import InputError, Interrupted
from ..core.files import atomic_path, move_into_place, write_json
from ..core.lock import FolderLock
from ..features import meta as feats_meta
from ..features import provenance
from ..features.rows import RowWriter, create_npy
from ..features import attention as hp_attention
from . import augment as hp_augment
from .backbone import ATTENTION_OUTPUT, Backbone, inspect_model, normalize, run, run_with_attention, session
from .datasets import Dataset, ImageError, label_hierarchy
from .images import FIVE_CROP_RATIO, FIVE_CROPS, crops

PROGRESS = "extract.progress.json"
OUTPUTS = {"feats": "feats.npy", "labels": "labels.npy", "labels_fine": "labels_fine.npy", "flip": "feats_flip.npy",
           "attn": hp_attention.FILE, "aug": hp_augment.FILE}


@dataclass
class ExtractOptions:
    model: str
    out: str
    resolution: int | None = None   # None: the model's input size (224 if the model's is dynamic)
    crop: str = "center"            # center | five
    flip: bool = False
    batch_size: int = 16            # crops per forward pass
    chunk_size: int = 64            # images per unit of recorded progress (rounded to whole batches)
    dtype: str = "float16"
    on_error: str | None = None     # skip | fail; None: fail on a labelled data set (a lost image
                                    # would shrink the benchmark unseen), skip on a bare folder
    device: str = "cpu"             # cpu | gpu
    threads: int | None = None      # onnxruntime intra-op threads (None: its default)
    overwrite: bool = False
    progress: bool = True
    scheduler: str | None = None    # None (in-process), "local:N" or a Dask scheduler address
    attention: bool = False         # attn.npy: HP's 3x3 attention window weights (a model exported with --attention)
    augment: bool = False           # feats_aug.npy: features of one seeded photometric augmentation per crop
    augment_space: str = "normalised"   # normalised (HP's code) | rgb: where the augmentation acts
    seed: int = 0                   # the augmentation's seed

    def validate(self):
        def bad(flag, want, got):
            raise InputError(f"{flag}: expected {want}, got {got!r}")
        if self.crop not in ("center", "five"):
            bad("--crop", "center or five", self.crop)
        if self.dtype not in ("float16", "float32"):
            bad("--dtype", "float16 or float32", self.dtype)
        if self.on_error not in (None, "skip", "fail"):
            bad("--on-error", "skip or fail", self.on_error)
        if self.device not in ("cpu", "gpu"):
            bad("--device", "cpu or gpu", self.device)
        if self.augment_space not in hp_augment.SPACES:
            bad("--augment-space", " or ".join(hp_augment.SPACES), self.augment_space)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad("--seed", "a non-negative integer", self.seed)
        for flag, v in (("--batch-size", self.batch_size), ("--chunk-size", self.chunk_size)):
            if not isinstance(v, int) or v < 1:
                bad(flag, "a positive integer", v)
        if self.threads is not None and self.threads < 1:
            bad("--threads", "a positive integer", self.threads)
        if self.resolution is not None and self.resolution < 1:
            bad("--resolution", "a positive number of pixels", self.resolution)
        if not Path(self.model).is_file():
            raise InputError(f"{self.model}: no such file (expected --model to be an .onnx backbone "
                             "made by omh-ref export)")

    @property
    def n_crops(self) -> int:
        return 5 if self.crop == "five" else 1

    @property
    def images_per_batch(self) -> int:
        return max(1, self.batch_size // self.n_crops)

    @property
    def images_per_chunk(self) -> int:
        ipb = self.images_per_batch
        return -(-self.chunk_size // ipb) * ipb


# --------------------------------------------------------------------------------------------------
# One chunk (runs in-process or on a Dask worker)
# --------------------------------------------------------------------------------------------------
@dataclass
class ChunkTask:
    chunk: int
    items: list                     # [(item index, Item)]
    dataset: Dataset                # without its item list (ds.reader()): tasks stay small
    opts: ExtractOptions
    backbone: Backbone
    files: dict                     # {"feats": path, "labels": path, ..., "attn": path, "aug": path} of the partials
    threads: int | None = None
    fingerprint: str = ""           # _chunk_fingerprint(items), taken by the driver before the run


@dataclass
class ChunkResult:
    chunk: int
    failures: list = field(default_factory=list)   # [[item index, message]]
    n_images: int = 0


def run_chunk(task: ChunkTask, on_batch=None) -> ChunkResult:
    """Extract one chunk's rows into the partial files; unreadable images are reported (skip) or
    raised as InputError (fail). ``on_batch(n_images)`` is called after each forward batch.
    A helper thread decodes and crops the next batch while the current one runs."""
    from concurrent.futures import ThreadPoolExecutor

    opts, bb = task.opts, task.backbone
    names = {idx: item.name for idx, item in task.items}
    sess = session(bb.path, opts.device, task.threads)
    writers = {k: RowWriter(p) for k, p in task.files.items()}
    res = ChunkResult(task.chunk, n_images=len(task.items))
    ipb = opts.images_per_batch
    groups = [task.items[b:b + ipb] for b in range(0, len(task.items), ipb)]
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(_load_batch, task, groups[0]) if groups else None
            for g in range(len(groups)):
                batch, failures = pending.result()
                if g + 1 < len(groups):
                    pending = pool.submit(_load_batch, task, groups[g + 1])
                res.failures += failures
                if batch:
                    _forward_and_write(sess, bb, task.dataset, batch, writers, opts, names)
                if on_batch is not None:
                    on_batch(len(groups[g]))
    finally:
        for w in writers.values():
            w.close()
    return res


def _load_batch(task: ChunkTask, items):
    """([(item index, crops)], [[item index, message]]) for one forward batch's images."""
    batch, failures = [], []
    for idx, item in items:
        try:
            rgb, label = task.dataset.load(item)
            batch.append((idx, crops(rgb, label, task.opts.crop, task.backbone.resolution)))
        except ImageError as e:
            msg = str(e) if str(e).startswith(str(item.image)) else f"{item.image}: {e}"
            if task.opts.on_error == "fail":
                raise InputError(f"{msg} (extraction stops at an unreadable image or label map: "
                                 "--on-error skip leaves it out and names it)") from None
            failures.append([idx, msg])
    return batch, failures


def row_names(name: str, crop: str) -> list:
    """The names of one image's rows in ``feats.json``: ``name``, or ``name#tl`` ... ``name#c``."""
    return [f"{name}#{c}" for c in FIVE_CROPS] if crop == "five" else [name]


def _forward_and_write(sess, bb, ds, batch, writers, opts, names):
    nc = opts.n_crops
    rgbs = [c[0] for _, cs in batch for c in cs]
    x = normalize(np.stack(rgbs))
    if "attn" in writers:
        # one batch's (B, n, n) logits at a time; only the 3x3 windows are kept
        feats, logits = run_with_attention(sess, bb, x)
        outs = {"feats": feats, "attn": hp_attention.window_weights(logits, *bb.grid)}
        del logits
    else:
        outs = {"feats": run(sess, bb, x)}
    if opts.flip:
        outs["flip"] = run(sess, bb, np.ascontiguousarray(x[..., ::-1]))
    if "aug" in writers:
        rows = [r for idx, _ in batch for r in row_names(names[idx], opts.crop)]
        xa = np.stack([hp_augment.augmented_input(rgb, opts.seed, r, opts.augment_space) for rgb, r in zip(rgbs, rows)])
        outs["aug"] = run(sess, bb, xa)
    if "labels" in writers:
        raw = np.stack([c[1] for _, cs in batch for c in cs])
        outs["labels"] = ds.map_labels(raw)
        if "labels_fine" in writers:
            outs["labels_fine"] = ds.map_fine_labels(raw)
    # consecutive item indices share one write; a skipped image splits the run
    i = 0
    while i < len(batch):
        j = i + 1
        while j < len(batch) and batch[j][0] == batch[j - 1][0] + 1:
            j += 1
        for k, w in writers.items():
            w.write(batch[i][0] * nc, outs[k][i * nc:j * nc])
        i = j


# --------------------------------------------------------------------------------------------------
# The whole job: plan, resume, run (in-process or Dask), finalise
# --------------------------------------------------------------------------------------------------
def _partial(out: Path, name: str) -> Path:
    return out / name.replace(".npy", ".partial.npy")


def _job_key(ds: Dataset, opts: ExtractOptions, bb: Backbone) -> dict:
    """Every setting that decides the output (the files' contents are checked chunk by chunk:
    :func:`_chunk_fingerprint`)."""
    names = hashlib.sha256("\n".join(it.name for it in ds.items).encode()).hexdigest()
    return {"onnx_sha256": bb.sha256, "resolution": bb.resolution, "dataset": ds.name, "split": ds.split,
            "root": str(ds.root.resolve()), "n_images": len(ds), "images_sha256": names,
            "crop": opts.crop, "flip": opts.flip, "dtype": opts.dtype, "labels": ds.has_labels,
            "on_error": opts.on_error, "device": opts.device,
            "images_per_batch": opts.images_per_batch, "images_per_chunk": opts.images_per_chunk,
            **({"labels_fine": True} if ds.has_fine_labels else {}),
            **({"attention": {"sigma": hp_attention.SIGMA, "quantiles": list(hp_attention.QUANTILES)}}
               if opts.attention else {}),
            **({"augment": {"seed": opts.seed, "space": opts.augment_space}} if opts.augment else {})}


def _chunk_fingerprint(items) -> str:
    """A hash of the size and modification time of a chunk's images and labels (one ``stat`` a
    file), taken before the chunk runs and recorded with it: a resumed run redoes a recorded chunk
    whose files have changed since (an image replaced, a broken one repaired)."""
    h = hashlib.sha256()
    for _, it in items:
        for p in (it.image, it.label):
            try:
                st = os.stat(p) if p is not None else None
                h.update(b"-;" if st is None else f"{st.st_size}:{st.st_mtime_ns};".encode())
            except OSError:
                h.update(b"?;")   # missing or unreadable: reported by name when its chunk runs
    return h.hexdigest()


def extract(ds: Dataset, opts: ExtractOptions, log=print) -> dict:
    """Extract features of every item of ``ds`` into ``opts.out``; returns the ``feats.json`` record."""
    opts.validate()
    if opts.on_error is None:
        opts = dataclasses.replace(opts, on_error="fail" if ds.has_labels else "skip")
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file (expected --out to be a folder for the features)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out}: cannot make the --out folder ({e.strerror})") from None
    with FolderLock(out, "extract", say=log):
        return _extract(ds, opts, out, log)


def _extract(ds, opts, out, log):
    threads = opts.threads if opts.threads is not None or not (opts.scheduler or "").startswith("local:") else 1
    bb = inspect_model(opts.model, opts.resolution, opts.device, opts.threads)
    if opts.attention and not bb.attention:
        raise InputError(f"--attention: {opts.model} has no '{ATTENTION_OUTPUT}' output (export the backbone "
                         "with omh-ref export --attention)")
    note = provenance.random_note(bb.provenance(), f"the features of {opts.model}")
    if note:
        log(note)
    key = _job_key(ds, opts, bb)
    kinds = (["feats"] + (["labels"] if ds.has_labels else []) + (["labels_fine"] if ds.has_fine_labels else [])
             + (["flip"] if opts.flip else []) + (["attn"] if opts.attention else [])
             + (["aug"] if opts.augment else []))
    files = {k: str(_partial(out, OUTPUTS[k])) for k in kinds}
    progress_path = out / PROGRESS
    state, resumed = _resume_or_start(out, progress_path, key, opts, ds, bb, files)

    n_chunks = -(-len(ds) // opts.images_per_chunk)
    tasks = [_task(c, ds, opts, bb, files, threads) for c in range(n_chunks)]
    changed = [t for t in tasks if str(t.chunk) in state["done"] and state["stat"].get(str(t.chunk)) != t.fingerprint]
    if state["stage"] == "finalizing" and changed:
        # rows may already be compacted: a chunk can no longer be redone in place
        t = changed[0]
        raise InputError(f"{out}: images of this extraction changed after it had finished extracting "
                         f"(first: chunk {t.chunk}, images {t.items[0][1].name} ...); pass --overwrite to "
                         "extract again")
    for t in changed:
        log(f"redoing chunk {t.chunk} (images {t.items[0][0]}-{t.items[-1][0]}): its files changed "
            "since it was recorded")
        del state["done"][str(t.chunk)]
    if resumed:
        log(f"resuming: {len(state['done'])} chunk(s) of {n_chunks} already done (from {progress_path})")
    pending = [t for t in tasks if str(t.chunk) not in state["done"]]
    if state["stage"] == "extracting" and pending:
        try:
            _run_tasks(pending, state, progress_path, opts, len(ds), log)
        except OSError as e:
            raise InputError(f"{e.filename or out}: cannot write extracted rows ({e.strerror}); the "
                             f"{len(state['done'])} chunk(s) of {n_chunks} recorded in {progress_path} are intact; "
                             "run the same command again to continue") from None
    try:
        return _finalize(out, progress_path, state, ds, opts, bb, kinds, log)
    except OSError as e:
        raise InputError(f"{e.filename or out}: cannot finish the extraction ({e.strerror}); every extracted row "
                         "is intact; run the same command again to finish") from None


def _task(c, ds, opts, bb, files, threads):
    lo = c * opts.images_per_chunk
    items = [(i, ds.items[i]) for i in range(lo, min(lo + opts.images_per_chunk, len(ds)))]
    return ChunkTask(c, items, ds.reader(), opts, bb, files, threads, _chunk_fingerprint(items))


def _resume_or_start(out, progress_path, key, opts, ds, bb, files):
    """-> (state, resumed): the progress state of an unfinished run with the same key, or a fresh
    one (partial files preallocated)."""
    finals = [out / n for n in (*OUTPUTS.values(), "feats.json", "feats_flip.json")]
    if progress_path.is_file():
        try:
            state = json.loads(progress_path.read_text())
        except ValueError as e:
            raise InputError(f"{progress_path}: unreadable progress file ({e}); pass --overwrite "
                             "to start again") from None
        if state.get("format") != 2 and not opts.overwrite:
            raise InputError(f"{progress_path}: a progress file of another omh-ref version; pass "
                             "--overwrite to start again")
        if state.get("key") == key and not opts.overwrite:
            return state, True
        if not opts.overwrite:
            diff = sorted(k for k in key if state.get("key", {}).get(k) != key[k])
            raise InputError(f"{out}: holds an unfinished extraction with other settings "
                             f"({', '.join(diff)} differ); pass --overwrite to discard it")
    elif any(p.exists() for p in finals) and not opts.overwrite:
        raise InputError(f"{out}: already holds extracted features ({out / 'feats.npy'}); pass "
                         "--overwrite to replace them")
    for p in finals + [_partial(out, n) for n in OUTPUTS.values()] + [progress_path]:
        p.unlink(missing_ok=True)
    n_rows = len(ds) * opts.n_crops
    h, w = bb.grid
    shapes = {"feats": ((n_rows, h, w, bb.dim), opts.dtype), "flip": ((n_rows, h, w, bb.dim), opts.dtype),
              "labels": ((n_rows, bb.resolution, bb.resolution), np.uint8),
              "labels_fine": ((n_rows, bb.resolution, bb.resolution), np.uint8),
              "attn": ((n_rows, h, w, len(hp_attention.OFFSETS)), hp_attention.DTYPE),
              "aug": ((n_rows, h, w, bb.dim), opts.dtype)}
    for k, p in files.items():
        create_npy(p, *shapes[k])
    state = {"format": 2, "key": key, "stage": "extracting", "done": {}, "stat": {}}
    write_json(progress_path, state)
    return state, False


def _run_tasks(tasks, state, progress_path, opts, n_total, log):
    from ..core.progress import bar as progress_bar

    done_images = sum(min(opts.images_per_chunk, n_total - int(c) * opts.images_per_chunk) for c in state["done"])
    bar = progress_bar(n_total, "extract", opts.progress, unit="img", initial=done_images)

    fingerprints = {t.chunk: t.fingerprint for t in tasks}

    def record(res: ChunkResult):
        state["done"][str(res.chunk)] = res.failures
        state["stat"][str(res.chunk)] = fingerprints[res.chunk]
        write_json(progress_path, state)
        for _, msg in res.failures:
            log(f"skipped: {msg}")

    try:
        if opts.scheduler is None:
            for t in tasks:
                record(run_chunk(t, on_batch=bar.update))
        else:
            from ..features.distributed import dask_client, run_all

            with dask_client(opts.scheduler) as client:
                run_all(client, run_chunk, [(t,) for t in tasks],
                        lambda res: (record(res), bar.update(res.n_images)), name="omh-ref-extract")
    except KeyboardInterrupt:
        n_chunks = -(-n_total // opts.images_per_chunk)
        raise Interrupted(f"{len(state['done'])} of {n_chunks} chunk(s) are recorded in {progress_path} (their rows "
                          "are on disk); the same command continues from there") from None
    finally:
        bar.close()


def _finalize(out, progress_path, state, ds, opts, bb, kinds, log):
    state["stage"] = "finalizing"
    write_json(progress_path, state)
    failures = sorted((int(i), msg) for f in state["done"].values() for i, msg in f)
    skipped = {i for i, _ in failures}
    keep = np.array([i for i in range(len(ds)) if i not in skipped], dtype=np.int64)
    if len(keep) == 0:
        raise InputError(f"{ds.root}: none of the {len(ds)} images could be read (first: {failures[0][1]}); "
                         "repair them and pass --overwrite to start again")
    rows = (keep[:, None] * opts.n_crops + np.arange(opts.n_crops)).ravel()
    for k in kinds:
        part, final = _partial(out, OUTPUTS[k]), out / OUTPUTS[k]
        if not part.exists():
            continue  # moved into place before an interruption
        if skipped:
            _copy_rows(part, final, rows, opts.batch_size)
            part.unlink()
        else:
            move_into_place(part, final)   # its rows were fsynced as they were written
    meta = describe(ds, opts, bb, keep, failures, kinds)
    if "flip" in kinds:   # the HP inputs are of the unflipped crops: not the flipped file's
        feats_meta.write(out / "feats_flip.json", dict(meta, flipped_of="feats.npy", attention=None, augmented=None))
    feats_meta.write(out / "feats.json", meta)
    progress_path.unlink(missing_ok=True)
    log(f"wrote {out / 'feats.npy'}: {tuple(meta['shape'])} {opts.dtype}")
    if failures:
        log(f"skipped {len(failures)} of {len(ds)} image(s) (--on-error skip; each with its error in feats.json "
            f"'skipped'): " + ", ".join(ds.items[i].name for i, _ in failures))
    return meta


def _copy_rows(src, dst, rows, batch):
    a = np.load(src, mmap_mode="r")
    with atomic_path(dst) as tmp:
        create_npy(tmp, (len(rows),) + a.shape[1:], a.dtype)
        w = RowWriter(tmp)
        for s in range(0, len(rows), batch):
            w.write(s, a[rows[s:s + batch]])
        w.close()
    del a


def describe(ds: Dataset, opts: ExtractOptions, bb: Backbone, keep, failures, kinds) -> dict:
    """The ``feats.json`` record (:mod:`omh_ref.features.meta`)."""
    import onnxruntime

    names = [r for i in keep for r in row_names(ds.items[i].name, opts.crop)]
    h, w = bb.grid
    return feats_meta.make(
        shape=[len(names), h, w, bb.dim], dtype=opts.dtype, backbone=Path(bb.path).stem,
        resolution=bb.resolution, patch=bb.patch, onnx=Path(bb.path).name, onnx_sha256=bb.sha256,
        **provenance.to_meta(bb.provenance()),
        preprocessing="resize short side NEAREST (torchvision rule), centre crop, /255, ImageNet mean/std",
        crop=opts.crop, **({"five_crop_ratio": FIVE_CROP_RATIO} if opts.crop == "five" else {}),
        dataset=ds.name, split=ds.split, n_classes=ds.n_classes, class_names=ds.class_names,
        labels=OUTPUTS["labels"] if "labels" in kinds else None,
        labels_fine=OUTPUTS["labels_fine"] if "labels_fine" in kinds else None,
        label_hierarchy=label_hierarchy(ds.name, "labels_fine" in kinds) if "labels" in kinds else None,
        flipped=OUTPUTS["flip"] if "flip" in kinds else None,
        attention=hp_attention.record(len(names), h, w) if "attn" in kinds else None,
        augmented=(hp_augment.record(len(names), h, w, bb.dim, opts.dtype, opts.seed, opts.augment_space)
                   if "aug" in kinds else None),
        image_root=str(ds.root.resolve()), images=names,
        skipped=[{"image": ds.items[i].name, "error": msg} for i, msg in failures],
        onnxruntime_version=onnxruntime.__version__,
        options={k: v for k, v in asdict(opts).items() if k in ("batch_size", "chunk_size", "device")})
