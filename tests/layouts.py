"""Tiny on-disk fixtures of the data set layouts omh_ref.extract.datasets reads (built per test).

Every builder draws from a seeded generator and returns what it wrote, so tests can compute the
expected labels themselves: ``{name: (rgb uint8 (H, W, 3), raw label uint8 (H, W))}``.
"""
from pathlib import Path

import numpy as np
from PIL import Image


def _pair(rng, raw_values, size=None):
    h, w = size if size is not None else rng.integers(36, 80, 2)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    raw = rng.choice(np.asarray(raw_values, dtype=np.uint8), size=(h, w))
    return rgb, raw


def coco(root, split="val", n=3, seed=0):
    """cocostuff/curated/<split>2017/<the split's list> (STEGO's: the full list for train, the _7
    one for val), images/*.jpg, annotations/*.png."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "cocostuff"
    d = f"{split}2017"
    for sub in ("curated", "images", "annotations"):
        (root / sub / d).mkdir(parents=True, exist_ok=True)
    ids = [f"{100 + 7 * i:012d}" for i in range(n)]
    lists = {"train": "Coco164kFull_Stuff_Coarse.txt", "val": "Coco164kFull_Stuff_Coarse_7.txt"}
    (root / "curated" / d / lists[split]).write_text("\n".join(ids) + "\n")
    out = {}
    for i in ids:
        rgb, raw = _pair(rng, [0, 1, 9, 91, 105, 181, 255])
        Image.fromarray(rgb).save(root / "images" / d / f"{i}.jpg", quality=95)
        Image.fromarray(raw, "L").save(root / "annotations" / d / f"{i}.png")
        # what the reader sees: the JPEG as decoded
        out[f"images/{d}/{i}.jpg"] = (np.asarray(Image.open(root / "images" / d / f"{i}.jpg").convert("RGB")), raw)
    return out


def cityscapes(root, split="val", seed=0):
    """cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/.../*_gtFine_labelIds.png."""
    rng = np.random.default_rng(seed)
    root = Path(root) / "cityscapes"
    out = {}
    for city, stems in (("zurich", ["zurich_000001_000019", "zurich_000000_000019"]), ("aachen", ["aachen_000000_000019"])):
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            rgb, raw = _pair(rng, [0, 3, 6, 7, 8, 26, 33])
            Image.fromarray(rgb).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(raw, "L").save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
            # distractors the reader must ignore
            Image.fromarray(raw, "L").save(root / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png")
            out[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = (rgb, raw)
    return out


def potsdam(root, split="val", n=3, seed=0, float_images=False):
    """potsdam/{labelled_train,labelled_test}.txt, imgs/<id>.mat ('img' H x W x 4), gt/<id>.mat ('gt')."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root = Path(root) / "potsdam"
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / "gt").mkdir(parents=True, exist_ok=True)
    ids = [f"{i}_{3 * i}" for i in range(n)]
    (root / {"train": "labelled_train.txt", "val": "labelled_test.txt"}[split]).write_text("\n".join(ids) + "\n")
    out = {}
    for i in ids:
        rgb, raw = _pair(rng, [0, 1, 2, 3, 4, 5, 255], size=(40, 40))
        ir = rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)
        img = np.concatenate([rgb, ir], axis=2)
        if float_images:
            img = img.astype(np.float32) / 255
            rgb = (img[:, :, :3] * 255).astype(np.uint8)  # torchvision to_pil_image: mul(255).byte()
        savemat(root / "imgs" / f"{i}.mat", {"img": img})
        savemat(root / "gt" / f"{i}.mat", {"gt": raw.astype(np.int32)})   # IIC saves int32 labels
        out[f"imgs/{i}.mat"] = (rgb, raw)
    return out


def folder(root, n=5, seed=0, labels=True, nested=True):
    """images/<...>.png|jpg (nested one level for odd i) and labels/<same>.png."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    out = {}
    for i in range(n):
        rel = f"{'sub/' if nested and i % 2 else ''}img{i}.png"
        rgb, raw = _pair(rng, [0, 1, 2, 255])
        (root / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(root / "images" / rel)
        if labels:
            (root / "labels" / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(raw, "L").save(root / "labels" / rel)
        out[rel] = (rgb, raw)
    return out
