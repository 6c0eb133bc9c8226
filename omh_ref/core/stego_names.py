"""STEGO's names for omh-ref's settings, so that STEGO's ``train_config.yml`` (or its keys in an
omh-ref config file, or its spelling of a flag) is read in omh-ref's terms.

Each STEGO key is one of: a name of an omh-ref config field or loop option (:data:`NAMES`, a note
line says so when the names differ); a switch read only at the value that is omh-ref's method
(:data:`ONLY_AT`: refused in one line at any other value, which would ask for a model omh-ref does
not train); or a setting omh-ref does not use in training (:data:`IGNORED`: the data set, the
backbone, logging; named in one note line).

Sources, at github.com/mhamilton723/STEGO @ eb4d6b5 (line numbers are of those files):
``T`` = src/configs/train_config.yml, ``TS`` = src/train_segmentation.py, ``M`` = src/modules.py.
"""
from __future__ import annotations

import re

from .errors import InputError
from .options import flag_of

# STEGO key -> (table, omh-ref name): "model" a Config field, "train" a loop option ([train]).
NAMES = {
    "dim": ("model", "dim"),                          # T 39; TS 62: the code size (continuous: True)
    "feature_samples": ("model", "feature_samples"),  # T 51; M 355: S x S sampled points
    "neg_samples": ("model", "neg_samples"),          # T 52; M 382: negative pairings per step
    "pointwise": ("model", "pointwise"),              # T 50; M 330-333
    "zero_clamp": ("model", "zero_clamp"),            # T 41; M 337-340
    "neg_inter_weight": ("model", "weight_neg"),      # T 59; TS 181: the weight of neg_inter_loss
    "pos_inter_weight": ("model", "weight_inter"),    # T 60; TS 179: of pos_inter_loss (KNN pairs)
    "pos_intra_weight": ("model", "weight_intra"),    # T 61; TS 180: of pos_intra_loss (self pairs)
    "neg_inter_shift": ("model", "shift_neg"),        # T 62; M 387: the negatives' shift
    "pos_inter_shift": ("model", "shift_inter"),      # T 63; M 378: the KNN pairs' shift
    "pos_intra_shift": ("model", "shift_intra"),      # T 64; M 376: the self pairs' shift
    "max_steps": ("train", "steps"),                  # T 10; TS 485 (Trainer max_steps)
    "batch_size": ("train", "batch_size"),            # T 11; TS 453
    "lr": ("train", "lr"),                            # T 43; TS 379: the projection head's Adam
    "scalar_log_freq": ("train", "log_every"),        # T 165; TS 483 (log_every_n_steps)
    "val_freq": ("train", "val_every"),               # T 167; TS 476 (val_check_interval)
}

# STEGO's flag spellings of options a config file does not set (its key is in ONLY_AT).
FLAGS = {
    "num_neighbors": "knn_k",                         # T 13; TS 430: the KNN partners per image
}

# STEGO key -> (the value that is omh-ref's method, why another value is refused).
ONLY_AT = {
    "continuous": (True, "with false STEGO's code has n_classes channels (TS 59-60); omh-ref's code size is dim"),  # T 38
    "arch": ("dino", "omh-ref trains on DINO ViT features, STEGO's 'dino' (TS 68)"),  # T 31
    "dino_feat_type": ("feat", "omh-ref's features are the last block's normalised patch tokens, STEGO's "
                               "'feat' (M 96-97)"),  # T 33
    "projection_type": ("nonlinear", "omh-ref's head is STEGO's linear + nonlinear pair (M 108-111)"),  # T 34
    "use_true_labels": (False, "with true STEGO's correlation compares one-hot labels, not features "
                               "(TS 135-137)"),  # T 28
    "use_salience": (False, "saliency-guided point sampling (M 357-364) is not in omh-ref"),  # T 45
    "stabalize": (False, "clamping code correlations at 0.8 (M 342-343) is not in omh-ref"),  # T 46
    "correspondence_weight": (1.0, "it scales the three correlation weights (TS 179-181): multiply "
                                   "neg_inter_weight, pos_inter_weight and pos_intra_weight by it instead"),  # T 55
    "aug_alignment_weight": (0.0, "the augmentation-alignment loss (TS 189-200) is not in omh-ref"),  # T 53
    "rec_weight": (0.0, "the feature-reconstruction loss (TS 183-187) is not in omh-ref"),  # T 147
    "crf_weight": (0.0, "the CRF training loss (TS 202-208) is not in omh-ref (its CRF refines "
                        "predictions: eval --crf)"),  # T 151
    "reset_probe_steps": (None, "omh-ref does not reset its cluster heads during training (TS 232-237)"),  # T 161
    "extra_clusters": (0, "omh-ref sets the eval level's cluster count in levels (TS 75: n_classes + "
                          "extra_clusters): make levels' last entry that count"),  # T 27
    "num_neighbors": (7, "omh-ref train draws each image's partner from its knn_k = 7 nearest (TS 430); "
                         "omh-ref seeds --knn-k sets another count"),  # T 13
}

