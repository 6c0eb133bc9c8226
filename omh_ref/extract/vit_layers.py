"""The pieces DINOv2's and DINOv3's ViTs share, written for ``omh-ref export`` (torch; imported only
to export). Their state-dict keys are those of Meta's checkpoints (``norm1``, ``attn.qkv``,
``attn.proj``, ``ls1.gamma``, ``norm2``, ``mlp.fc1`` / ``mlp.w12`` / ``mlp.w1``..., ``ls2.gamma``).

Read from (line numbers of the files at the commits named; nothing copied):

* the block, eval path: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x))) -- facebookresearch/dinov2
  @ b8931f7 ``dinov2/layers/block.py`` 89-114; facebookresearch/dinov3 @ 6876159
  ``dinov3/layers/block.py`` 120-124;
* attention: one qkv projection with bias, heads of C / heads channels, softmax(q k^T / sqrt(d)) v,
  an output projection -- dinov2 ``dinov2/layers/attention.py`` 36-79 (SDPA's default scale, line
  74), dinov3 ``dinov3/layers/attention.py`` 106-118;
* DINOv3's masked key bias: the qkv bias times a stored ``bias_mask`` buffer whose key third is 0
  -- dinov3 ``dinov3/layers/attention.py`` 30-40 and ``dinov3/models/vision_transformer.py``
  45-48 (the mask's init);
* DINOv3's RoPE, applied to the patch tokens' q and k only (the class and storage tokens come
  first and are left as they are): x cos + rot(x) sin, rot(x) = (-x2, x1) for the halves x1, x2 of
  the head channels -- dinov3 ``dinov3/layers/attention.py`` 16-27, 66-85;
* LayerScale: a per-channel ``gamma`` -- dinov2 ``dinov2/layers/layer_scale.py`` 15-34;
* FFNs: MLP fc1, exact GELU, fc2 (dinov2 ``dinov2/layers/mlp.py`` 16-40); DINOv2's fused SwiGLU,
  hidden (int(4C * 2/3) + 7) // 8 * 8, one ``w12`` projection split in two halves a, b, then
  w3(silu(a) * b) (dinov2 ``dinov2/layers/swiglu_ffn.py`` 14-34, 54-72); DINOv3's SwiGLU, hidden
  d = int(rC * 2/3) rounded up to a multiple of 8, separate ``w1``, ``w2``, then w3(silu(w1 x) *
  w2 x) (dinov3 ``dinov3/layers/ffn_layers.py`` 52-77).

The attention is written out (matmul, softmax, matmul) rather than through
``scaled_dot_product_attention``, as export_dino's DINO ViT is: the same arithmetic, and the
TorchScript ONNX exporter traces it plainly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """A Conv2d of kernel and stride ``patch``: (B, 3, H, W) -> (B, H/p * W/p, C)."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def grid_of(images, patch: int) -> tuple:
    """(h, w) patch grid of an image batch; its size is static (the export fixes it)."""
    h, w = int(images.shape[-2]), int(images.shape[-1])
    if h % patch or w % patch:
        raise ValueError(f"input {h}x{w} is not a multiple of patch {patch}")
    return h // patch, w // patch


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) over the last axis's two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class MaskedBiasLinear(nn.Linear):
    """The qkv projection of DINOv3: its bias times ``bias_mask`` (a stored buffer, key
    ``<...>.qkv.bias_mask``), which is 0 over the key third."""

    def __init__(self, dim: int):
        super().__init__(dim, 3 * dim, bias=True)
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0
        self.register_buffer("bias_mask", mask, persistent=True)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias * self.bias_mask)


class Attention(nn.Module):
    keep_logits = False     # set by AttentionLogits: the pre-softmax logits are kept in .logits

    def __init__(self, dim: int, heads: int, masked_key_bias: bool = False):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = MaskedBiasLinear(dim) if masked_key_bias else nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.logits = None

    def forward(self, x, rope=None):
        """``rope``: None or (sin, cos), each (n_patches, head channels), for the last n_patches tokens."""
        _, n, c = x.shape
        hd = c // self.heads
        # -1 for the batch: the traced graph keeps its batch axis dynamic
        qkv = self.qkv(x).reshape(-1, n, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if rope is not None:
            q, k = _rotate(q, rope), _rotate(k, rope)
        logits = (q @ k.transpose(-2, -1)) * self.scale
        if self.keep_logits:
            self.logits = logits
        attn = logits.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(-1, n, c))


