"""DINOv3's ViT for ``omh-ref export`` (torch; imported only to export), in Meta's key layout, and the
mapping from the Hugging Face ``transformers`` layout to it.

Written from github.com/facebookresearch/dinov3 @ 6876159 (line numbers of those files; nothing
copied), layers in :mod:`.vit_layers`:

* ``dinov3/models/vision_transformer.py``: the tokens are the class token, the ``storage_tokens``
  (1, R, C) and the patch embeddings, in that order, with no learned positional embedding
  (190-220); every block gets RoPE sines and cosines for the patch grid (269-283); the output is
  the final ``norm`` of the patch tokens (247-251, 296-308: with untied norms, ``cls_norm`` and
  ``local_cls_norm`` touch only the class and storage tokens, so they are not needed here and are
  ignored when a checkpoint has them); ``mask_token`` (1, C) is kept for the key layout (180).
  LayerNorm "layernormbf16" is eps 1e-5 (line 29).
* ``dinov3/layers/rope_position_encoding.py``: ``periods`` (a stored buffer, head channels / 4
  of them) = base ** (2 j / (head channels / 2)), j = 0, 1, ... (111-114); the patch centres of an
  h x w grid, (i + 0.5) / h and (j + 0.5) / w ("separate" normalisation, 71-73), mapped to
  [-1, 1] (78); the coordinate shift, jitter and rescale act in training only (80-97); angles
  2 pi coord / period per axis, the h axis's then the w axis's, tiled twice over the head channels
  (100-104).
* ``dinov3/hub/backbones.py`` lines 199-369 (ViT-S/16, S+/16, B/16, L/16): RoPE base 100,
  "separate", float32 (213-216); LayerScale init 1e-5 (223); "layernormbf16" (224); 4 storage
  tokens (228); ``mask_k_bias`` True (229): the qkv bias times ``bias_mask``, whose key third is 0
  (``dinov3/layers/attention.py`` 30-40; ``vision_transformer.py`` 45-48).
* input: ImageNet's mean and std, as DINO's (``dinov3/data/transforms.py`` lines 32-33), which
  extraction applies (``omh_ref/extract/backbone.py`` ``normalize``).
* init (``--random-init``, ``vision_transformer.py`` 182-188 and 40-56): class and storage tokens
  normal std 0.02, mask token 0, Linears truncated normal 0.02 with zero bias, the patch
  embedding uniform in +-sqrt(1 / (3 p^2)) (``dinov3/layers/patch_embed.py`` 85-89).

After loading, the key-bias mask is folded into the qkv bias (the masked entries set to 0), so a
set of weights read from Meta's file and from Hugging Face's (which stores no key bias) is one
state dict with one sha256.

The Hugging Face layout (``DINOv3ViTModel``): huggingface/transformers
``src/transformers/models/dinov3_vit/convert_dinov3_vit_to_hf.py`` @ a77460f
``ORIGINAL_TO_CONVERTED_KEY_MAPPING`` and ``split_qkv`` (q, k, v projections; the key bias, the
mask and the RoPE periods dropped; the mask token reshaped to (1, 1, C)), and
``modeling_dinov3_vit.py`` @ 015e687 (``inv_freq`` = 1 / ``periods`` is not stored; gated MLP
``gate_proj`` / ``up_proj`` / ``down_proj``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import archs
from .vit_layers import Block, PatchEmbed, ffn, grid_of, hf_block_rules, init_linears

ROPE_BASE = 100.0      # dinov3/hub/backbones.py line 213 (pos_embed_rope_base)
LAYERSCALE = 1e-5      # dinov3/hub/backbones.py line 223 (layerscale_init)
EPS = 1e-5             # dinov3/models/vision_transformer.py line 29 ("layernormbf16"), backbones.py 224


def rope_periods(head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """(head_dim // 4,) float32: base ** (2 j / (head_dim // 2))."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


class RopeTable(nn.Module):
    """Holds ``periods`` (the checkpoint's buffer, key ``rope_embed.periods``) and makes the sines
    and cosines of an h x w grid."""

    def __init__(self, head_dim: int):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"RoPE needs head channels divisible by 4, got {head_dim}")
        self.register_buffer("periods", rope_periods(head_dim), persistent=True)

    def forward(self, gh: int, gw: int):
        ch = torch.arange(0.5, gh, dtype=torch.float32) / gh
        cw = torch.arange(0.5, gw, dtype=torch.float32) / gw
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).reshape(gh * gw, 2) * 2.0 - 1.0
        angles = (2 * math.pi * coords[:, :, None] / self.periods[None, None, :]).reshape(gh * gw, -1)
        angles = angles.repeat(1, 2)
        return torch.sin(angles), torch.cos(angles)


