"""Reading a backbone's weights for ``omh-ref export`` (torch; imported only to export): a local
Meta ``.pth``, a Hugging Face ``.safetensors`` file or model folder, in either key layout.

* **Files.** A ``.pth`` / ``.pt`` / ``.bin`` is read with ``torch.load(weights_only=True)``: a bare
  state dict, or one under ``teacher`` (preferred), ``student``, ``model`` or ``state_dict`` (DINO's
  and DINOv2's training checkpoints). A ``.safetensors`` file is read with the ``safetensors``
  package; a folder (``save_pretrained``'s) by its ``model.safetensors``, its sharded
  ``model.safetensors.index.json`` or its ``pytorch_model.bin``.
* **Prefixes and heads.** ``module.`` and ``backbone.`` (DDP, DINO's and DINOv2's teacher), and
  ``dinov2.`` / ``dinov2_with_registers.`` / ``dinov3_vit.`` (a Hugging Face model with a head
  saved whole) are stripped; projection and classification heads (``head.``, ``dino_head.``,
  ``ibot_head.``, ``classifier.``) are ignored and listed.
* **Layouts.** A state dict holding ``embeddings.cls_token`` is Hugging Face's: each tensor of the
  model is made from it by the family's rules (:func:`omh_ref.extract.vit_dinov2.hf_rules`,
  :func:`omh_ref.extract.vit_dinov3.hf_rules`), and the first Hugging Face key missing, left over
  or of the wrong shape is named in one line. Otherwise it is Meta's, loaded strictly, every
  missing or unexpected key and shape mismatch listed (as ``omh-ref export`` always did for DINO).
* **The shape of the model in a file** (:func:`read_shape`): its width, depth, FFN kind, patch and
  register count, so ``--arch dinov2`` needs no size.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from . import archs, vit_dinov2, vit_dinov3


class CheckpointError(RuntimeError):
    pass


CONTAINERS = ("teacher", "student", "model", "state_dict")
PREFIXES = ("module.", "backbone.", "dinov2_with_registers.", "dinov2.", "dinov3_vit.")
HEADS = ("head", "dino_head", "ibot_head", "classifier")
DINO_LAYOUT = {"meta": {"cls": "cls_token", "block": r"^blocks\.(\d+)\.", "swiglu": None,
                        "patch": "patch_embed.proj.weight", "registers": None}}
LAYOUTS = {"dino": DINO_LAYOUT, "dinov2": vit_dinov2.LAYOUT, "dinov3": vit_dinov3.LAYOUT}
HF_MARK = "embeddings.cls_token"


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def read_file(path) -> tuple:
    """(state dict of tensors, container key or None) of a checkpoint file or model folder."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path), None
    if not path.is_file():
        raise CheckpointError(f"cannot read checkpoint {path}: no such file or folder")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), None
    try:
        # DINO's full training checkpoints pickle their argparse options ("args") beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # report what could not be read, and why, on one line
        raise CheckpointError(f"cannot read checkpoint {path}: {_one_line(e)}") from e
    container = None
    if isinstance(obj, dict):
        for k in CONTAINERS:
            if isinstance(obj.get(k), dict):
                obj, container = obj[k], k
                break
    obj, container = _training_model(obj, container)
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors (nor one under "
                              f"'teacher'/'student'/'model')")
    return obj, container


def _read_safetensors(path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package ({e}); "
                              "pip install 'omh-ref[torch]'") from None
    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as e:  # safetensors raises its own error types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def _read_folder(folder: Path) -> dict:
    single, index, binary = folder / "model.safetensors", folder / "model.safetensors.index.json", \
        folder / "pytorch_model.bin"
    if single.is_file():
        return _read_safetensors(single)
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        state = {}
        for shard in shards:
            state.update(_read_safetensors(folder / shard))
        return state
    if binary.is_file():
        return read_file(binary)[0]
    raise CheckpointError(f"{folder}: a folder without model.safetensors, model.safetensors.index.json or "
                          "pytorch_model.bin (expected a Hugging Face model folder)")


