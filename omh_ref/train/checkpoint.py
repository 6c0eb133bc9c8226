"""Checkpoints: one ``.npz`` with parameters, Adam state, step, RNG state, config and loop state,
and the base's state outside its parameters (HP's reference pools) where it keeps one.

Written atomically (:func:`omh_ref.core.files.atomic_write`: a temporary file beside it, fsynced,
renamed over the old one), so a kill at any moment leaves either the previous checkpoint or the new
one, never a torn file.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from .. import __version__
from ..core import model
from ..core.backend import to_device, to_host
from ..core.config import Config
from ..core.errors import InputError
from ..core.files import atomic_write

# 3: the config says base and omh (Config.upgrade migrates 'baseline' and the retired fields);
# 2: cluster_target names say what they do (relaxed / balanced). 1 and 2 are read and migrated.
FORMAT = 3
READS = (1, 2, 3)


def _migrate_config(cfg: dict, fmt: int) -> dict:
    """A format-1 checkpoint's config in today's terms: its 'balanced' with a finite rho_q was the
    relaxed targets, with rho_q = inf the strictly balanced ones (rho_q then plays no part)."""
    if fmt == 1 and cfg.get("cluster_target") == "balanced":
        if math.isfinite(cfg.get("rho_q", 0.1)):
            cfg["cluster_target"] = "relaxed"
        else:
            cfg["rho_q"] = 0.1
    return cfg


def save(path, params, opt_state, step, rng, cfg: Config, arrays=None, info=None, state=None):
    """Write a checkpoint. ``arrays``: extra named arrays (the data order); ``info``: extra JSON;
    ``state``: the base's named arrays outside its parameters (HP's pools), any device."""
    out = {f"param/{k}": to_host(v) for k, v in params.items()}
    out.update({f"adam_m/{k}": to_host(v) for k, v in opt_state["m"].items()})
    out.update({f"adam_v/{k}": to_host(v) for k, v in opt_state["v"].items()})
    out.update({f"extra/{k}": np.asarray(v) for k, v in (arrays or {}).items()})
    out.update({f"state/{k}": to_host(v) for k, v in (state or {}).items()})
    meta = {"format": FORMAT, "omh_ref_version": __version__, "step": int(step), "adam_t": int(opt_state["t"]),
            "rng_state": rng.bit_generator.state, "config": dataclasses.asdict(cfg), "info": info or {}}
    out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    atomic_write(path, lambda fh: np.savez(fh, **out))


def load(path) -> dict:
    """-> {'params', 'opt_state', 'step', 'rng', 'config', 'arrays', 'state', 'info'} (host arrays)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a checkpoint .npz written by omh-ref train)")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        meta = json.loads(bytes(data.pop("meta")).decode())
    except Exception as e:
        raise InputError(f"{path}: not a readable omh-ref checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("format") not in READS:
        raise InputError(f"{path}: checkpoint format {meta.get('format')}, expected one of {READS}")

    def group(prefix):
        return {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}

    try:
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng_state"]
        cfg = _migrate_config(meta["config"], meta["format"])
        cfg["levels"] = tuple(cfg["levels"])
        out = {"params": group("param/"),
               "opt_state": {"t": meta["adam_t"], "m": group("adam_m/"), "v": group("adam_v/")},
               "step": meta["step"], "rng": rng, "config": Config.from_dict(cfg),
               "arrays": group("extra/"), "state": group("state/"), "info": meta["info"]}
    except (KeyError, TypeError, ValueError) as e:   # a field missing, of another version, or corrupt
        raise InputError(f"{path}: not a usable omh-ref checkpoint ({type(e).__name__}: {e})") from None
    return out


def _meta(path) -> dict | None:
    """The metadata of the checkpoint at ``path`` (nothing else read), or None where there is no
    readable one (missing, torn, another format)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(bytes(z["meta"]).decode())
    except Exception:
        return None


def step_of(path) -> int | None:
    """The step of the checkpoint at ``path``, or None where there is no readable one."""
    meta = _meta(path)
    return None if meta is None else int(meta["step"])


def backbone_of(path) -> dict | None:
    """The provenance (:mod:`omh_ref.features.provenance`) of the features the checkpoint was
    trained on, or None (written before checkpoints recorded it, or not readable)."""
    meta = _meta(path)
    return None if meta is None else (meta.get("info") or {}).get("backbone")


PROBE_ARRAYS = ("probe_W", "probe_b")   # a released linear probe (omh-ref import): (n_classes, D), (n_classes,)


def stored_probe(path) -> dict | None:
    """The linear probe the checkpoint holds, {"W", "b"} (host float32), or None: what ``omh-ref
    import`` keeps of a peer's released probe (``eval --stored-probe``)."""
    arrays = load(path)["arrays"]
    if not all(k in arrays for k in PROBE_ARRAYS):
        return None
    return {"W": arrays["probe_W"].astype(np.float32), "b": arrays["probe_b"].astype(np.float32)}


def refuse_imported(path, info: dict) -> None:
    """An imported checkpoint (``omh-ref import``) holds no training state to resume: one line."""
    imported = (info or {}).get("imported")
    if imported:
        raise InputError(f"{path}: imported from {imported.get('peer_title', 'a peer')}'s checkpoint by omh-ref "
                         "import; it holds no training state (Adam moments, data order) to resume; evaluate it "
                         "with omh-ref eval, or train a new run")


def check_params(path, params, cfg: Config):
    """Every parameter the config needs, with its shape (a checkpoint edited or cut short); called
    where a checkpoint is used as a model (training's --resume, evaluation)."""
    for k, shape in model.param_shapes(cfg).items():
        got = params.get(k)
        if got is None or got.shape != shape:
            raise InputError(f"{path}: parameter {k} should have shape {shape} for its config, got "
                             f"{'nothing' if got is None else got.shape}")


def load_params(path, device="cpu"):
    """Parameters (on ``device``) and config of a checkpoint, checked: a trained model, for
    evaluation and segmentation."""
    ck = load(path)
    check_params(path, ck["params"], ck["config"])
    return to_device(ck["params"], device), ck["config"]
