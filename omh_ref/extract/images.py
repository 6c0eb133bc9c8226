"""Images beside feature files: STEGO's crop, and finding the images a feature file lists.

STEGO's evaluation transform (``get_transform(res, False, "center")``): resize the short side to
``res`` with NEAREST (STEGO uses NEAREST for images too), then a centre crop of res x res. Labels
are stored at this crop's resolution, so this is also how a prediction lines up with its image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .datasets import ImageError, read_mat_rgb


def short_side_size(size, resolution: int) -> tuple:
    """PIL ``(width, height)`` after torchvision's ``Resize(resolution)`` of an image of ``size``:
    the short side becomes ``resolution``, the long side ``int(resolution * long / short)``
    (truncated, as torchvision)."""
    w, h = size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    return (resolution, new_long) if w <= h else (new_long, resolution)


def resize_short(img: Image.Image, resolution: int) -> Image.Image:
    """torchvision ``Resize(resolution, NEAREST)`` on a PIL image (:func:`short_side_size`)."""
    size = short_side_size(img.size, resolution)
    return img if size == img.size else img.resize(size, Image.NEAREST)


def crop_box(size, crop, top=None, left=None):
    """(left, top, right, bottom) of a ``crop`` = (height, width) window in an image of PIL
    ``size`` = (width, height); centred as torchvision's ``center_crop`` (``int(round(d / 2))``,
    Python's round-half-even) unless ``top`` / ``left`` are given."""
    w, h = size
    ch, cw = crop
    if top is None:
        top = int(round((h - ch) / 2.0))
    if left is None:
        left = int(round((w - cw) / 2.0))
    return left, top, left + cw, top + ch


def stego_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` (NEAREST) and centre-crop a square, exactly as
    torchvision's ``Resize`` + ``CenterCrop`` do (STEGO's ``get_transform(res, ..., "center")``)."""
    img = resize_short(img, resolution)
    return img.crop(crop_box(img.size, (resolution, resolution)))


FIVE_CROPS = ("tl", "tr", "bl", "br", "c")
FIVE_CROP_RATIO = 0.5   # STEGO's crop_datasets.py


def five_crops(img: Image.Image, ratio: float = 0.5) -> list:
    """torchvision's ``five_crop`` with a window of ``int(H * ratio) x int(W * ratio)``, in its order
    (top-left, top-right, bottom-left, bottom-right, centre): STEGO's ``crop_datasets.py`` with
    ``crop_type="five"``, ``crop_ratio=0.5``, used for its training sets. An image too small for a
    window of at least 1 x 1 px is an :class:`ImageError` (skipped or fatal per ``--on-error``)."""
    w, h = img.size
    ch, cw = int(h * ratio), int(w * ratio)
    if ch < 1 or cw < 1:
        raise ImageError(f"image of {w}x{h} px is too small for five crops at ratio {ratio}")
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    boxes = [crop_box(img.size, (ch, cw), t, l) for t, l in corners] + [crop_box(img.size, (ch, cw))]
    return [img.crop(b) for b in boxes]


def crops(rgb: Image.Image, label: Image.Image | None, crop: str, resolution: int):
    """[(rgb uint8 (R, R, 3), raw label uint8 (R, R) or None)] for one image: 1 or 5 crops."""
    if label is not None and label.size != rgb.size:
        raise ImageError(f"label map is {label.size[0]}x{label.size[1]} px but its image is "
                         f"{rgb.size[0]}x{rgb.size[1]}")
    if crop == "five":
        rgbs = five_crops(rgb, FIVE_CROP_RATIO)
        labels = five_crops(label, FIVE_CROP_RATIO) if label is not None else [None] * 5
    else:
        rgbs, labels = [rgb], [label]
    return [(np.asarray(stego_crop(r, resolution)),
             None if lab is None else np.asarray(stego_crop(lab, resolution)))
            for r, lab in zip(rgbs, labels)]


def split_crop(path) -> tuple:
    """``(image path, five-crop index or None)`` of a listed image: extraction with ``--crop five``
    lists crops as ``<image>#tl`` ... ``<image>#c``."""
    path = Path(path)
    stem, sep, tag = path.name.rpartition("#")
    if sep and tag in FIVE_CROPS:
        return path.with_name(stem), FIVE_CROPS.index(tag)
    return path, None


def image_paths(meta: dict, feats_path) -> list | None:
    """Paths of the images ``feats.json`` lists (relative ones resolved against its
    ``image_root``, else the feature file's folder), or None when it lists none that exist.
    Five-crop rows keep their ``#tl``... tag (:func:`load_rgb` cuts the crop)."""
    names = meta.get("images")
    if not names:
        return None
    root = Path(meta.get("image_root") or Path(feats_path).parent)
    paths = [Path(n) if Path(n).is_absolute() else root / n for n in names]
    return paths if any(split_crop(p)[0].is_file() for p in paths[:8]) else None


def load_rgb(path, size) -> np.ndarray | None:
    """(size, size, 3) uint8 STEGO crop of a listed image (a picture, a Potsdam ``.mat``, or one of
    an image's five crops), or None if it cannot be read."""
    path, crop = split_crop(path)
    try:
        if path.suffix.lower() == ".mat":
            img = read_mat_rgb(path)
        else:
            with Image.open(path) as im:
                img = im.convert("RGB")
        if crop is not None:
            img = five_crops(img, FIVE_CROP_RATIO)[crop]
        return np.asarray(stego_crop(img, size))
    except (OSError, ValueError, ImageError):
        return None