def clean(state: dict) -> tuple:
    """(state with prefixes stripped and heads left out, [original names of the keys left out])."""
    out, ignored = {}, []
    for k, v in state.items():
        k2 = k
        stripped = True
        while stripped:
            stripped = False
            for p in PREFIXES:
                if k2.startswith(p):
                    k2, stripped = k2[len(p):], True
        if k2.split(".", 1)[0] in HEADS:
            ignored.append(k)
            continue
        out[k2] = v
    return out, ignored


def layout_of(state: dict) -> str:
    return "hf" if HF_MARK in state else "meta"


# --------------------------------------------------------------------------------------------------
# The model a file holds
# --------------------------------------------------------------------------------------------------
def read_shape(state: dict, family: str) -> dict:
    """{"width", "depth", "ffn", "patch", "registers"} of the ViT in ``state`` (cleaned), read
    the way ``family`` lays it out; a CheckpointError when the keys that say so are not there."""
    layout = layout_of(state)
    if family == "dinov2" and layout == "meta":
        state = vit_dinov2.meta_keys_normalised(state)
    where = LAYOUTS[family].get(layout)
    if where is None:
        raise CheckpointError(f"{archs.family(family).title} is read in Meta's layout only (this one is "
                              "Hugging Face's)")
    for key in (where["cls"], where["patch"]):
        if key not in state:
            raise CheckpointError(f"no '{key}' in it: not a {archs.family(family).title} ViT in "
                                  f"{'Hugging Face' if layout == 'hf' else 'Meta'}'s layout")
    blocks = {int(m.group(1)) for k in state if (m := re.match(where["block"], k))}
    swiglu = where["swiglu"] is not None and any(where["swiglu"] in "." + k for k in state)
    regs = state.get(where["registers"]) if where["registers"] else None
    return {"width": int(state[where["cls"]].shape[-1]), "depth": len(blocks), "ffn": "swiglu" if swiglu else "mlp",
            "patch": int(state[where["patch"]].shape[-1]), "registers": 0 if regs is None else int(regs.shape[1])}


def infer(spec: archs.Spec, state: dict, path) -> archs.Spec:
    """``spec`` (a family alone, perhaps with a patch and registers) with its size, patch and
    registers filled in from the checkpoint where not given."""
    try:
        shape = read_shape(state, spec.family)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {path}: {e}") from None
    f = archs.family(spec.family)
    size = spec.size
    if size is None:
        fits = [n for n, s in f.sizes.items() if (s.dim, s.depth, s.ffn) == (shape["width"], shape["depth"], shape["ffn"])]
        if not fits:
            raise CheckpointError(f"checkpoint {path}: a {shape['width']}-wide, {shape['depth']}-block ViT with a "
                                  f"{shape['ffn']} FFN is none of {f.title}'s sizes ({', '.join(f.sizes)})")
        size = fits[0]
    patch = shape["patch"] if spec.patch is None else spec.patch
    regs = shape["registers"] if spec.registers is None else spec.registers
    return archs.Spec(spec.family, size, patch, regs)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def load(model, state: dict, path, container=None, ignored=()) -> dict:
    """Load ``state`` (cleaned) into ``model`` in whichever layout it is; a CheckpointError says
    what does not fit. -> {"container", "loaded", "ignored", "layout"}."""
    family = model.family
    layout = layout_of(state)
    if layout == "hf":
        if family == "dino":
            raise CheckpointError(f"checkpoint {path}: a Hugging Face layout; DINO (v1) is read in Meta's "
                                  "layout (DINO's .pth files)")
        state = _from_hf(model, state, path)
    else:
        if family == "dinov2":
            state = vit_dinov2.meta_keys_normalised(state)
        if family == "dinov3":
            extra = [k for k in state if k.startswith(vit_dinov3.IGNORED_META)]
            ignored = [*ignored, *extra]
            state = {k: v for k, v in state.items() if k not in extra}
        _check_meta(model, state, path)
    model.load_state_dict(state, strict=True)
    model.after_load()
    return {"container": container, "loaded": len(state), "ignored": list(ignored), "layout": layout}