# STEGO keys omh-ref does not use in training, whatever their value.
IGNORED = (
    # the data set and its loading (omh-ref extract reads the images): T 2, 9, 14, 17, 18, 21-24
    "pytorch_data_dir", "num_workers", "dataset_name", "dir_dataset_name", "dir_dataset_n_classes",
    "crop_type", "crop_ratio", "res", "loader_crop_type",
    # the backbone (omh-ref export/extract): T 30, 36, 44; granularity T 37 (feature-pyramid only, TS 67)
    "model_type", "dino_patch_size", "pretrained_weights", "granularity",
    # logging, plots and output: T 1, 3-6, 20 (TS 304: plots), 164, 168; hydra's own block T 171-176
    "output_root", "experiment_name", "log_dir", "azureml_logging", "submitting_to_aml", "has_labels",
    "n_images", "hist_freq", "hydra",
    # read nowhere in STEGO's training: T 29, 32, 47, 148; checkpoint_freq T 166 (TS 489: every 400 steps)
    "use_recalibrator", "use_fit_model", "stop_at_zero", "repulsion_weight", "checkpoint_freq",
    # the CRF loss's parameters, read only with crf_weight > 0 (TS 91-92): T 152-158; T 159 (src/train_crf.py)
    "alpha", "beta", "gamma", "w1", "w2", "shift", "crf_samples", "color_space",
)
# ``dropout`` (T 40) as true/false is STEGO's switch for channel dropout on the features its
# correlation compares (M 115-116), ignored: omh-ref compares the undropped features, and its
# ``dropout`` field (a probability) is the head's input dropout, p = 0.1 in STEGO whatever the
# switch (M 33, 109-111). A number under ``dropout`` is omh-ref's field.


def _ignored(key, value, source, root) -> bool:
    """Whether ``key`` is a STEGO setting left out (refusing one that asks for another model)."""
    if key in IGNORED or (key == "dropout" and isinstance(value, bool)):
        return True
    if key not in ONLY_AT:
        return False
    want, why = ONLY_AT[key]
    value = resolve(key, value, root, source)
    if value != want or isinstance(value, bool) != isinstance(want, bool):
        raise InputError(f"{source}: {key} = {value!r}: {why}; set it to {want!r} or leave it out "
                         "(STEGO's names: omh_ref/core/stego_names.py)")
    return True


_MISSING = object()


def _lookup(root, dotted):
    node = root
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def resolve(key, value, root, source, depth=0):
    """``value`` with a hydra interpolation ``${a.b}`` (the whole value) replaced by the value it
    names in the file (``root``); any other ``${...}`` is refused in one line."""
    if not (isinstance(value, str) and "${" in value):
        return value
    m = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", value)
    found = _lookup(root, m.group(1)) if m else _MISSING
    if found is _MISSING or depth > 8:
        raise InputError(f"{source}: {key}: {value!r} is an interpolation omh-ref does not resolve (only "
                         "${key} or ${table.key} naming a value of the same file); write the value")
    return resolve(key, found, root, source, depth + 1)


def translate(fields: dict, source, table=None, root=None):
    """A config file's keys in omh-ref's terms -> ({"model": ..., "train": ...}, note lines).
    ``fields``: a file without tables (``table`` None: STEGO's loop keys go to "train", the
    rest to "model") or one of its [model]/[train] tables, where a key of the other table is
    refused. ``root``: the whole file, for interpolations."""
    root = fields if root is None else root
    out, notes, ignored = {"model": {}, "train": {}}, [], []
    for key, value in fields.items():
        if _ignored(key, value, source, root):
            ignored.append(key)
            continue
        where, name = NAMES.get(key, (table or "model", key))
        if table is not None and where != table:
            raise InputError(f"{source}: [{table}] {key}: a {'training-loop' if where == 'train' else 'model'} "
                             f"setting (omh-ref's {name}); put it in [{where}]")
        if name in out[where]:
            stego = key if key != name else next(k for k in fields if k != name and NAMES.get(k, ())[1:] == (name,))
            raise InputError(f"{source}: {stego} is STEGO's name for {name}, which the file also gives; keep one")
        out[where][name] = resolve(key, value, root, source)
        if name != key:
            notes.append(f"note: {source}: {key} is STEGO's name for omh-ref's {name}")
    if ignored:
        notes.append(f"note: {source}: STEGO keys not read (its data, backbone and logging settings, and switches at "
                     f"omh-ref's own value; omh_ref/core/stego_names.py says why each): {', '.join(ignored)}")
    return out, notes


def hint(names) -> str:
    """' (neg_inter_shift is STEGO's name for shift_neg)' for the STEGO names among ``names``."""
    said = [f"{n} is STEGO's name for {NAMES[n][1]}" for n in names if n in NAMES and NAMES[n][1] != n]
    return f" ({'; '.join(said)})" if said else ""


def flag_aliases(name) -> tuple:
    """STEGO's spellings of the flag of omh-ref's ``name`` (``--neg-inter-shift`` for shift_neg)."""
    names = {**{k: n for k, (_, n) in NAMES.items()}, **FLAGS}
    return tuple(flag_of(k) for k, n in names.items() if n == name and k != n)
