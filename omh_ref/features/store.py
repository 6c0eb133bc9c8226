"""The feature store: ``feats.npy`` (N, h, w, C) opened with ``np.load(mmap_mode="r")``, never whole.

Rows are read in batches by index. The pages a read touches belong to the file (the kernel's page
cache), but they still count towards this process's resident memory while mapped, so after each
read the store tells the kernel it no longer needs them (``madvise(MADV_DONTNEED)``, a no-op for
the data: a read-only file mapping re-reads from the cache or the disk). Resident memory then stays
at a few batches, whatever N is.

Validation is at open time (files exist, ndim, dtype, ``feats.json`` and ``labels.npy``
consistent) and per read (no NaN/inf in the rows read): a full scan of a 30 GB file at open would
cost minutes. Every problem is an :class:`~omh_ref.core.errors.InputError` naming the file.
``feats.json`` is read through :mod:`omh_ref.features.meta`, its one reader.

The HP base's extraction inputs lie beside ``feats.npy``, one row per feature row, and are read the
same way (:class:`RowFile`, by index through the memmap, pages released after each read):
``attn.npy`` (N, h, w, 9), HP's attention window weights (:meth:`FeatureStore.open_attention`),
and ``feats_aug.npy`` (N, h, w, C), the features of one photometric augmentation per crop
(:meth:`FeatureStore.open_augmented`). Each is refused in one line when ``feats.json`` does not
name it or when its N, h or w (or its last axis) is not the features'.
"""
from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from . import meta as feats_meta

FEATURE_DTYPES = (np.float16, np.float32)
# Channel counts of the ViTs whose features omh-ref reads (S, B, L, H+, g, 7B of DINO, DINOv2 and
# DINOv3). A file whose axis 1 is one of them and whose last axis is not is PyTorch's (N, C, h, w).
BACKBONE_DIMS = (384, 768, 1024, 1280, 1536, 4096)
LABEL_DTYPES = (np.uint8, np.int16, np.int32, np.int64, np.uint16)


def _open_npy(path: Path, what: str):
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected {what})")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # not an .npy file, truncated header, pickled objects...
        raise InputError(f"{path}: not a readable .npy file ({type(e).__name__}: {e}); expected {what}") from None


def check_layout(shape, where) -> None:
    """Refuse a channels-first feature array: axis 1 a backbone's channel count, the last axis not."""
    if len(shape) == 4 and shape[1] in BACKBONE_DIMS and shape[3] not in BACKBONE_DIMS:
        raise InputError(f"{where}: shape {tuple(shape)} looks channels-first (N, C, h, w); omh-ref wants "
                         f"(N, h, w, C) (np.moveaxis(x, 1, -1) converts it)")


