"""DINOv2's ViT for ``omh-ref export`` (torch; imported only to export), in Meta's key layout, and the
mapping from the Hugging Face ``transformers`` layout to it.

Written from github.com/facebookresearch/dinov2 @ b8931f7 (line numbers of those files; nothing
copied), layers in :mod:`.vit_layers`:

* ``dinov2/models/vision_transformer.py``: LayerNorm eps 1e-6 (line 96); qkv, projection and FFN
  biases on (55-57); ``cls_token`` (1, 1, C), ``pos_embed`` (1, 1 + N, C) for the N patches of
  ``img_size`` (107-111), ``register_tokens`` (1, R, C) when R > 0 (113-115), ``mask_token`` (1, C)
  (169; kept for the key layout, unused here); the tokens: patch embedding, class token in front,
  positional embedding added, then the registers inserted after the class token (214-233); the
  output: the final norm of every token, class and registers dropped (264-268);
  ``interpolate_pos_encoding`` (180-212): the learned grid M x M is used as it is when the input's
  grid is M x M, else resized bicubically, align_corners False, with ``scale_factor`` ((h + offset)
  / M, (w + offset) / M) when the offset is non-zero (198-200, the DINO work-around) or to ``size``
  (h, w) when it is 0 (203), antialiased when asked (207); the class position is kept.
* ``dinov2/hub/backbones.py``: ``img_size`` 518 (so M = 37 at patch 14), LayerScale init 1.0,
  interpolation offset 0.1 without antialias (lines 18-28); the register models: 4 registers,
  antialias on, offset 0 (98-110, 113-125). Here: registers > 0 takes the register models' rule.
* init (``--random-init``): ``pos_embed`` truncated normal std 0.02, ``cls_token`` and registers
  normal std 1e-6, every Linear truncated normal 0.02 with zero bias (173-178, 333-338).
* input: ImageNet's mean and std, as DINO's (``dinov2/data/transforms.py`` lines 42-43), which
  extraction applies (``omh_ref/extract/backbone.py`` ``normalize``).

The Hugging Face layout (``Dinov2Model`` / ``Dinov2WithRegistersModel`` as saved by
``save_pretrained``): huggingface/transformers ``src/transformers/models/dinov2/convert_dinov2_to_hf.py``
@ 06fefc4 ``create_rename_keys`` and ``read_in_q_k_v`` (the qkv matrix cut into query, key and
value), and ``modeling_dinov2.py`` / ``modeling_dinov2_with_registers.py`` @ 015e687 (the SwiGLU's
``weights_in`` / ``weights_out``, ``register_tokens`` under ``embeddings``).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from . import archs
from .vit_layers import Block, PatchEmbed, ffn, grid_of, hf_block_rules, init_linears

IMG_SIZE = 518          # dinov2/hub/backbones.py line 21: pos_embed holds (518 / 14)^2 = 37^2 positions
LAYERSCALE = 1.0        # dinov2/hub/backbones.py line 23 (init_values)
EPS = 1e-6              # dinov2/models/vision_transformer.py line 96


class DinoV2(nn.Module):
    """DINOv2's ViT; ``forward`` returns channels-last patch features (B, h, w, C)."""

    family = "dinov2"

    def __init__(self, spec: archs.Spec):
        super().__init__()
        s = archs.size_of(spec)
        self.spec, self.arch, self.patch, self.dim, self.registers = spec, spec.size, spec.patch, s.dim, spec.registers
        self.grid0 = IMG_SIZE // spec.patch
        self.antialias, self.offset = (True, 0.0) if spec.registers else (False, 0.1)
        self.patch_embed = PatchEmbed(spec.patch, s.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, s.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid0 ** 2 + 1, s.dim))
        if spec.registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, spec.registers, s.dim))
        self.blocks = nn.ModuleList([Block(s.dim, s.heads, ffn(s.ffn, s.dim, s.ffn_ratio, self.family), LAYERSCALE, EPS)
                                     for _ in range(s.depth)])
        self.norm = nn.LayerNorm(s.dim, eps=EPS)
        self.mask_token = nn.Parameter(torch.zeros(1, s.dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if spec.registers:
            nn.init.normal_(self.register_tokens, std=1e-6)
        init_linears(self)

    def interpolate_pos_encoding(self, gh: int, gw: int):
        """pos_embed (1, 1 + gh * gw, C) for a gh x gw grid (DINOv2's rule, above)."""
        m = self.grid0
        if gh == m and gw == m:
            return self.pos_embed
        grid = self.pos_embed[:, 1:].reshape(1, m, m, self.dim).permute(0, 3, 1, 2)
        how = ({"scale_factor": ((gh + self.offset) / m, (gw + self.offset) / m)} if self.offset
               else {"size": (gh, gw)})
        grid = F.interpolate(grid, mode="bicubic", antialias=self.antialias, align_corners=False, **how)
        if tuple(grid.shape[-2:]) != (gh, gw):
            raise RuntimeError(f"pos_embed interpolation gave {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
        return torch.cat((self.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, self.dim)), dim=1)

    def positions(self, gh: int, gw: int) -> tuple:
        return (self.interpolate_pos_encoding(gh, gw),)

    def forward_with(self, images, tables):
        gh, gw = grid_of(images, self.patch)
        x = self.patch_embed(images)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + tables[0]
        if self.registers:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1 + self.registers:].reshape(-1, gh, gw, self.dim)

    def forward(self, images):
        return self.forward_with(images, self.positions(*grid_of(images, self.patch)))

    def after_load(self):
        """Nothing to settle after loading (DINOv3 folds its key-bias mask here)."""


# --------------------------------------------------------------------------------------------------
# Key layouts
# --------------------------------------------------------------------------------------------------
# Where each layout keeps what :func:`checkpoints.read_shape` needs to name the model in a file.
LAYOUT = {
    "meta": {"cls": "cls_token", "block": r"^blocks\.(\d+)\.", "swiglu": ".mlp.w12.",
             "patch": "patch_embed.proj.weight", "registers": "register_tokens"},
    "hf": {"cls": "embeddings.cls_token", "block": r"^encoder\.layer\.(\d+)\.", "swiglu": ".mlp.weights_in.",
           "patch": "embeddings.patch_embeddings.projection.weight", "registers": "embeddings.register_tokens"},
}
HF_MARK = "embeddings.cls_token"     # a state dict holding this key is in the Hugging Face layout


def hf_rules(model: DinoV2) -> dict:
    """{Meta key: make(take)}: how each tensor of ``model``'s state dict is made from a Hugging Face
    state dict (``take(key)`` returns the tensor under that key and marks it used)."""
    e = "embeddings."
    rules = {"cls_token": lambda t: t(e + "cls_token"), "mask_token": lambda t: t(e + "mask_token"),
             "pos_embed": lambda t: t(e + "position_embeddings"),
             "patch_embed.proj.weight": lambda t: t(e + "patch_embeddings.projection.weight"),
             "patch_embed.proj.bias": lambda t: t(e + "patch_embeddings.projection.bias"),
             "norm.weight": lambda t: t("layernorm.weight"), "norm.bias": lambda t: t("layernorm.bias")}
    if model.registers:
        rules["register_tokens"] = lambda t: t(e + "register_tokens")
    ffn_names = ({"w12": "weights_in", "w3": "weights_out"} if archs.size_of(model.spec).ffn == "swiglu"
                 else {"fc1": "fc1", "fc2": "fc2"})
    for i in range(len(model.blocks)):
        hf, me = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            rules[f"{me}attn.qkv.{p}"] = _cat([f"{hf}attention.attention.{n}.{p}" for n in ("query", "key", "value")])
        hf_block_rules(rules, me, hf, f"{hf}attention.output.dense", ffn_names)
    return rules


def _cat(keys):
    return lambda take: torch.cat([take(k) for k in keys], dim=0)


def meta_keys_normalised(state: dict) -> dict:
    """DINOv2's training checkpoints may chunk the blocks (``blocks.<chunk>.<i>.``, FSDP; the
    model's ``block_chunks``, vision_transformer.py 154-161): the same keys without the chunk."""
    chunked = re.compile(r"^blocks\.\d+\.(\d+\.)")
    if not any(chunked.match(k) for k in state):
        return state
    return {chunked.sub(r"blocks.\1", k): v for k, v in state.items()}