def _rotate(t, rope):
    """RoPE on the patch tokens of t (B, heads, N, d); the first N - n_patches tokens pass as they are."""
    sin, cos = rope
    first = t.shape[-2] - sin.shape[-2]
    head, tail = t[:, :, :first], t[:, :, first:]
    return torch.cat((head, tail * cos + rotate_half(tail) * sin), dim=-2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFused(nn.Module):
    """DINOv2's SwiGLU: ``w12`` (2h x C) split into halves a, b; w3(silu(a) * b)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        h = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(dim, 2 * h)
        self.w3 = nn.Linear(h, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class SwiGLU(nn.Module):
    """DINOv3's SwiGLU: w3(silu(w1 x) * w2 x), hidden int(h * 2/3) rounded up to a multiple of 8."""

    def __init__(self, dim: int, hidden: int, align: int = 8):
        super().__init__()
        d = int(hidden * 2 / 3)
        h = d + (-d % align)
        self.w1 = nn.Linear(dim, h)
        self.w2 = nn.Linear(dim, h)
        self.w3 = nn.Linear(h, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with LayerScale on both branches."""

    def __init__(self, dim: int, heads: int, ffn: nn.Module, layerscale: float, eps: float,
                 masked_key_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, masked_key_bias)
        self.ls1 = LayerScale(dim, layerscale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ffn
        self.ls2 = LayerScale(dim, layerscale)

    def forward(self, x, rope=None):
        x = x + self.ls1(self.attn(self.norm1(x), rope))
        return x + self.ls2(self.mlp(self.norm2(x)))


def ffn(kind: str, dim: int, ratio: float, family: str) -> nn.Module:
    hidden = int(dim * ratio)
    if kind == "mlp":
        return Mlp(dim, hidden)
    return SwiGLUFused(dim, hidden) if family == "dinov2" else SwiGLU(dim, hidden)


def take_one(key):
    """A Hugging Face key rule (``hf_rules`` of vit_dinov2 and vit_dinov3): the tensor under ``key``."""
    return lambda take: take(key)


def hf_block_rules(rules: dict, me: str, hf: str, proj: str, ffn_names: dict) -> None:
    """Adds to ``rules`` the rules every DINOv2 and DINOv3 block shares: Meta's block ``me``
    (``blocks.<i>.``) from the Hugging Face block ``hf``: its two norms, the attention's output
    projection (``proj``, the Hugging Face prefix before ``.weight``/``.bias``), the FFN's linears
    (``ffn_names``: ours -> theirs) and the two layer scales. The qkv rules are each family's own."""
    for p in ("weight", "bias"):
        for n in ("norm1", "norm2"):
            rules[f"{me}{n}.{p}"] = take_one(f"{hf}{n}.{p}")
        rules[f"{me}attn.proj.{p}"] = take_one(f"{proj}.{p}")
        for ours, theirs in ffn_names.items():
            rules[f"{me}mlp.{ours}.{p}"] = take_one(f"{hf}mlp.{theirs}.{p}")
    for j in (1, 2):
        rules[f"{me}ls{j}.gamma"] = take_one(f"{hf}layer_scale{j}.lambda1")


def init_linears(module: nn.Module) -> None:
    """Every Linear: truncated normal std 0.02, bias 0 (dinov2 ``vision_transformer.py`` 333-338,
    dinov3 ``vision_transformer.py`` 40-44)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)


class FixedGrid(nn.Module):
    """``model`` at one input size, for the ONNX export: its position tables (DINOv2's interpolated
    positional embeddings, DINOv3's RoPE sines and cosines) computed once in torch for that grid
    and held as buffers, so the exported graph carries them as constants (an antialiased bicubic
    resize, for one, has no ONNX operator) and computes exactly what ``model`` does."""

    def __init__(self, model: nn.Module, gh: int, gw: int):
        super().__init__()
        self.model, self.gh, self.gw = model, gh, gw
        with torch.no_grad():
            tables = model.positions(gh, gw)
        for i, t in enumerate(tables):
            self.register_buffer(f"table{i}", t.detach().clone(), persistent=False)
        self.n = len(tables)

    def forward(self, images):
        return self.model.forward_with(images, tuple(getattr(self, f"table{i}") for i in range(self.n)))


class AttentionLogits(nn.Module):
    """``fixed`` (a :class:`FixedGrid`) with a second output, for ``omh-ref export --attention``:
    the last block's pre-softmax attention logits q kᵀ / sqrt(d) per head (DINOv3's after its
    RoPE, the ones its softmax sees), averaged over the heads, the patch rows and columns only
    (the class token and any register or storage tokens, which come first, dropped): (B, n, n),
    n = h * w patches in row-major order. HP takes the same array (hynnsk/HP @ 8913644
    ``model/dino/vision_transformer.py`` 86-88 and 94: a copy of the logits before the softmax;
    ``model/dino/DinoFeaturizer.py`` 162-163: class row and column dropped, mean over heads).
    The features output is the model's, unchanged."""

    def __init__(self, fixed: nn.Module):
        super().__init__()
        self.fixed = fixed

    def forward(self, images):
        model = self.fixed.model
        attn = model.blocks[-1].attn
        attn.keep_logits = True
        try:
            feats = self.fixed(images)
            logits = attn.logits
        finally:
            attn.keep_logits, attn.logits = False, None
        first = 1 + int(model.registers)
        return feats, logits[:, :, first:, first:].mean(dim=1)
