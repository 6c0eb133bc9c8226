"""Which backbone made a feature file, and refusing to mix two.

A backbone is identified by what ``omh-ref export`` writes into the ONNX file's metadata (and
extraction copies into ``feats.json``): its family (DINO, DINOv2, DINOv3), architecture, patch size,
register tokens, channel count, the sha256 of its weights (the same for every export resolution of
one set of weights) and whether those weights were random. A checkpoint records the provenance of
the features it was trained on, so ``eval``, ``segment``, ``train --val-features`` and ``seeds`` can
refuse features or an ONNX model of another backbone in one line, where the numbers would otherwise
come out silently wrong.

A provenance is a dict with the keys of :data:`KEYS` (None where unknown: files written before
this record, ONNX files not made by ``omh-ref export``). Two are the same backbone unless a field
both know differs; weights both sides do not know are judged by the ONNX file's sha256 when both
exports are at the same resolution.
"""
from __future__ import annotations

from ..core.errors import InputError

KEYS = ("name", "family", "arch", "patch", "registers", "dim", "weights_sha256", "random_init", "onnx_sha256",
        "resolution")
FLAG = "--allow-backbone-mismatch"
ARCH_SHORT = {"vit_small": "ViT-S", "vit_base": "ViT-B", "vit_large": "ViT-L", "vit_small_plus": "ViT-S+",
              "vit_giant2": "ViT-g"}
FAMILY_TITLE = {"dino": "DINO", "dinov2": "DINOv2", "dinov3": "DINOv3"}     # extract/archs.py FAMILIES


def of_meta(meta: dict) -> dict:
    """The provenance a ``feats.json`` record states."""
    return {"name": meta.get("backbone"), "family": meta.get("backbone_family"), "arch": meta.get("backbone_arch"),
            "patch": meta.get("patch"), "registers": meta.get("backbone_registers"),
            "dim": meta.get("dim"), "weights_sha256": meta.get("backbone_weights_sha256"),
            "random_init": meta.get("backbone_random_init"), "onnx_sha256": meta.get("onnx_sha256"),
            "resolution": meta.get("resolution")}


def to_meta(p: dict) -> dict:
    """The ``feats.json`` fields that carry provenance ``p`` beyond the ones it always has."""
    return {"backbone_family": p.get("family"), "backbone_arch": p.get("arch"),
            "backbone_registers": p.get("registers"), "backbone_weights_sha256": p.get("weights_sha256"),
            "backbone_random_init": p.get("random_init")}


def describe(p: dict) -> str:
    arch = ARCH_SHORT.get(p.get("arch"), p.get("arch") or "ViT")
    fam = FAMILY_TITLE.get(p.get("family"), p.get("family"))
    regs = f", {p['registers']} registers" if p.get("registers") else ""
    bits = [f"{p.get('name') or 'unnamed'} ({fam + ' ' if fam else ''}{arch}/{p.get('patch') or '?'}{regs}, "
            f"dim {p.get('dim') or '?'}"]
    if p.get("weights_sha256"):
        bits.append(f"weights {p['weights_sha256'][:12]}")
    elif p.get("onnx_sha256"):
        bits.append(f"onnx {p['onnx_sha256'][:12]}")
    if p.get("random_init"):
        bits.append("random init")
    return ", ".join(bits) + ")"


def differs(a: dict, b: dict) -> str | None:
    """What tells backbones ``a`` and ``b`` apart, or None when nothing known does."""
    for key, what in (("patch", "patch size"), ("dim", "channel count"), ("family", "model family"),
                      ("arch", "architecture"), ("registers", "register count"),
                      ("weights_sha256", "weights"), ("random_init", "random init")):
        if a.get(key) is not None and b.get(key) is not None and a[key] != b[key]:
            return what
    unknown = a.get("weights_sha256") is None or b.get("weights_sha256") is None
    if (unknown and a.get("onnx_sha256") and b.get("onnx_sha256") and a["onnx_sha256"] != b["onnx_sha256"]
            and a.get("resolution") == b.get("resolution")):
        return "ONNX file (same resolution, no weights hash to compare)"
    if (a.get("name") == "synthetic") != (b.get("name") == "synthetic") and a.get("name") and b.get("name"):
        return "source (synthetic against a real backbone)"
    return None


def require_same(trained: dict | None, given: dict, *, given_what: str, trained_what: str, allow: bool,
                 say=print) -> None:
    """Refuse (an InputError naming both, and the flag that overrides) when ``given`` is another
    backbone than ``trained``; with ``allow``, say so in one line and go on. ``trained`` None: a
    record from before provenance, nothing to compare."""
    if not trained:
        return
    why = differs(trained, given)
    if why is None:
        return
    line = (f"{given_what} come from backbone {describe(given)} but {trained_what} come from "
            f"{describe(trained)} (another {why})")
    if not allow:
        raise InputError(f"{line}; pass {FLAG} if you mean to mix them")
    say(f"warning: {line} ({FLAG})")


def random_note(p: dict, where: str) -> str | None:
    """The line every run on features of randomly initialised weights prints, or None."""
    if not p or not p.get("random_init"):
        return None
    return (f"note: {where} come from a randomly initialised backbone ({p.get('name')}), not trained "
            "weights: scores on them say nothing about DINO")
