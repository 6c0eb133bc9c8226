"""Dataset readers for ``omh-ref extract``: the STEGO layouts and a plain folder of images.

A reader lists its items in a fixed order (the row order of ``feats.npy``) and loads each as an
RGB PIL image plus, where the data set has labels, its raw label map as an 8-bit PIL image. Raw
label values become class ids through a 256-entry lookup table *after* the geometric crop (NEAREST
resampling never invents values), 255 = ignore. This is what STEGO's loaders compute:

========================  ==========================================================================
``cocostuff27``           ``ROOT/curated/train2017/Coco164kFull_Stuff_Coarse.txt`` (train) and
                          ``ROOT/curated/val2017/Coco164kFull_Stuff_Coarse_7.txt`` (val) list image
                          ids, as STEGO's ``Coco`` (``subset`` None for train, 7 for val); ``ROOT/images/<split>2017/<id>.jpg``,
                          ``ROOT/annotations/<split>2017/<id>.png`` (fine ids 0-181, 255 unlabelled);
                          the 182 -> 27 coarse map of STEGO's ``Coco`` class (``subset=7``); the
                          fine ids are kept too (``labels_fine.npy``).
``cityscapes27``          ``ROOT/leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`` with
                          ``ROOT/gtFine/<split>/<city>/<stem>_gtFine_labelIds.png``; class = labelId - 7,
                          below 0 -> ignore. Sorted by city, then file name.
``potsdam3``              ``ROOT/{labelled_train,labelled_test}.txt`` (train, val) list ids;
                          ``ROOT/imgs/<id>.mat`` (key ``img``, H x W x 4 RGB-IR uint8 as IIC saved
                          it; the first 3 channels are used) and ``ROOT/gt/<id>.mat`` (key ``gt``,
                          int32); {0,4} -> 0 roads and cars,
                          {1,5} -> 1 buildings and clutter, {2,3} -> 2 vegetation and trees; the 6
                          classes are kept too (``labels_fine.npy``).
``folder``                every image under ROOT (recursively, sorted); with a labels folder, the
                          same relative path with a ``.png`` suffix is its label map (values kept as
                          they are, 255 = ignore), and every image must have one.
========================  ==========================================================================

``ROOT`` may also be STEGO's ``pytorch_data_dir``: when it holds a ``cocostuff`` / ``cityscapes`` /
``potsdam`` folder, that folder is used.

Where we differ from STEGO on purpose: a label value no class maps to is ignored (STEGO's
``zeros_like`` maps such values to class 0; the real data sets contain none), and Cityscapes files
are sorted (torchvision lists them in directory order, which differs between file systems).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core.errors import InputError
from ..features import meta as feats_meta
from .classes import (CITYSCAPES_CATEGORY, CITYSCAPES_CATEGORY_NAMES, CLASS_NAMES, COCO_FINE_NAMES,
                      COCO_THINGS_STUFF, COCO_THINGS_STUFF_NAMES, POTSDAM_FINE_NAMES)

IGNORE = 255
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
SPLITS = ("train", "val")

# STEGO's Coco.fine_to_coarse as a table: COCO_FINE_TO_COARSE[fine id] = coarse id (182 entries).
COCO_FINE_TO_COARSE = (
    9, 11, 11, 11, 11, 11, 11, 11, 11, 8, 8, 8, 8, 8, 8, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6,
    6, 6, 6, 6, 10, 10, 10, 10, 10, 10, 10, 10, 10, 10, 5, 5, 5, 5, 5, 5, 5, 5, 2, 2, 2, 2, 2, 2, 2,
    2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 4, 4, 4, 4, 4, 4, 4,
    4, 17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21, 15, 25, 13,
    13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17, 16, 15, 22, 24, 21, 17, 25,
    16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20, 17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24,
    22, 25, 15, 20, 17, 17, 22, 14, 18, 18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24)
POTSDAM_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
# STEGO's cocostuff27 (src/data.py, Coco with subset None for training, 7 for validation)
COCO_LISTS = {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"}
CITYSCAPES_FIRST_CLASS = 7  # labelIds 0-6 are void; 7 (road) is class 0, 33 (bicycle) class 26


FINE_FILE = "labels_fine.npy"   # the fine labels, beside labels.npy, where a data set has them


def label_hierarchy(name, fine=True):
    """The label granularities of a STEGO data set, finest first (``feats.json``'s
    ``label_hierarchy``, :func:`omh_ref.features.meta.granularity`), or None for an unknown name:
    COCO-Stuff's 182 fine labels (``labels_fine.npy``) -> its 27 classes -> things / stuff;
    Cityscapes' 27 classes -> its 7 non-void categories; Potsdam's 6 classes (``labels_fine.npy``)
    -> its 3. ``fine=False`` leaves out the granularity read from ``labels_fine.npy`` (features
    extracted without it)."""
    L = "labels.npy"
    if name == "cocostuff27":
        levels = [feats_meta.granularity("fine", 182, FINE_FILE, COCO_FINE_NAMES, parent=list(COCO_FINE_TO_COARSE)),
                  feats_meta.granularity("classes", 27, L, CLASS_NAMES[name], parent=COCO_THINGS_STUFF),
                  feats_meta.granularity("things/stuff", 2, L, COCO_THINGS_STUFF_NAMES, map=COCO_THINGS_STUFF)]
    elif name == "cityscapes27":
        levels = [feats_meta.granularity("classes", 27, L, CLASS_NAMES[name], parent=CITYSCAPES_CATEGORY),
                  feats_meta.granularity("categories", 7, L, CITYSCAPES_CATEGORY_NAMES, map=CITYSCAPES_CATEGORY)]
    elif name == "potsdam3":
        levels = [feats_meta.granularity("fine", 6, FINE_FILE, POTSDAM_FINE_NAMES,
                                         parent=[POTSDAM_FINE_TO_COARSE[i] for i in range(6)]),
                  feats_meta.granularity("classes", 3, L, CLASS_NAMES[name])]
    else:
        return None
    return [g for g in levels if fine or g["labels"] != FINE_FILE]


def _lut(mapping: dict) -> np.ndarray:
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for raw, cls in mapping.items():
        lut[raw] = cls
    return lut


class ImageError(Exception):
    """An item that cannot be read; ``str(e)`` names the file and the reason."""


@dataclass(frozen=True)
class Item:
    name: str                # recorded in feats.json "images": relative to the data set's root
    image: Path
    label: Path | None = None


class Dataset:
    """An ordered list of :class:`Item` and how to read one.

    ``load(item) -> (rgb, label)``: a PIL RGB image and a PIL "L" image of raw label values (or
    None); raises :class:`ImageError`. ``lut``: uint8 (256,) raw value -> class id, 255 = ignore.
    ``fine_lut``: the same for the data set's fine labels (``labels_fine.npy``), or None.
    """

    def __init__(self, name, root, split, items, n_classes=None, lut=None, fine_lut=None):
        self.name, self.root, self.split = name, Path(root), split
        self.items = list(items)
        self.n_classes = n_classes
        self.lut = np.arange(256, dtype=np.uint8) if lut is None else lut
        self.fine_lut = fine_lut
        self.class_names = CLASS_NAMES.get(name)
        if not self.items:
            what = f"{name} split {split!r}" if split else f"an image ({', '.join(IMAGE_SUFFIXES)})"
            raise InputError(f"{self.root}: no images found (expected {what})")

    @property
    def has_labels(self) -> bool:
        return all(it.label is not None for it in self.items)

    def __len__(self):
        return len(self.items)

    def load(self, item: Item):
        rgb = _read_pil(item.image, "RGB")
        label = None if item.label is None else _read_pil(item.label, "L")
        return rgb, label

    def reader(self) -> "Dataset":
        """A copy that can load items but lists none (what a Dask task carries)."""
        r = copy.copy(self)
        r.items = []
        return r

    def map_labels(self, raw: np.ndarray) -> np.ndarray:
        return self.lut[raw]

    def map_fine_labels(self, raw: np.ndarray) -> np.ndarray:
        return self.fine_lut[raw]

    @property
    def has_fine_labels(self) -> bool:
        return self.fine_lut is not None and self.has_labels


def read_rgb(path) -> Image.Image:
    """One image file as PIL RGB, converted as extraction converts it (grayscale, RGBA, palette and
    16-bit images through ``Image.convert("RGB")``; a Potsdam ``.mat`` through
    :func:`read_mat_rgb`); an unreadable or truncated file is an :class:`ImageError` naming it."""
    path = Path(path)
    return read_mat_rgb(path) if path.suffix.lower() == ".mat" else _read_pil(path, "RGB")


def _read_pil(path: Path, mode: str) -> Image.Image:
    """An RGB image (``mode="RGB"``) or a label map's raw values as an "L" image (``mode="L"``;
    palette images give their indices, not their colours)."""
    try:
        with Image.open(path) as im:
            if mode == "RGB":
                return im.convert("RGB")
            if im.mode not in ("L", "P", "I", "I;16", "1"):
                raise ImageError(f"{path}: a label map must be a single-channel image, got mode {im.mode}")
            arr = np.asarray(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None
    return _label_image(arr, path)


def _label_image(arr: np.ndarray, path) -> Image.Image:
    if arr.dtype.kind not in "uifb":
        raise ImageError(f"{path}: expected a numeric label map, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise ImageError(f"{path}: label values must be whole numbers, got NaN, inf or fractions")
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ImageError(f"{path}: label values must lie in [0, 255], got [{arr.min()}, {arr.max()}]")
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "L")


class _MatDataset(Dataset):
    """Potsdam's .mat files: key ``img`` (H, W, >=3), key ``gt`` (H, W)."""

    def load(self, item: Item):
        rgb = read_mat_rgb(item.image)
        label = None
        if item.label is not None:
            gt = _read_mat(item.label, "gt")
            if gt.shape != (rgb.size[1], rgb.size[0]):
                raise ImageError(f"{item.label}: 'gt' has shape {gt.shape} but its image is "
                                 f"{(rgb.size[1], rgb.size[0])}")
            label = _label_image(gt, item.label)
        return rgb, label