class FeatureStore:
    """Memory-mapped features with optional labels and metadata.

    ``FeatureStore(path, labels=None, meta=None)``: ``meta`` defaults to ``feats.json`` beside the
    features (optional), ``labels`` to nothing. Attributes: N, h, w, C, dtype, meta, labels (a
    memmap or None).
    """

    def __init__(self, path, labels=None, meta=None):
        self.path = Path(path)
        self.feats = _open_npy(self.path, "features (N, h, w, C) float16/float32")
        f = self.feats
        if f.ndim != 4:
            raise InputError(f"{self.path}: expected features of shape (N, h, w, C), got shape {f.shape}")
        if f.dtype not in FEATURE_DTYPES:
            raise InputError(f"{self.path}: expected float16 or float32 features, got dtype {f.dtype}")
        if f.shape[0] == 0 or min(f.shape[1:]) == 0:
            raise InputError(f"{self.path}: empty feature file (shape {f.shape})")
        check_layout(f.shape, self.path)
        self.N, self.h, self.w, self.C = f.shape
        self.dtype = f.dtype
        self.meta = self._load_meta(meta)
        self.labels_path = None if labels is None else Path(labels)
        self.labels = None if labels is None else self._load_labels(self.labels_path)
        self._mmap = getattr(f, "_mmap", None)
        self._size = f.offset + f.size * f.dtype.itemsize if hasattr(f, "offset") else 0

    def _load_meta(self, meta):
        path = Path(meta) if meta is not None else feats_meta.path_for(self.path)
        if not path.is_file():
            if meta is not None:
                raise InputError(f"{path}: no such file (expected the features' metadata JSON)")
            return {}
        return feats_meta.read(path, self.feats, self.path)

    def _load_labels(self, path: Path):
        lab = _open_npy(path, "labels (N, H, W) of integers")
        if lab.ndim != 3:
            raise InputError(f"{path}: expected labels of shape (N, H, W), got shape {lab.shape}")
        if lab.dtype.kind not in "iu":
            raise InputError(f"{path}: expected integer labels (uint8/int16), got dtype {lab.dtype}")
        if min(lab.shape[1:]) == 0:
            raise InputError(f"{path}: empty label maps (shape {lab.shape})")
        if lab.shape[1] * self.w != lab.shape[2] * self.h:
            raise InputError(f"{path}: label maps of {lab.shape[1]}x{lab.shape[2]} px do not have the shape of "
                             f"{self.path}'s {self.h}x{self.w} feature grid (expected the same aspect ratio)")
        if lab.shape[0] != self.N:
            raise InputError(f"{path}: has {lab.shape[0]} label maps but {self.path} has {self.N} feature rows")
        return lab

    def read(self, idx, dtype=np.float32, check_finite=True):
        """Rows ``idx`` (1-D integer array, any order, repeats allowed) as (len(idx), h, w, C).

        Reads each distinct row once in file order, then releases the pages (see module doc).
        ``check_finite=False`` skips the NaN/inf check, for a file already known finite (a KNN
        table built from it certifies that)."""
        return _read_rows(self.feats, self.path, self._size, idx, dtype, check_finite, self.release, "feature file",
                          "finite features")

    def open_attention(self, path=None) -> "RowFile":
        """``attn.npy`` beside the features (or ``path``): HP's 3 x 3 attention window weights,
        (N, h, w, 9), read by row (:class:`RowFile`)."""
        return self._companion("attention", path)

    def open_augmented(self, path=None) -> "RowFile":
        """``feats_aug.npy`` beside the features (or ``path``): the features of one photometric
        augmentation per crop, (N, h, w, C), read by row (:class:`RowFile`)."""
        return self._companion("augmented", path)

    def _companion(self, kind, path):
        what, flag = COMPANION_FILES[kind][1:]
        rec = self.meta.get(kind)
        if path is None:
            if not rec:
                raise InputError(f"{feats_meta.path_for(self.path)}: names no {what} for {self.path} (extract them "
                                 f"with {flag})")
            path = self.path.parent / rec["file"]
        return RowFile(path, kind, self)

    def read_labels(self, idx):
        if self.labels is None:
            raise InputError("no labels file was given (expected --labels labels.npy)")
        out = np.asarray(self.labels[np.asarray(idx, dtype=np.int64)])
        lm = getattr(self.labels, "_mmap", None)
        if lm is not None:
            _dontneed(lm)
        return out

    def release(self):
        """Drop this process's mapping of the pages read so far (the data stays on disk/cache)."""
        if self._mmap is not None:
            _dontneed(self._mmap)

    def batches(self, batch_size, dtype=np.float32):
        """(start index, rows) for consecutive batches over the whole file."""
        for s in range(0, self.N, batch_size):
            yield s, self.read(np.arange(s, min(s + batch_size, self.N)), dtype)

    def fingerprint(self) -> str:
        """sha256 of the .npy header, the file size and the first and last rows: identifies the
        file a KNN table or a checkpoint was made from without reading it whole."""
        h = hashlib.sha256()
        with open(self.path, "rb") as fh:
            h.update(fh.read(128))
        h.update(str(os.path.getsize(self.path)).encode())
        h.update(np.ascontiguousarray(self.feats[0]).tobytes())
        h.update(np.ascontiguousarray(self.feats[-1]).tobytes())
        self.release()
        return h.hexdigest()


