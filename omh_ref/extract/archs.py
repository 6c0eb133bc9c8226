"""The backbones ``omh-ref export`` builds, as data (no torch here: the recipes and the feature
files read it too).

Three families of self-supervised ViT, each with the sizes its authors released:

=========  ========  =========  ===========================================================
family     patches   registers  sizes (embedding width, depth, heads; FFN)
=========  ========  =========  ===========================================================
dino       8, 16     0          vit_small (384, 12, 6), vit_base (768, 12, 12); MLP
dinov2     14        0 or 4     vit_small, vit_base, vit_large (1024, 24, 16): MLP;
                                vit_giant2 (1536, 40, 24): SwiGLU
dinov3     16        4          vit_small, vit_base, vit_large: MLP; vit_small_plus (384, 12,
                                6): SwiGLU, hidden ratio 6
=========  ========  =========  ===========================================================

Sources (line numbers of the files at the commits named):

* DINO: github.com/facebookresearch/dino ``vision_transformer.py`` (vit_small / vit_base), as
  ``export_dino.ARCHS`` has always said.
* DINOv2: github.com/facebookresearch/dinov2 @ b8931f7, ``dinov2/models/vision_transformer.py``
  lines 341-397 (widths, depths, heads), ``dinov2/hub/backbones.py`` lines 18-28 (patch 14,
  ``img_size`` 518, ``ffn_layer`` "mlp", no registers by default) and 85-95 (ViT-g: "swiglufused"),
  98-110 (the ``_reg`` models: 4 registers).
* DINOv3: github.com/facebookresearch/dinov3 @ 6876159, ``dinov3/hub/backbones.py`` lines 199-313
  and 316-369 (ViT-S/16, S+/16, B/16, L/16: patch 16, ``n_storage_tokens`` 4, "mlp" but S+
  "swiglu" with ``ffn_ratio`` 6).

How a DINO user names one (``omh-ref export --arch``), any of:

* ``vit_small`` / ``vit_base``: DINO (v1), as ``omh-ref export`` always took it;
* the torch.hub name: ``dino_vits8``, ``dinov2_vitb14``, ``dinov2_vits14_reg``, ``dinov3_vits16``,
  ``dinov3_vits16plus``, ... (:func:`hub_names`; the patch and registers are in the name);
* the family alone, ``dino`` / ``dinov2`` / ``dinov3``: the size, patch and registers are read
  from the checkpoint (``--patch`` and ``--registers`` given are checked against it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..core.files import file_sha256


@dataclass(frozen=True)
class Size:
    dim: int                 # embedding width C (the features' channels)
    depth: int
    heads: int
    short: str               # in file and torch.hub names: vits, vitb, vitl, vitg
    ffn: str = "mlp"         # "mlp" (fc1, GELU, fc2) or "swiglu"
    ffn_ratio: float = 4.0   # hidden width / C, before SwiGLU's 2/3 rounding
    plus: bool = False       # DINOv3's "plus" sizes (file names: dinov3_vits16plus)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    patches: tuple           # patch sizes of the released weights
    registers: int           # the default number of register (DINOv3: storage) tokens
    sizes: dict              # size name -> Size


_S, _B, _L = Size(384, 12, 6, "vits"), Size(768, 12, 12, "vitb"), Size(1024, 24, 16, "vitl")
FAMILIES = {
    "dino": Family("dino", "DINO", (8, 16), 0, {"vit_small": _S, "vit_base": _B}),
    "dinov2": Family("dinov2", "DINOv2", (14,), 0, {
        "vit_small": _S, "vit_base": _B, "vit_large": _L,
        "vit_giant2": Size(1536, 40, 24, "vitg", ffn="swiglu")}),
    "dinov3": Family("dinov3", "DINOv3", (16,), 4, {
        "vit_small": _S, "vit_small_plus": Size(384, 12, 6, "vits", ffn="swiglu", ffn_ratio=6.0, plus=True),
        "vit_base": _B, "vit_large": _L}),
}
LEGACY = ("vit_small", "vit_base")    # --arch vit_small: DINO (v1), the only family there was
MAX_REGISTERS = 16


@dataclass(frozen=True)
class Spec:
    """What ``--arch`` (with ``--patch``/``--registers``) names; None where still to be read from
    a checkpoint or defaulted (:func:`complete`)."""
    family: str
    size: str | None = None
    patch: int | None = None
    registers: int | None = None


def family(name) -> Family:
    return FAMILIES[name]


def size_of(spec: Spec) -> Size:
    return FAMILIES[spec.family].sizes[spec.size]


def hub_name(family_name, size, patch, registers) -> str:
    """The torch.hub entry point of this model: ``dino_vits8``, ``dinov2_vitb14_reg``,
    ``dinov3_vits16plus`` (a register count other than the family's usual one: ``_reg<N>``)."""
    f = FAMILIES[family_name]
    s = f.sizes[size]
    name = f"{family_name}_{s.short}{patch}{'plus' if s.plus else ''}"
    if registers != f.registers:
        name += "_reg" if (family_name == "dinov2" and registers == 4) else f"_reg{registers}"
    return name


def hub_names() -> dict:
    """{torch.hub name: Spec} of every released shape (DINOv2 with and without registers)."""
    out = {}
    for fname, f in FAMILIES.items():
        for size in f.sizes:
            for patch in f.patches:
                regs = (0, 4) if fname == "dinov2" else (f.registers,)
                for r in regs:
                    out[hub_name(fname, size, patch, r)] = Spec(fname, size, patch, r)
    return out


def arch_choices() -> list:
    """Every value ``--arch`` takes."""
    return [*LEGACY, *FAMILIES, *hub_names()]


def parse_arch(arch: str, patch: int | None = None, registers: int | None = None) -> Spec:
    """``--arch`` with ``--patch`` / ``--registers`` -> a Spec; ValueError (one line) when they
    disagree or name no released shape."""
    if arch in LEGACY:
        spec = Spec("dino", arch)
    elif arch in FAMILIES:
        spec = Spec(arch)
    elif arch in hub_names():
        spec = hub_names()[arch]
    else:
        raise ValueError(f"--arch {arch}: unknown; choose from {', '.join(arch_choices())}")
    for flag, given, named in (("--patch", patch, spec.patch), ("--registers", registers, spec.registers)):
        if given is not None and named is not None and given != named:
            raise ValueError(f"{flag} {given}: --arch {arch} has {named}"
                             + (" (for 4 registers name its _reg model)" if flag == "--registers" else ""))
    return Spec(spec.family, spec.size, patch if spec.patch is None else spec.patch,
                registers if spec.registers is None else spec.registers)


def complete(spec: Spec) -> Spec:
    """Defaults for what is still open (the family's patch when it has one, its registers);
    ValueError when the size is unknown or a value is not one the family has."""
    f = FAMILIES[spec.family]
    if spec.size is None:
        raise ValueError(f"--arch {spec.family}: name the size (e.g. --arch "
                         f"{next(iter(hub_names_of(spec.family)))}) or give a --checkpoint to read it from")
    if spec.size not in f.sizes:
        raise ValueError(f"{f.title} has no {spec.size} (sizes: {', '.join(f.sizes)})")
    patch = f.patches[0] if spec.patch is None else spec.patch     # DINO: 8, as --patch always defaulted
    if patch not in f.patches:
        raise ValueError(f"--patch {patch}: {f.title} is released at patch {' or '.join(map(str, f.patches))}")
    regs = f.registers if spec.registers is None else spec.registers
    if spec.family == "dino" and regs:
        raise ValueError(f"--registers {regs}: DINO (v1) has no register tokens")
    if not 0 <= regs <= MAX_REGISTERS:
        raise ValueError(f"--registers {regs}: expected 0 to {MAX_REGISTERS}")
    return Spec(spec.family, spec.size, patch, regs)


def hub_names_of(family_name) -> list:
    return [n for n, s in hub_names().items() if s.family == family_name]


def stem(spec: Spec) -> str:
    """The file stem of an export (before ``_random<seed>`` and ``_<resolution>``):
    ``dino_vits8``, ``dinov2_vits14``, ``dinov2_vitb14_reg4``, ``dinov3_vits16plus``."""
    f = FAMILIES[spec.family]
    s = f.sizes[spec.size]
    name = f"{spec.family}_{s.short}{spec.patch}{'plus' if s.plus else ''}"
    return name + (f"_reg{spec.registers}" if spec.registers != f.registers else "")


def model_name(spec: Spec, resolution: int, random_seed: int | None = None) -> str:
    """``dino_vits8_224``; random weights say so, ``dinov2_vits14_random0_224``."""
    rand = "" if random_seed is None else f"_random{random_seed}"
    return f"{stem(spec)}{rand}_{resolution}"


def export_args(spec: Spec) -> dict:
    """How ``omh-ref export`` is told this backbone: ``arch=vit_small, patch=8`` for DINO (as
    always), else the torch.hub name (which holds the patch and the registers)."""
    if spec.family == "dino":
        return {"arch": spec.size, "patch": spec.patch}
    return {"arch": hub_name(spec.family, spec.size, spec.patch, spec.registers)}


def dim_of(family_name, size) -> int:
    return FAMILIES[family_name].sizes[size].dim


def describe(spec: Spec) -> str:
    """``DINOv2 ViT-S/14 with 4 registers``."""
    f = FAMILIES[spec.family]
    s = f.sizes[spec.size]
    title = f"ViT-{s.short[3:].upper()}{'+' if s.plus else ''}/{spec.patch}"
    regs = "" if spec.registers == f.registers or spec.family == "dino" else f" with {spec.registers} registers"
    return f"{f.title} {title}{regs}"


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def checkpoint_sha256(path) -> str:
    """sha256 of a checkpoint file; of a Hugging Face model folder, of the names and sha256s of its
    weight files (.safetensors, .bin), in name order (what the manifest's ``checkpoint_sha256`` holds)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")):
        h.update(f"{f.name}:{file_sha256(f)};".encode())
    return h.hexdigest()