def read_mat_rgb(path) -> Image.Image:
    """A Potsdam ``.mat`` image (key ``img``, H x W x >=3) as PIL RGB: its first 3 channels, floats
    as torchvision's ``to_pil_image`` makes them (``mul(255).byte()``)."""
    img = _read_mat(path, "img")
    if img.ndim != 3 or img.shape[2] < 3:
        raise ImageError(f"{path}: expected 'img' of shape (H, W, >=3), got {img.shape}")
    img = img[:, :, :3]
    if img.dtype.kind not in "uifb":
        raise ImageError(f"{path}: expected a numeric 'img' array, got dtype {img.dtype}")
    if img.size == 0:
        raise ImageError(f"{path}: 'img' is empty (shape {img.shape})")
    if not np.isfinite(img).all():
        raise ImageError(f"{path}: 'img' holds NaN or inf")
    lo, hi = (0, 1) if img.dtype.kind == "f" else (0, 255)
    if img.min() < lo or img.max() > hi:
        raise ImageError(f"{path}: a {img.dtype} 'img' must hold values in [{lo}, {hi}], "
                         f"got [{img.min()}, {img.max()}]")
    img = (img * 255).astype(np.uint8) if img.dtype.kind == "f" else img.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(img), "RGB")


def _read_mat(path: Path, key: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        mat = loadmat(path)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError... on a bad file
        raise ImageError(f"{path}: cannot read .mat file ({type(e).__name__}: {e})") from None
    if key not in mat:
        raise ImageError(f"{path}: no {key!r} array in the .mat file (keys: "
                         f"{sorted(k for k in mat if not k.startswith('__'))})")
    return np.asarray(mat[key])


def _require_folder(path, expected: str) -> Path:
    """``path`` as a Path; an InputError saying whether it is missing or not a folder otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: {'not a folder' if path.exists() else 'no such folder'} (expected {expected})")
    return path


def _subroot(root: Path, sub: str) -> Path:
    root = _require_folder(root, "--root to be the data set's folder")
    return root / sub if (root / sub).is_dir() else root


def _read_list(path: Path) -> list:
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected the split's image list)")
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]


def cocostuff27(root, split: str) -> Dataset:
    root = _subroot(root, "cocostuff")
    d = f"{split}2017"
    ids = _read_list(root / "curated" / d / COCO_LISTS[split])
    items = [Item(f"images/{d}/{i}.jpg", root / "images" / d / f"{i}.jpg",
                  root / "annotations" / d / f"{i}.png") for i in ids]
    return Dataset("cocostuff27", root, split, items, 27, _lut(dict(enumerate(COCO_FINE_TO_COARSE))),
                   _lut({i: i for i in range(len(COCO_FINE_TO_COARSE))}))


def cityscapes27(root, split: str) -> Dataset:
    root = _subroot(root, "cityscapes")
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        raise InputError(f"{img_dir}: no such folder (expected the Cityscapes layout "
                         "leftImg8bit/<split>/<city>/*_leftImg8bit.png)")
    items = []
    for p in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        stem = p.name[: -len("_leftImg8bit.png")]
        lab = root / "gtFine" / split / p.parent.name / f"{stem}_gtFine_labelIds.png"
        items.append(Item(p.relative_to(root).as_posix(), p, lab))
    lut = _lut({i: i - CITYSCAPES_FIRST_CLASS for i in range(CITYSCAPES_FIRST_CLASS, CITYSCAPES_FIRST_CLASS + 27)})
    return Dataset("cityscapes27", root, split, items, 27, lut)


def potsdam3(root, split: str) -> Dataset:
    root = _subroot(root, "potsdam")
    lists = {"train": "labelled_train.txt", "val": "labelled_test.txt"}
    ids = _read_list(root / lists[split])
    items = [Item(f"imgs/{i}.mat", root / "imgs" / f"{i}.mat", root / "gt" / f"{i}.mat") for i in ids]
    return _MatDataset("potsdam3", root, split, items, 3, _lut(POTSDAM_FINE_TO_COARSE),
                       _lut({i: i for i in POTSDAM_FINE_TO_COARSE}))


def folder(root, labels=None) -> Dataset:
    """Every image under ``root`` (recursive, sorted by relative path); labels from ``labels``."""
    root = _require_folder(root, "--images to be a folder of images")
    # broken links are kept: extraction reports them by name instead of dropping them silently
    paths = sorted((p for p in root.rglob("*")
                    if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())),
                   key=lambda p: p.relative_to(root).as_posix())
    items = []
    if labels is not None:
        labels = _require_folder(labels, "--labels to be a folder of label PNGs")
        if labels.resolve() == root.resolve():
            raise InputError(f"{labels}: the labels folder must differ from the images folder")
    for p in paths:
        rel = p.relative_to(root)
        lab = None if labels is None else (labels / rel).with_suffix(".png")
        if lab is not None and not lab.is_file():
            raise InputError(f"{lab}: no such file (expected the label map of image {p})")
        items.append(Item(rel.as_posix(), p, lab))
    return Dataset("folder", root, None, items, None, None)


READERS = {"cocostuff27": cocostuff27, "cityscapes27": cityscapes27, "potsdam3": potsdam3}


def open_dataset(name: str, root, split: str = "val") -> Dataset:
    """A STEGO-layout data set by name (``cocostuff27`` | ``cityscapes27`` | ``potsdam3``)."""
    if name not in READERS:
        raise InputError(f"--dataset: unknown data set {name!r} (expected one of {', '.join(READERS)})")
    if split not in SPLITS:
        raise InputError(f"--split: expected one of {', '.join(SPLITS)}, got {split!r}")
    return READERS[name](root, split)
