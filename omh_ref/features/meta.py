"""``feats.json``: the one schema of a feature file's metadata, with its one writer (:func:`make`
then :func:`write`) and its one reader (:func:`read`). ``omh-ref extract`` and the synthetic demo
data both write through here; the feature store, evaluation and segmentation read through here.

The file sits beside ``feats.npy`` (the same stem, ``.json``). Fields (``None`` where unknown):

=================  ===============================================================================
``format``         1 (this schema)
``backbone``       the backbone's name (the ONNX file's stem, or ``synthetic``)
``onnx``           the ONNX file's name; ``onnx_sha256`` its sha256
``backbone_arch``  vit_small | vit_base ...; ``backbone_family`` dino | dinov2 | dinov3;
                   ``backbone_registers`` its register (DINOv3: storage) tokens;
                   ``backbone_weights_sha256`` the sha256 of its weights
                   (one for every export resolution); ``backbone_random_init`` true for random
                   weights (as ``omh-ref export`` records them in the ONNX file; None for other files)
``resolution``     the backbone's input size in px (square crops)
``patch``          pixels per patch side; ``grid`` [h, w]; ``dim`` C
``dtype``          float16 | float32; ``shape`` [N, h, w, C], as ``feats.npy``
``images``         the row order: one name per row (five-crop rows end in ``#tl`` … ``#c``)
``image_root``     the folder relative image names are resolved against
``labels``         the labels file beside it (``labels.npy``) or None; ``label_ignore`` 255
``flipped``        the flipped features' file (``feats_flip.npy``) or None
``attention``      HP's attention window weights (``extract --attention``) or None: {"file": "attn.npy",
                   "shape" [N, h, w, 9], "dtype" float16, "sigma" 28.0, "quantiles" [0.1, 0.9],
                   "quantile_interpolation", "offsets" (the nine (dy, dx), row-major), "source",
                   "processing"} (:mod:`omh_ref.features.attention`)
``augmented``      the features of one photometric augmentation per crop (``extract --augment``) or
                   None: {"file": "feats_aug.npy", "shape" [N, h, w, C], "dtype", "seed", "space"
                   (normalised | rgb), "draws", "transforms", "source"} (:mod:`omh_ref.extract.augment`)
``n_classes``      classes of the labels; ``class_names`` their names, in label order
``dataset``        cocostuff27 | cityscapes27 | potsdam3 | folder | synthetic; ``split``
``labels_fine``    the finer labels file beside it (``labels_fine.npy``: COCO-Stuff's 182 fine ids,
                   Potsdam's 6 classes, the synthetic data's parts) or None
``label_hierarchy`` the label granularities, finest first, or None (:func:`granularity`):
                   [{"name", "n_classes", "class_names", "labels" (the file its classes are read
                   from), "map" (that file's value -> class, or None for the identity), "parent"
                   (class -> class of the next granularity, None for the last)}]
``skipped``        [{"image", "error"}] images that could not be read and have no row
``omh_ref_version``
=================  ===============================================================================

A writer may add fields of its own (``crop``, ``preprocessing``, ``hierarchy``, ``synth_spec``
…); the reader keeps them. Files written before this schema (``patch_size`` for ``patch``, no
``format``) are read too.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.errors import InputError
from ..core.files import write_json

FORMAT = 1
LABEL_IGNORE = 255

# name -> (types allowed besides None, required when writing)
FIELDS = {
    "format": (int, True), "backbone": (str, True), "onnx": (str, False), "onnx_sha256": (str, False),
    "backbone_arch": (str, False), "backbone_family": (str, False), "backbone_registers": (int, False),
    "backbone_weights_sha256": (str, False), "backbone_random_init": (bool, False),
    "resolution": (int, True), "patch": (int, True), "grid": (list, True), "dim": (int, True),
    "dtype": (str, True), "shape": (list, True), "images": (list, False), "image_root": (str, False),
    "labels": (str, False), "label_ignore": (int, False), "flipped": (str, False),
    "attention": (dict, False), "augmented": (dict, False), "n_classes": (int, False),
    "class_names": (list, False), "dataset": (str, False), "split": (str, False), "labels_fine": (str, False),
    "label_hierarchy": (list, False), "skipped": (list, False), "omh_ref_version": (str, True),
}
GRANULARITY_KEYS = ("name", "n_classes", "class_names", "labels", "map", "parent")
COMPANIONS = ("attention", "augmented")   # row files beside feats.npy, one row per feature row


def path_for(features) -> Path:
    """``feats.json`` of ``feats.npy`` (the same stem)."""
    return Path(features).with_suffix(".json")


def make(*, shape, dtype, backbone, resolution, patch, **fields) -> dict:
    """A complete, checked record: the required fields as arguments, the others (and a writer's
    own extras) as keywords. ``grid`` and ``dim`` follow from ``shape``."""
    shape = [int(x) for x in shape]
    rec = {name: None for name in FIELDS}
    rec.update(format=FORMAT, backbone=backbone, resolution=int(resolution), patch=int(patch),
               grid=shape[1:3], dim=shape[3], dtype=str(np.dtype(dtype)), shape=shape, label_ignore=LABEL_IGNORE,
               skipped=[], omh_ref_version=__version__)
    rec.update(fields)
    _check(rec, "feats.json record")
    if rec["images"] is not None and len(rec["images"]) != shape[0]:
        raise ValueError(f"feats.json record: {len(rec['images'])} image names for {shape[0]} rows")
    missing = [k for k, (_, required) in FIELDS.items() if required and rec[k] is None]
    if missing:
        raise ValueError(f"feats.json record: missing {', '.join(missing)}")
    return rec


def write(path, record: dict) -> None:
    """Write a :func:`make` record atomically (the last file of a feature folder to appear)."""
    write_json(path, record)


def _check(m: dict, where) -> None:
    for k, (t, _) in FIELDS.items():
        v = m.get(k)
        if v is not None and (not isinstance(v, t) or (isinstance(v, bool) and t is not bool)):
            raise InputError(f"{where}: field {k!r} should be {t.__name__} or null, got {v!r}")
    if m.get("n_classes") is not None and m["n_classes"] < 1:
        raise InputError(f"{where}: field 'n_classes' should be >= 1, got {m['n_classes']}")
    if m.get("label_hierarchy") is not None:
        check_label_hierarchy(m["label_hierarchy"], f"{where}: field 'label_hierarchy'")
    for k in COMPANIONS:
        v = m.get(k)
        if v is not None and not (isinstance(v.get("file"), str) and v["file"] and isinstance(v.get("shape"), list)):
            raise InputError(f"{where}: field {k!r} should name its 'file' and 'shape', got {v!r}")


def granularity(name, n_classes, labels, class_names=None, map=None, parent=None) -> dict:
    """One entry of ``label_hierarchy``: ``n_classes`` classes named ``class_names`` (default
    '0', '1', ...), read from the labels file ``labels`` (a name beside ``feats.json``) through
    ``map`` (list: that file's value v -> class map[v]; values outside the list and 255 are
    ignored; None: the value is the class), and ``parent`` (list: class -> its class in the next,
    coarser granularity; None for the coarsest)."""
    rec = {"name": str(name), "n_classes": int(n_classes),
           "class_names": [str(c) for c in (class_names or range(int(n_classes)))], "labels": str(labels),
           "map": None if map is None else [int(v) for v in map],
           "parent": None if parent is None else [int(v) for v in parent]}
    return rec


def check_label_hierarchy(h, where="label_hierarchy") -> None:
    """An InputError naming the first thing wrong with a ``label_hierarchy`` list: its entries'
    keys and types, class counts and names, map values in range, and each parent map a function
    from a granularity's classes onto the next one's (a tree, finest first)."""
    if not isinstance(h, list) or not h:
        raise InputError(f"{where}: expected a non-empty list of granularities, finest first")
    seen = set()
    for i, g in enumerate(h):
        at = f"{where}[{i}]"
        if not isinstance(g, dict) or set(g) != set(GRANULARITY_KEYS):
            raise InputError(f"{at}: expected an object with keys {', '.join(GRANULARITY_KEYS)}")
        n = g["n_classes"]
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 255:
            raise InputError(f"{at}: 'n_classes' should be an integer in [1, 255], got {n!r}")
        if not isinstance(g["name"], str) or not isinstance(g["labels"], str) or not g["labels"]:
            raise InputError(f"{at}: 'name' and 'labels' should be strings")
        if g["name"] in seen:
            raise InputError(f"{at}: 'name' {g['name']!r} is taken by an earlier granularity (names must differ)")
        seen.add(g["name"])
        if not isinstance(g["class_names"], list) or len(g["class_names"]) != n:
            raise InputError(f"{at}: 'class_names' should list {n} names")
        if g["map"] is not None and not (isinstance(g["map"], list) and len(g["map"]) <= 256 and all(
                isinstance(v, int) and (0 <= v < n or v == LABEL_IGNORE) for v in g["map"])):
            raise InputError(f"{at}: 'map' should be a list of at most 256 class ids in [0, {n}) or {LABEL_IGNORE}")
        last = i == len(h) - 1
        par = g["parent"]
        if last:
            if par is not None:
                raise InputError(f"{at}: the coarsest granularity has no 'parent' map")
            continue
        m = h[i + 1].get("n_classes") if isinstance(h[i + 1], dict) else None
        if not (isinstance(par, list) and len(par) == n and isinstance(m, int)
                and all(isinstance(v, int) and 0 <= v < m for v in par)):
            raise InputError(f"{at}: 'parent' should map each of its {n} classes to one of the next "
                             f"granularity's {m} classes")
        if len(set(par)) != m:
            raise InputError(f"{at}: 'parent' leaves a class of the next granularity without children")


def read(path, feats=None, feats_path="its features") -> dict:
    """The record at ``path``, checked, and against the feature array ``feats`` (its shape, row
    count and dtype; read from ``feats_path``) when given. An InputError names the file and the
    field."""
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise InputError(f"{path}: expected a JSON object of metadata, got {type(m).__name__}")
    if "patch" not in m and "patch_size" in m:          # written before the schema had one name
        m["patch"] = m["patch_size"]
    _check(m, path)
    if feats is not None:
        shape = m.get("shape")
        if shape is not None and tuple(shape) != feats.shape:
            raise InputError(f"{path}: says shape {tuple(shape)} but {feats_path} has shape {feats.shape}")
        images = m.get("images")
        if images is not None and len(images) != feats.shape[0]:
            raise InputError(f"{path}: lists {len(images)} images but {feats_path} has {feats.shape[0]} rows")
        if m.get("dtype") is not None and np.dtype(m["dtype"]) != feats.dtype:
            raise InputError(f"{path}: says dtype {m['dtype']} but {feats_path} holds {feats.dtype}")
    return m


def listed_labels(features) -> Path | None:
    """The labels file that ``feats.json`` beside ``features`` names (relative to its folder), or
    None (no metadata, no labels, or a file the store will report when it opens it)."""
    p = path_for(features)
    try:
        name = read(p).get("labels") if p.is_file() else None
    except InputError:
        return None
    return None if not name else Path(features).parent / name
