"""Images beside feature files: STEGO's crop, and finding the images a feature file lists.

STEGO's evaluation transform (``get_transform(res, False, "center")``): resize the short side to
``res`` with NEAREST (STEGO uses NEAREST for images too), then a centre crop of res x res. Labels
are stored at this crop's resolution, so this is also how a prediction lines up with its image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def resize_short(img: Image.Image, resolution: int) -> Image.Image:
    """torchvision ``Resize(resolution, NEAREST)`` on a PIL image: the short side becomes
    ``resolution``, the long side ``int(resolution * long / short)`` (truncated, as torchvision)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(resolution * long / short)
    size = (resolution, new_long) if w <= h else (new_long, resolution)
    return img if size == (w, h) else img.resize(size, Image.NEAREST)


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


def five_crops(img: Image.Image, ratio: float = 0.5) -> list:
    """torchvision's ``five_crop`` with a window of ``int(H * ratio) x int(W * ratio)``, in its order
    (top-left, top-right, bottom-left, bottom-right, centre): STEGO's ``crop_datasets.py`` with
    ``crop_type="five"``, ``crop_ratio=0.5``, used for its training sets."""
    w, h = img.size
    ch, cw = int(h * ratio), int(w * ratio)
    if ch < 1 or cw < 1:
        raise ValueError(f"image of {w}x{h} px is too small for five crops at ratio {ratio}")
    corners = [(0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    boxes = [crop_box(img.size, (ch, cw), t, l) for t, l in corners] + [crop_box(img.size, (ch, cw))]
    return [img.crop(b) for b in boxes]


def image_paths(meta: dict, feats_path) -> list | None:
    """Paths of the images ``feats.json`` lists (relative ones resolved against its
    ``image_root``, else the feature file's folder), or None when it lists none that exist."""
    names = meta.get("images")
    if not names:
        return None
    root = Path(meta.get("image_root") or Path(feats_path).parent)
    paths = [Path(n) if Path(n).is_absolute() else root / n for n in names]
    return paths if any(p.is_file() for p in paths[:8]) else None


def load_rgb(path, size) -> np.ndarray | None:
    """(size, size, 3) uint8 STEGO crop of an image, or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            return np.asarray(stego_crop(im.convert("RGB"), size))
    except (OSError, ValueError):
        return None
