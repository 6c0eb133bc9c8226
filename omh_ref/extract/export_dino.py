"""``omh-ref export``: a DINO, DINOv2 or DINOv3 ViT backbone to ONNX for ``omh-ref extract``
(docs/METHOD.md, docs/ARCHITECTURE.md). It needs torch (``pip install 'omh-ref[torch]'``); nothing
else in the package imports this module except when asked to export.

The model maps an image batch (B, 3, H, W), float32, already normalised (ImageNet mean/std), to the
last block's patch tokens after the final LayerNorm, the class token and any register (DINOv3:
storage) tokens dropped, channels last: (B, H/p, W/p, C).
With ``--attention`` it has a second output, ``attention`` (B, n, n), n = H/p * W/p: the last
block's pre-softmax attention logits averaged over heads, patch rows and columns only
(:class:`omh_ref.extract.vit_layers.AttentionLogits`; ``omh-ref extract --attention`` turns them
into HP's window weights, :mod:`omh_ref.features.attention`), checked against torch like the
features and stated in the file's metadata (``omh_ref.attention``). Without it the file is what
it always was.

Which backbone (:mod:`omh_ref.extract.archs`): ``--arch vit_small|vit_base`` with ``--patch 8|16``
is DINO (v1), as always; ``--arch`` also takes a torch.hub name (``dinov2_vits14``,
``dinov2_vitb14_reg``, ``dinov3_vits16``, ``dinov3_vits16plus``, ...) or a family alone (``dino``,
``dinov2``, ``dinov3``), whose size, patch and registers are read from the checkpoint;
``--registers N`` sets DINOv2's register tokens (0 or 4 released) and DINOv3's storage tokens (4).

DINO's ViT below is written from the description of facebookresearch/dino ``vision_transformer.py``;
its state-dict keys match the official checkpoints (``cls_token``, ``pos_embed``,
``patch_embed.proj.*``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*``,
``norm.*``), LayerNorm eps 1e-6, qkv bias, exact GELU. Positional embeddings are interpolated to the
input's patch grid the way DINO's ``interpolate_pos_encoding`` does (bicubic with scale factor
(grid + 0.1) / sqrt(N), class token kept). DINOv2's ViT is :mod:`omh_ref.extract.vit_dinov2`
(LayerScale, registers, its own interpolation rule, antialias included), DINOv3's
:mod:`omh_ref.extract.vit_dinov3` (RoPE, storage tokens, LayerScale, a masked key bias). Each is
exported at one fixed resolution with a dynamic batch axis: its position table for that grid
(interpolated embeddings, RoPE sines and cosines) is computed once in torch and baked in
(:class:`omh_ref.extract.vit_layers.FixedGrid`).

Weights come from a local Meta ``.pth`` or a Hugging Face ``.safetensors`` file or model folder
(``--checkpoint``; either key layout, :mod:`omh_ref.extract.checkpoints`), from DINO's official
download (``--download``, DINO v1 only, only when asked, on a machine with internet: fetched once
into ``--cache-dir`` through a temporary file and a rename, then loaded like ``--checkpoint``), or a
seeded random init (``--random-init``: tests, machines without weights). Nothing downloads at
import or test time. Each export is checked against the torch forward with onnxruntime before its
entry is written to ``manifest.json``. The ONNX file carries its own provenance in its metadata
(family, architecture, patch, registers, the weights' sha256, random or not; extraction copies it
into ``feats.json``); random weights are named so (``dino_vits8_random0_224.onnx``) and their
manifest entry goes beside the file (``<name>.manifest.json``), not into a tracked manifest.

    omh-ref export --arch vit_small --patch 8 \
        --checkpoint dino_deitsmall8_pretrain.pth --resolution 224 --resolution 320 --out weights
    omh-ref export --arch dinov2 --patch 14 --registers 4 \
        --checkpoint dinov2_vits14_reg4_pretrain.pth --resolution 224 --resolution 322
    omh-ref export --arch dinov3 --checkpoint dinov3-vits16-pretrain-lvd1689m/ --resolution 224
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.files import atomic_path, file_sha256, write_text
from . import archs, checkpoints
from .checkpoints import CheckpointError
from .vit_dinov2 import DinoV2
from .vit_dinov3 import DinoV3
from .backbone import ATTENTION_OUTPUT, ATTENTION_WHAT
from .vit_layers import AttentionLogits, FixedGrid, Mlp, grid_of

ARCHS = {  # name: (embed dim, depth, heads, short name for files)
    "vit_small": (384, 12, 6, "vits"),
    "vit_base": (768, 12, 12, "vitb"),
}
PATCHES = (8, 16)
# The backbone-only checkpoints of DINO's "Pretrained models" table (github.com/facebookresearch/dino).
OFFICIAL_URLS = {
    ("vit_small", 8): "https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth",
    ("vit_small", 16): "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth",
    ("vit_base", 8): "https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth",
    ("vit_base", 16): "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
}
IMG_SIZE = 224  # the training resolution of the official checkpoints: pos_embed holds (224/p)^2 + 1
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
CHECK_TOL = 1e-3  # onnxruntime vs torch, max abs difference allowed at export


# --------------------------------------------------------------------------------------------------
# The ViT (DINO key layout)
# --------------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.patch_size = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # (B, 3, H, W) -> (B, h*w, C)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    keep_logits = False     # set by vit_layers.AttentionLogits: the pre-softmax logits kept in .logits

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.logits = None

    def forward(self, x):
        _, n, c = x.shape
        hd = c // self.heads
        # -1 for the batch so the traced graph keeps the batch axis dynamic.
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if self.keep_logits:
            self.logits = attn
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(-1, n, c)
        return self.proj(out)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """DINO's ViT backbone; ``forward`` returns channels-last patch features (B, h, w, C)."""

    family = "dino"
    registers = 0

    def __init__(self, arch: str, patch: int):
        super().__init__()
        dim, depth, heads, _ = ARCHS[arch]
        self.arch, self.patch, self.dim = arch, patch, dim
        self.spec = archs.Spec("dino", arch, patch, 0)
        self.grid0 = IMG_SIZE // patch  # side of the patch grid pos_embed was trained on
        n = self.grid0 ** 2
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, gh: int, gw: int):
        """pos_embed for a gh x gw patch grid (DINO's rule: bicubic, scale (g + 0.1) / sqrt(N))."""
        side = self.grid0  # a Python int, so the trace keeps no data-dependent shape logic
        if gh == side and gw == side:
            return self.pos_embed
        cls_pos = self.pos_embed[:, :1]
        patch_pos = self.pos_embed[:, 1:].reshape(1, side, side, self.dim).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=((gh + 0.1) / side, (gw + 0.1) / side),
                                  mode="bicubic", align_corners=False)
        if not torch.jit.is_tracing() and tuple(patch_pos.shape[-2:]) != (gh, gw):
            raise RuntimeError(f"pos_embed interpolation gave {tuple(patch_pos.shape[-2:])}, "
                               f"expected {(gh, gw)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, gh * gw, self.dim)
        return torch.cat((cls_pos, patch_pos), dim=1)

    def positions(self, gh: int, gw: int) -> tuple:
        return (self.interpolate_pos_encoding(gh, gw),)

    def forward_with(self, images, tables):
        gh, gw = grid_of(images, self.patch)
        x = self.patch_embed(images)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1) + tables[0]
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x[:, 1:].reshape(-1, gh, gw, self.dim)

    def forward(self, images):
        return self.forward_with(images, self.positions(*grid_of(images, self.patch)))

    def after_load(self):
        """Nothing to settle after loading (DINOv3 folds its key-bias mask here)."""