COMPANION_FILES = {   # kind: (last axis: an int, or "C" for the features', what it holds, how to make it)
    "attention": (9, "attention weights (attn.npy)",
                  "omh-ref extract --attention, from a model exported with omh-ref export --attention"),
    "augmented": ("C", "augmented features (feats_aug.npy)", "omh-ref extract --augment"),
}


class RowFile:
    """A row file beside ``feats.npy`` (``attn.npy``, ``feats_aug.npy``): (N, h, w, K) with the
    features' N, h and w, memory-mapped and read by row as the features are (never whole)."""

    def __init__(self, path, kind: str, store: FeatureStore):
        last, what, flag = COMPANION_FILES[kind]
        self.path, self.kind = Path(path), kind
        self.rows = _open_npy(self.path, f"{what}, made by {flag}")
        a, want_k = self.rows, store.C if last == "C" else last
        if a.ndim != 4 or a.dtype not in FEATURE_DTYPES:
            raise InputError(f"{self.path}: expected {what} of shape (N, h, w, {want_k}) float16/float32, got "
                             f"shape {a.shape} {a.dtype}")
        if a.shape[:3] != (store.N, store.h, store.w) or a.shape[3] != want_k:
            raise InputError(f"{self.path}: holds {a.shape[0]} rows of a {a.shape[1]}x{a.shape[2]} grid with "
                             f"{a.shape[3]} values each, but {store.path} has {store.N} rows of a {store.h}x{store.w} "
                             f"grid (expected {want_k} values each): not extracted with these features ({flag})")
        self.N, self.h, self.w, self.K = a.shape
        self._mmap = getattr(a, "_mmap", None)
        self._size = a.offset + a.size * a.dtype.itemsize if hasattr(a, "offset") else 0

    def read(self, idx, dtype=np.float32, check_finite=True):
        """Rows ``idx`` (any order, repeats allowed) as (len(idx), h, w, K), as FeatureStore.read."""
        return _read_rows(self.rows, self.path, self._size, idx, dtype, check_finite, self.release,
                          f"{self.kind} file", f"finite {self.kind} rows")

    def release(self):
        if self._mmap is not None:
            _dontneed(self._mmap)


def _read_rows(arr, path, opened_size, idx, dtype, check_finite, release, what, finite):
    """Rows ``idx`` of the memmap ``arr``: each distinct row read once in file order, the pages
    released, the file's size checked first and the rows' finiteness after."""
    n = arr.shape[0]
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise InputError(f"{path}: row index out of range [0, {n})")
    uniq, inv = np.unique(idx, return_inverse=True)
    _check_size(path, opened_size, int(uniq[0]) if uniq.size else 0, what)
    try:
        rows = np.asarray(arr[uniq], dtype=dtype)
    except OSError as e:   # an unreadable block (EIO): name the rows, not numpy's internals
        raise InputError(f"{path}: cannot read rows {int(uniq[0])}..{int(uniq[-1])} ({e.strerror or e})") from None
    release()
    bad = ~np.isfinite(rows.reshape(len(uniq), -1)).all(axis=1) if check_finite and uniq.size else np.zeros(0, bool)
    if bad.any():
        raise InputError(f"{path}: row {int(uniq[np.argmax(bad)])} contains NaN or inf (expected {finite})")
    return rows[inv]


def _check_size(path, opened_size, row, what="feature file"):
    """The file must still be as long as when it was opened: reading a memory map past the end
    of a file truncated meanwhile kills the process (SIGBUS) instead of raising, so a shrunk
    file is named here first (one ``stat`` a read)."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise InputError(f"{path}: the {what} is gone or unreadable while in use ({e.strerror}); "
                         f"row {row} cannot be read") from None
    if size < opened_size:
        raise InputError(f"{path}: the {what} shrank from {opened_size} to {size} bytes while in "
                         f"use (overwritten or truncated?); row {row} cannot be read")


def _dontneed(mm):
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass
