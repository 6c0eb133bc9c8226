"""Images beside feature files: STEGO's crop, and finding the images a feature file lists.

STEGO's evaluation transform (``get_transform(res, False, "center")``): resize the short side to
``res`` with NEAREST (STEGO uses NEAREST for images too), then a centre crop of res x res. Labels
are stored at this crop's resolution, so this is also how a prediction lines up with its image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def stego_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` (NEAREST) and centre-crop a square."""
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    img = img.resize((nw, nh), Image.NEAREST)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


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