def build_vit(arch: str, patch: int) -> VisionTransformer:
    """A DINO ViT (``vit_small`` | ``vit_base``, patch 8 | 16), randomly initialised, eval mode.
    Seed torch (``torch.manual_seed``) first for a reproducible random init."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    if patch not in PATCHES:
        raise ValueError(f"patch must be one of {PATCHES}, got {patch}")
    return VisionTransformer(arch, patch).eval()


def build(spec: archs.Spec) -> nn.Module:
    """The ViT ``spec`` names (:func:`omh_ref.extract.archs.complete`d), randomly initialised, eval
    mode. Seed torch first for a reproducible random init."""
    if spec.family == "dino":
        return build_vit(spec.size, spec.patch)
    return (DinoV2 if spec.family == "dinov2" else DinoV3)(spec).eval()


def model_name(model: nn.Module, resolution: int, random_seed: int | None = None) -> str:
    """e.g. ``dino_vits8_224``, ``dinov2_vitb14_reg4_322``; random weights say so,
    ``dino_vits8_random0_224``."""
    return archs.model_name(model.spec, resolution, random_seed)


def weights_sha256(model: nn.Module) -> str:
    """sha256 of the state dict (key, dtype, shape and bytes of every tensor, keys sorted): one
    set of weights has one hash whatever resolution it is exported at."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        a = t.detach().cpu().contiguous().numpy()
        h.update(f"{key}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
def load_checkpoint(model: nn.Module, path) -> dict:
    """Load a local checkpoint into ``model`` (:mod:`omh_ref.extract.checkpoints`): a Meta .pth (a
    bare state dict, or one inside "teacher" / "student" / "model", teacher preferred; "module." /
    "backbone." prefixes stripped; projection heads ignored) or a Hugging Face .safetensors file or
    folder. Raises CheckpointError naming what does not fit. Returns a summary dict."""
    state, container = checkpoints.read_file(path)
    state, ignored = checkpoints.clean(state)
    return checkpoints.load(model, state, path, container, ignored)


def download(url: str, cache_dir, say=print) -> Path:
    """Fetch ``url`` into ``cache_dir`` (kept: a second call reuses the file). Streams through a
    temporary file renamed into place, so an interrupted download never looks finished."""
    cache_dir = Path(cache_dir)
    dest = cache_dir / url.rstrip("/").rsplit("/", 1)[-1]
    if dest.is_file():
        say(f"using {dest} (downloaded before)")
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=cache_dir)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            total = int(r.headers.get("Content-Length") or 0)
            done, t0, last = 0, time.perf_counter(), 0.0
            for block in iter(lambda: r.read(1 << 20), b""):
                f.write(block)
                done += len(block)
                now = time.perf_counter()
                if now - last >= 2 or (total and done == total):
                    rate = done / max(now - t0, 1e-9)
                    eta = f", ETA {(total - done) / rate:.0f} s" if total else ""
                    say(f"  {dest.name}: {done / 2**20:.1f}{f' / {total / 2**20:.1f}' if total else ''} MiB "
                        f"({rate / 2**20:.1f} MiB/s{eta})")
                    last = now
            if total and done != total:
                raise OSError(f"{url}: got {done} of {total} bytes")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest


# --------------------------------------------------------------------------------------------------
# Export, check, manifest
# --------------------------------------------------------------------------------------------------
def export(model: nn.Module, resolution: int, out_dir, opset: int = 17, name: str | None = None,
           metadata: dict | None = None, attention: bool = False) -> Path:
    """Export ``model`` at a fixed resolution (dynamic batch) to ``out_dir/<name>.onnx`` (default
    :func:`model_name`), written atomically; ``metadata`` goes into the file's metadata_props
    (:func:`provenance`). ``attention``: a second output, ``attention`` (B, n, n), the last block's
    pre-softmax logits averaged over heads, patch tokens only
    (:class:`omh_ref.extract.vit_layers.AttentionLogits`); without it the file is what it always was."""
    if resolution % model.patch:
        raise ValueError(f"resolution {resolution} is not a multiple of patch {model.patch}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name or model_name(model, resolution)}.onnx"
    model.eval()
    g = resolution // model.patch
    fixed = FixedGrid(model, g, g).eval()
    net = AttentionLogits(fixed).eval() if attention else fixed
    outputs = ["features", ATTENTION_OUTPUT] if attention else ["features"]
    dummy = torch.zeros(1, 3, resolution, resolution, dtype=torch.float32)
    with atomic_path(path) as tmp:
        with torch.no_grad(), warnings.catch_warnings():
            # Expected: the spatial size is meant to be baked in (fixed export resolution), and the
            # TorchScript exporter (dynamo=False) is chosen on purpose (it matches torch to ~4e-6 on these machines).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
            warnings.filterwarnings("ignore", message=r"The feature will be removed.*")
            torch.onnx.export(net, (dummy,), str(tmp), opset_version=opset,
                              input_names=["images"], output_names=outputs,
                              dynamic_axes={"images": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                              do_constant_folding=True, dynamo=False)
        if metadata:
            import onnx

            proto = onnx.load(str(tmp))
            onnx.helper.set_model_props(proto, {k: str(v) for k, v in metadata.items()})
            onnx.save(proto, str(tmp))
    return path


def provenance(model: nn.Module, resolution: int, source: str, random_init: bool, attention: bool = False) -> dict:
    """What the ONNX file says of itself (``omh_ref.*`` metadata_props, read back by
    ``omh_ref.extract.backbone``): which weights, so features of two backbones cannot be mixed;
    with ``attention``, what its second output holds (``omh_ref.attention``)."""
    return {"omh_ref.family": model.family, "omh_ref.arch": model.arch, "omh_ref.patch": model.patch,
            "omh_ref.registers": model.registers, "omh_ref.dim": model.dim,
            "omh_ref.resolution": resolution, "omh_ref.weights_sha256": weights_sha256(model),
            "omh_ref.random_init": "true" if random_init else "false", "omh_ref.source": source,
            **({"omh_ref.attention": ATTENTION_WHAT} if attention else {})}


def random_batch(resolution: int, seed: int, batch: int = 2) -> np.ndarray:
    """(batch, 3, R, R) float32: uniform [0, 1) pixels, ImageNet-normalised."""
    rng = np.random.default_rng(seed)
    x = rng.random((batch, 3, resolution, resolution), dtype=np.float32)
    return ((x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)


def ort_session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def check_onnx(model: nn.Module, path, resolution: int, seed: int = 0, batch: int = 2) -> float:
    """Max abs difference between onnxruntime and the torch forward on a random normalised batch."""
    x = random_batch(resolution, seed, batch)
    got = ort_session(path).run(["features"], {"images": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    if got.shape != want.shape:
        raise RuntimeError(f"onnxruntime output shape {got.shape} != torch {want.shape}")
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


def torch_attention(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The torch rendering of the ``attention`` output: (B, n, n) float32 for a normalised batch."""
    g = grid_of(x, model.patch)
    with torch.no_grad():
        return AttentionLogits(FixedGrid(model, *g).eval())(torch.from_numpy(x))[1].numpy()


def check_attention(model: nn.Module, path, resolution: int, seed: int = 0, batch: int = 2) -> float:
    """Max abs difference between onnxruntime's ``attention`` output and torch's on a random batch."""
    x = random_batch(resolution, seed, batch)
    got = ort_session(path).run([ATTENTION_OUTPUT], {"images": x})[0]
    want = torch_attention(model, x)
    if got.shape != want.shape:
        raise RuntimeError(f"onnxruntime attention shape {got.shape} != torch {want.shape}")
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max())


sha256 = file_sha256


def update_manifest(path, entry: dict) -> None:
    """Add ``entry`` to the manifest at ``path`` (replacing one with the same name); atomic write."""
    path = Path(path)
    data = {"models": []}
    if path.exists():
        data = json.loads(path.read_text())
        data.setdefault("models", [])
    data["models"] = [m for m in data["models"] if m.get("name") != entry["name"]] + [entry]
    data["models"].sort(key=lambda m: m.get("name", ""))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    """``omh-ref export``'s flags."""
    p = argparse.ArgumentParser(prog="omh-ref export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=archs.arch_choices(), default="vit_small", metavar="ARCH",
                   help="vit_small | vit_base (DINO), a torch.hub name (dino_vits8, dinov2_vits14, "
                        "dinov2_vitb14_reg, dinov3_vits16, dinov3_vits16plus, dinov3_vitb16, ...), or a "
                        "family (dino | dinov2 | dinov3: size, patch and registers read from --checkpoint). "
                        "Default vit_small")
    p.add_argument("--patch", type=int, default=None,
                   help="patch size: DINO 8 (default) or 16, DINOv2 14, DINOv3 16")
    p.add_argument("--registers", type=int, default=None,
                   help="register tokens: DINOv2 0 (default) or 4, DINOv3 4 (its storage tokens)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path,
                     help="local weights, never downloaded: a Meta .pth, or a Hugging Face .safetensors file "
                          "or model folder")
    src.add_argument("--random-init", action="store_true",
                     help="seeded random weights (tests, machines without a checkpoint)")
    src.add_argument("--download", action="store_true",
                     help="fetch DINO's official backbone checkpoint for --arch/--patch (DINO v1; needs internet)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where --download keeps the .pth (default: --out)")
    p.add_argument("--seed", type=int, default=0, help="random-init seed, and the check's batch")
    p.add_argument("--resolution", type=int, action="append",
                   help="input size in px; repeat for several (one .onnx each). Default 224")
    p.add_argument("--out", type=Path, default=Path("weights"),
                   help="folder for the .onnx files (default: weights/ here)")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--manifest", type=Path, default=None,
                   help="manifest to update (default: manifest.json in --out; for --random-init, "
                        "<name>.manifest.json beside the file, so a tracked manifest is not rewritten)")
    p.add_argument("--tol", type=float, default=CHECK_TOL,
                   help="max abs onnxruntime-vs-torch difference allowed (default 1e-3)")
    p.add_argument("--attention", action="store_true",
                   help="add a second output, the last block's pre-softmax attention logits averaged over heads, "
                        "patch tokens only (B, n, n), for omh-ref extract --attention (HP's local weights)")
    return p


def parse_args(argv):
    args = parser().parse_args(argv)
    args.cache_dir = args.out if args.cache_dir is None else args.cache_dir
    return args


def _error(message, code):
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        spec = archs.parse_arch(args.arch, args.patch, args.registers)
    except ValueError as e:
        return _error(e, 2)
    if args.download and spec.family != "dino":
        return _error(f"--download fetches DINO (v1) only; download the {archs.family(spec.family).title} "
                      "weights yourself and pass them with --checkpoint (weights/README.md)", 2)
    resolutions = args.resolution or [IMG_SIZE]
    # the patch is known before any file is read unless the checkpoint is to say it (--arch dinov2)
    known = spec.patch if spec.patch is not None else (archs.family(spec.family).patches[0] if spec.size else None)
    if known and (bad := _bad_resolution(resolutions, known)):
        return _error(bad, 2)
    state = None
    if args.download:
        try:
            spec = archs.complete(spec)
        except ValueError as e:
            return _error(e, 2)
        url = OFFICIAL_URLS[(spec.size, spec.patch)]
        print(f"downloading {url}")
        try:
            args.checkpoint = download(url, args.cache_dir)
        except OSError as e:  # URLError, timeouts and short reads are OSErrors
            return _error(f"cannot download {url}: {e}", 1)
    if args.checkpoint is not None:
        try:
            raw, container = checkpoints.read_file(args.checkpoint)
            state, ignored = checkpoints.clean(raw)
            if spec.size is None:          # --arch dinov2: the size (and patch, registers) from the file
                spec = checkpoints.infer(spec, state, args.checkpoint)
        except CheckpointError as e:
            return _error(e, 1)
    try:
        spec = archs.complete(spec)
    except ValueError as e:
        return _error(e, 2)
    if bad := _bad_resolution(resolutions, spec.patch):
        return _error(bad, 2)
    torch.manual_seed(args.seed)
    model = build(spec)
    source, ckpt_sha = f"random-init:seed={args.seed}", None
    if state is not None:
        try:
            info = checkpoints.load(model, state, args.checkpoint, container, ignored)
        except CheckpointError as e:
            return _error(e, 1)
        where = f" from '{info['container']}'" if info["container"] else ""
        layout = " (Hugging Face layout)" if info["layout"] == "hf" else ""
        print(f"loaded {info['loaded']} tensors{where} of {args.checkpoint}{layout} into {archs.describe(spec)}"
              + (f" (ignored {len(info['ignored'])} keys: {_few(info['ignored'])})" if info["ignored"] else ""))
        source, ckpt_sha = f"checkpoint:{args.checkpoint.name}", archs.checkpoint_sha256(args.checkpoint)
    for r in resolutions:
        if not _export_one(model, r, args, source, ckpt_sha):
            return 1
    return 0


def _bad_resolution(resolutions, patch) -> str | None:
    for r in resolutions:
        if r <= 0 or r % patch:
            return f"resolution {r} is not a positive multiple of patch {patch}"
    return None


def _few(keys, n=3) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def _export_one(model, r, args, source, ckpt_sha) -> bool:
    """Export at ``r`` px, check against torch, record in the manifest; False after printing why
    the check failed (the file removed)."""
    seed = args.seed if args.checkpoint is None else None
    return export_checked(model, r, args.out, source=source, checkpoint_sha256=ckpt_sha, random_seed=seed,
                          check_seed=args.seed, opset=args.opset, tol=args.tol, manifest=args.manifest,
                          attention=args.attention) is not None


def export_checked(model, r, out_dir, *, source, checkpoint_sha256=None, random_seed=None, check_seed=0,
                   opset=17, tol=CHECK_TOL, manifest=None, say=print, err=None, attention=False):
    """``omh-ref export``'s one export: ``model`` at ``r`` px into ``out_dir`` (named by
    :func:`model_name`, ``random_seed`` for random weights), its provenance in the file, checked
    against the torch forward with onnxruntime on a random batch (``check_seed``) and recorded in
    ``manifest`` (default: ``out_dir/manifest.json``, for random weights ``<name>.manifest.json``
    beside the file). -> the manifest entry, or None after saying why the check failed (the file
    removed). ``attention``: the second output (:func:`export`), checked the same way and recorded
    in the entry's ``attention``. ``omh-ref import`` exports a peer checkpoint's backbone through here too."""
    import onnxruntime

    err = err or (lambda line: print(line, file=sys.stderr))
    out_dir = Path(out_dir)
    name = model_name(model, r, random_seed=random_seed)
    path = export(model, r, out_dir, opset=opset, name=name, attention=attention,
                  metadata=provenance(model, r, source, random_init=random_seed is not None, attention=attention))
    diff = check_onnx(model, path, r, seed=check_seed)
    ok = diff <= tol
    say(f"{path}: onnxruntime vs torch max abs diff {diff:.3g} "
        f"({'ok' if ok else 'FAIL'}, tol {tol:g})")
    if attention:
        diff_attn = check_attention(model, path, r, seed=check_seed)
        ok_attn = diff_attn <= tol
        say(f"{path}: attention output, onnxruntime vs torch max abs diff {diff_attn:.3g} "
            f"({'ok' if ok_attn else 'FAIL'}, tol {tol:g})")
        ok = ok and ok_attn
    if not ok:
        path.unlink(missing_ok=True)
        err(f"error: check failed; removed {path}")
        return None
    g = r // model.patch
    manifest = Path(manifest) if manifest else out_dir / (f"{name}.manifest.json" if random_seed is not None
                                                          else "manifest.json")
    entry = {
        "name": name, "family": model.family, "arch": model.arch, "patch": model.patch,
        "registers": model.registers, "resolution": r, "random_init": random_seed is not None,
        "grid": [g, g], "dim": model.dim, "file": path.name, "sha256": sha256(path),
        "weights_sha256": weights_sha256(model),
        "check": {"max_abs_diff": diff, "tol": tol, "pass": ok, "batch": 2, "seed": check_seed},
        "source": source, **({"checkpoint_sha256": checkpoint_sha256} if checkpoint_sha256 else {}),
        "opset": opset, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
    }
    if attention:
        entry["attention"] = {"output": ATTENTION_OUTPUT, "shape": ["batch", g * g, g * g], "what": ATTENTION_WHAT,
                              "check": {"max_abs_diff": diff_attn, "tol": tol, "pass": True, "batch": 2,
                                        "seed": check_seed}}
    update_manifest(manifest, entry)
    say(f"recorded {name} in {manifest}")
    return entry


if __name__ == "__main__":
    sys.exit(main())