def _one_line(e, limit=300) -> str:
    """An exception's message on one line, ANSI escapes and newlines out (torch's weights_only
    message spans many lines)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _training_model(obj, container):
    """DINOv2's and DINOv3's training checkpoints keep both networks under one "model" dict
    (``teacher.backbone.*``, ``student.backbone.*``): the teacher's, as Meta evaluates, else the
    student's. Anything else passes through."""
    if not isinstance(obj, dict):
        return obj, container
    for net in ("teacher", "student"):
        keys = [k for k in obj if isinstance(k, str) and k.startswith(net + ".")]
        if keys:
            return {k[len(net) + 1:]: obj[k] for k in keys}, f"{container}.{net}" if container else net
    return obj, container


def what(model) -> str:
    """``vit_small patch 8`` (DINO, as export always said it), ``DINOv2 vit_small patch 14, 4 registers``."""
    base = f"{model.arch} patch {model.patch}"
    if model.family == "dino":
        return base
    return f"{archs.family(model.family).title} {base}, {model.registers} registers"


def _check_meta(model, state, path):
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or bad_shape:
        lines = [f"checkpoint {path} does not fit {what(model)}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_some(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_some(unexpected)}")
        if bad_shape:
            lines.append(f"  shape mismatches ({len(bad_shape)}): {_some(bad_shape, sep='; ')}")
        raise CheckpointError("\n".join(lines))


def _some(names, n=8, sep=", ") -> str:
    """The first ``n`` names and how many more (a wrong file can miss hundreds of keys)."""
    return sep.join(names[:n]) + (f"{sep}... and {len(names) - n} more" if len(names) > n else "")


class _Missing(Exception):
    def __init__(self, key):
        super().__init__(key)
        self.key = key


def _from_hf(model, hf: dict, path) -> dict:
    """The Meta state dict of ``model`` made from a Hugging Face one; one line naming the first
    Hugging Face key that is missing, left over, or of another shape than the model needs."""
    rules = (vit_dinov2 if model.family == "dinov2" else vit_dinov3).hf_rules(model)
    used, origin = set(), {}

    def take(key, optional=False):
        if key not in hf:
            if optional:
                return None
            raise _Missing(key)
        used.add(key)
        origin.setdefault(current[0], key)
        return hf[key]

    out, missing, current = {}, [], [None]
    own = model.state_dict()
    for meta_key in own:
        if meta_key not in rules:   # a rule for every tensor of the model: a gap here is a bug
            raise RuntimeError(f"no Hugging Face rule for {meta_key}")
        current[0] = meta_key
        try:
            out[meta_key] = rules[meta_key](take)
        except _Missing as m:
            missing.append(m.key)
        except RuntimeError as e:   # pieces that do not fit together (a cat or reshape of other shapes)
            raise CheckpointError(f"checkpoint {path} does not fit {what(model)} in the Hugging Face layout: "
                                  f"'{origin.get(meta_key, meta_key)}' cannot make {meta_key} "
                                  f"({str(e).splitlines()[0]})") from None
    unexpected = sorted(set(hf) - used)
    fits = f"{what(model)} in the Hugging Face layout"
    counts = f" ({len(missing)} missing, {len(unexpected)} unexpected)"
    if missing:
        raise CheckpointError(f"checkpoint {path} does not fit {fits}: missing key '{missing[0]}'{counts}")
    if unexpected:
        raise CheckpointError(f"checkpoint {path} does not fit {fits}: unexpected key '{unexpected[0]}'{counts}")
    for meta_key, t in out.items():
        if tuple(t.shape) != tuple(own[meta_key].shape):
            src = origin.get(meta_key, meta_key)
            raise CheckpointError(f"checkpoint {path} does not fit {fits}: '{src}' gives {meta_key} shape "
                                  f"{tuple(t.shape)}, the model needs {tuple(own[meta_key].shape)}")
    return out