class DinoV3(nn.Module):
    """DINOv3's ViT; ``forward`` returns channels-last patch features (B, h, w, C)."""

    family = "dinov3"

    def __init__(self, spec: archs.Spec):
        super().__init__()
        s = archs.size_of(spec)
        self.spec, self.arch, self.patch, self.dim, self.registers = spec, spec.size, spec.patch, s.dim, spec.registers
        self.patch_embed = PatchEmbed(spec.patch, s.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.dim))
        if spec.registers:
            self.storage_tokens = nn.Parameter(torch.zeros(1, spec.registers, s.dim))
        self.rope_embed = RopeTable(s.dim // s.heads)
        self.blocks = nn.ModuleList([
            Block(s.dim, s.heads, ffn(s.ffn, s.dim, s.ffn_ratio, self.family), LAYERSCALE, EPS, masked_key_bias=True)
            for _ in range(s.depth)])
        self.norm = nn.LayerNorm(s.dim, eps=EPS)
        self.mask_token = nn.Parameter(torch.zeros(1, s.dim))
        nn.init.normal_(self.cls_token, std=0.02)
        if spec.registers:
            nn.init.normal_(self.storage_tokens, std=0.02)
        init_linears(self)
        bound = math.sqrt(1 / (3 * spec.patch ** 2))
        nn.init.uniform_(self.patch_embed.proj.weight, -bound, bound)
        nn.init.uniform_(self.patch_embed.proj.bias, -bound, bound)

    def positions(self, gh: int, gw: int) -> tuple:
        return self.rope_embed(gh, gw)

    def forward_with(self, images, tables):
        gh, gw = grid_of(images, self.patch)
        x = self.patch_embed(images)
        first = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.registers:
            first.append(self.storage_tokens.expand(x.shape[0], -1, -1))
        x = torch.cat((*first, x), dim=1)
        for blk in self.blocks:
            x = blk(x, tables)
        return self.norm(x)[:, 1 + self.registers:].reshape(-1, gh, gw, self.dim)

    def forward(self, images):
        return self.forward_with(images, self.positions(*grid_of(images, self.patch)))

    def after_load(self):
        """Fold each block's key-bias mask into its qkv bias (the forward's bias is unchanged): the
        masked entries set to +0.0 (a product with the mask could leave -0.0, another sha256)."""
        with torch.no_grad():
            for blk in self.blocks:
                qkv = blk.attn.qkv
                qkv.bias.copy_(torch.where(qkv.bias_mask != 0, qkv.bias * qkv.bias_mask, torch.zeros_like(qkv.bias)))


# --------------------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------------------
LAYOUT = {
    "meta": {"cls": "cls_token", "block": r"^blocks\.(\d+)\.", "swiglu": ".mlp.w1.",
             "patch": "patch_embed.proj.weight", "registers": "storage_tokens"},
    "hf": {"cls": "embeddings.cls_token", "block": r"^layer\.(\d+)\.", "swiglu": ".mlp.gate_proj.",
           "patch": "embeddings.patch_embeddings.weight", "registers": "embeddings.register_tokens"},
}
HF_MARK = "embeddings.cls_token"
IGNORED_META = ("cls_norm.", "local_cls_norm.")   # norms of the class and storage tokens only


def hf_rules(model: DinoV3) -> dict:
    """{Meta key: make(take)} from a Hugging Face state dict (``take(key, optional=False)``)."""
    e, dim = "embeddings.", model.dim
    rules = {"cls_token": lambda t: t(e + "cls_token"),
             "mask_token": lambda t: t(e + "mask_token").reshape(1, dim),
             "patch_embed.proj.weight": lambda t: t(e + "patch_embeddings.weight"),
             "patch_embed.proj.bias": lambda t: t(e + "patch_embeddings.bias"),
             "rope_embed.periods": lambda t: rope_periods(dim // archs.size_of(model.spec).heads),
             "norm.weight": lambda t: t("norm.weight"), "norm.bias": lambda t: t("norm.bias")}
    if model.registers:
        rules["storage_tokens"] = lambda t: t(e + "register_tokens")
    ffn_names = ({"w1": "gate_proj", "w2": "up_proj", "w3": "down_proj"} if archs.size_of(model.spec).ffn == "swiglu"
                 else {"fc1": "up_proj", "fc2": "down_proj"})
    for i in range(len(model.blocks)):
        hf, me = f"layer.{i}.", f"blocks.{i}."
        a = hf + "attention."
        rules[me + "attn.qkv.weight"] = _qkv_weight(a)
        rules[me + "attn.qkv.bias"] = _qkv_bias(a, dim)
        rules[me + "attn.qkv.bias_mask"] = _qkv_mask(a, dim)
        hf_block_rules(rules, me, hf, f"{a}o_proj", ffn_names)
    return rules


def _qkv_weight(a):
    return lambda take: torch.cat([take(f"{a}{n}_proj.weight") for n in "qkv"], dim=0)


def _qkv_bias(a, dim):
    """Hugging Face stores no key bias (DINOv3's is masked to 0); one that is there is used."""
    def make(take):
        k = take(f"{a}k_proj.bias", optional=True)
        return torch.cat([take(f"{a}q_proj.bias"), torch.zeros(dim) if k is None else k, take(f"{a}v_proj.bias")])
    return make


def _qkv_mask(a, dim):
    def make(take):
        mask = torch.ones(3 * dim)
        if take(f"{a}k_proj.bias", optional=True) is None:
            mask[dim:2 * dim] = 0
        return mask
    return make
