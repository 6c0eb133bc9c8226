"""What the tests build, in one place: feature files and known worlds with labels (the package's
own synthetic data, omh_ref.features.synthetic, is the demo's; these are the small, exact ones).
Test modules import these instead of each other's helpers."""
import contextlib
from pathlib import Path

import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image

from omh_ref.core.config import Config
from omh_ref.extract.backbone import IMAGENET_MEAN, IMAGENET_STD
from omh_ref.features.store import FeatureStore
from omh_ref.train import checkpoint


def write_feats(path, N=24, h=6, w=5, C=7, dtype=np.float16, seed=0) -> str:
    """A feature file (N, h, w, C) of standard normal values, written through a memmap (as
    extraction writes it), in its folder (made if missing). -> its path as a string."""

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    f = open_memmap(path, mode="w+", dtype=dtype, shape=(N, h, w, C))
    f[:] = np.random.default_rng(seed).standard_normal(f.shape)
    f.flush()
    del f
    return str(path)


def known_world(tmp_path, N=6, h=4, C=5, K=3, patch=2, seed=0):
    """Features that are exactly one of K orthogonal prototypes per patch, labels at patch x2
    (one ignored pixel). -> (FeatureStore with its labels, the prototypes (K, C))."""
    rng = np.random.default_rng(seed)
    protos = np.eye(C)[:K] * 3.0
    lab_grid = rng.integers(0, K, size=(N, h, h))
    feats = open_memmap(tmp_path / "feats.npy", mode="w+", dtype=np.float32, shape=(N, h, h, C))
    feats[:] = protos[lab_grid]
    feats.flush()
    labels = np.repeat(np.repeat(lab_grid, patch, axis=1), patch, axis=2).astype(np.uint8)
    labels[0, 0, 0] = 255                          # an ignored pixel
    np.save(tmp_path / "labels.npy", labels)
    del feats
    return FeatureStore(tmp_path / "feats.npy", labels=tmp_path / "labels.npy"), protos


def identity_params(cfg, protos, perm):
    """A model whose code is the features (identity head) and whose eval level's centroids are the
    prototypes in the order ``perm`` (cluster c = prototype perm[c]); the other levels zero."""
    C, D = cfg.in_dim, cfg.dim
    p = {"W1": np.eye(D, C, dtype=np.float32), "b1": np.zeros(D, np.float32),
         "W2": np.zeros((C, C), np.float32), "b2": np.zeros(C, np.float32),
         "W3": np.zeros((D, C), np.float32), "b3": np.zeros(D, np.float32)}
    for i, k in enumerate(cfg.levels):
        p[f"M{i}"] = np.zeros((k, D), np.float32)
    p[f"M{len(cfg.levels) - 1}"] = protos[perm].astype(np.float32)   # clusters = permuted classes
    return p


# ---- segment: images of colour regions, a backbone that pools them, a checkpoint that knows them --
PATCH = 4
# region colours whose ImageNet-normalised vectors point in four clearly different directions
COLOURS = np.array([(230, 30, 30), (240, 220, 40), (30, 200, 40), (40, 60, 230)], np.uint8)


def pooled_onnx(path, size=None, patch=PATCH):
    """(B, 3, H, W) -> each patch's mean input (B, H/p, W/p, 3): AveragePool + Transpose. ``size``
    None: any input size (a dynamic model); else a fixed square input."""
    import onnx
    from onnx import TensorProto, helper

    dims = ["B", 3, "H", "W"] if size is None else ["B", 3, size, size]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[patch, patch], strides=[patch, patch]),
             helper.make_node("Transpose", ["p"], ["y"], perm=[0, 2, 3, 1])]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "pooled_colour", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def patch_conv_onnx(path, dim=384, patch=8, seed=0):
    """A stand-in ViT backbone without torch: (B, 3, H, W) -> one seeded random linear map of each
    patch (a Conv of kernel and stride ``patch``), (B, H/p, W/p, dim); any input size. ``dim`` 384
    and ``patch`` 8 take the place of DINO ViT-S/8 in a recipe."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((dim, 3, patch, patch)).astype(np.float32) / patch
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[patch, patch], strides=[patch, patch]),
             helper.make_node("Transpose", ["c"], ["y"], perm=[0, 2, 3, 1])]
    graph = helper.make_graph(nodes, "patch_conv", [x], [y], initializer=[numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def save_ckpt(path, params, cfg):
    checkpoint.save(path, params, {"m": {}, "v": {}, "t": 0}, 0, np.random.default_rng(0), cfg)
    return str(path)


def colour_ckpt(path):
    """Identity head (D = C = 3); level 0: the four region colours (the eval level), level 1: two
    parents, {red, yellow} and {green, blue}."""
    v = ((COLOURS / 255.0) - IMAGENET_MEAN) / IMAGENET_STD
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    f32 = np.float32
    params = {"W1": np.eye(3, dtype=f32), "b1": np.zeros(3, f32), "W2": np.zeros((3, 3), f32),
              "b2": np.zeros(3, f32), "W3": np.zeros((3, 3), f32), "b3": np.zeros(3, f32),
              "M0": v.astype(f32), "M1": np.stack([u[0] + u[1], u[2] + u[3]]).astype(f32)}
    return save_ckpt(path, params, Config(in_dim=3, dim=3, levels=(4, 2), eval_level=0))


def colour_world(H, W):
    """(rgb, truth): four colour regions, laid out asymmetrically (a transposed, mirrored or shifted
    mask cannot match)."""
    truth = np.zeros((H, W), np.int64)
    truth[:, int(W * 0.32):] = 1
    truth[int(H * 0.35):, int(W * 0.64):] = 2
    truth[int(H * 0.66):, int(W * 0.06):int(W * 0.5)] = 3
    return COLOURS[truth], truth


SIZES = [(90, 157), (171, 83), (61, 200)]   # (H, W): wide, tall, very wide


def write_worlds(folder, sizes=SIZES):
    """The colour worlds of ``sizes`` as PNGs w0.png, w1.png ... in ``folder``; -> {name: truth}."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    truths = {}
    for i, (H, W) in enumerate(sizes):
        rgb, truth = colour_world(H, W)
        Image.fromarray(rgb).save(folder / f"w{i}.png")
        truths[f"w{i}"] = truth
    return truths


# --------------------------------------------------------------------------------------------------
# DINOv2 / DINOv3 backbones for omh-ref export (torch, imported where used)
# --------------------------------------------------------------------------------------------------
# Small sizes laid into omh-ref export's families while a test runs (tiny_backbones): 2 blocks,
# 32 channels, 2 heads of 16 (RoPE needs head channels divisible by 4), so an export takes a second.
TINY = {"dino": {}, "dinov2": {"vit_tiny": dict(dim=32, depth=2, heads=2, short="vitt"),
                               "vit_tiny_swiglu": dict(dim=32, depth=2, heads=2, short="vitw", ffn="swiglu")},
        "dinov3": {"vit_tiny": dict(dim=32, depth=2, heads=2, short="vitt"),
                   "vit_tiny_plus": dict(dim=32, depth=2, heads=2, short="vitt", ffn="swiglu", ffn_ratio=6.0,
                                         plus=True)}}


@contextlib.contextmanager
def tiny_backbones():
    """While the block runs, ``vit_tiny`` (MLP) and a SwiGLU tiny size are sizes of DINOv2
    (``dinov2_vitt14``, ``dinov2_vitw14``) and DINOv3 (``dinov3_vitt16``, ``dinov3_vitt16plus``)."""
    from omh_ref.extract import archs

    added = []
    try:
        for fam, sizes in TINY.items():
            for name, kw in sizes.items():
                archs.FAMILIES[fam].sizes[name] = archs.Size(**kw)
                added.append((fam, name))
        yield
    finally:
        for fam, name in added:
            archs.FAMILIES[fam].sizes.pop(name, None)


def random_vit(family, size, patch, registers, seed=0):
    """A seeded random ViT of omh-ref export (eval mode) whose every path counts: each parameter
    moved by N(0, 0.1^2) and every LayerScale drawn in [0.5, 1.5] (DINOv3's init, 1e-5, would
    leave the blocks all but silent)."""
    import torch

    from omh_ref.extract import archs, export_dino

    torch.manual_seed(seed)
    model = export_dino.build(archs.complete(archs.Spec(family, size, patch, registers)))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def save_meta_checkpoint(model, path, teacher=False, extra=None):
    """``model``'s state dict as Meta releases it (a bare .pth), or as a training checkpoint holds
    the teacher (``teacher``: under "teacher" with "backbone." prefixes and a DINO head beside it)."""
    import torch

    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd.update(extra or {})
    if teacher:
        sd = {f"backbone.{k}": v for k, v in sd.items()}
        sd["dino_head.mlp.0.weight"] = torch.zeros(4, 4)
        torch.save({"teacher": sd, "iteration": 10}, path)
    else:
        torch.save(sd, path)
    return Path(path)


# Meta key -> Hugging Face key, written from transformers' model files (modeling_dinov2.py,
# modeling_dinov2_with_registers.py, modeling_dinov3_vit.py: Dinov2Embeddings, Dinov2Layer,
# DINOv3ViTEmbeddings, DINOv3ViTLayer, ...), independently of omh_ref.extract's rules, which map the
# other way. The qkv matrices are cut in three below.
_HF_NAMES = {
    "dinov2": [(r"^cls_token$", "embeddings.cls_token"), (r"^mask_token$", "embeddings.mask_token"),
               (r"^pos_embed$", "embeddings.position_embeddings"),
               (r"^register_tokens$", "embeddings.register_tokens"),
               (r"^patch_embed\.proj\.", "embeddings.patch_embeddings.projection."),
               (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layer.\1.attention.output.dense."),
               (r"^blocks\.(\d+)\.ls(\d)\.gamma$", r"encoder.layer.\1.layer_scale\2.lambda1"),
               (r"^blocks\.(\d+)\.mlp\.w12\.", r"encoder.layer.\1.mlp.weights_in."),
               (r"^blocks\.(\d+)\.mlp\.w3\.", r"encoder.layer.\1.mlp.weights_out."),
               (r"^blocks\.(\d+)\.", r"encoder.layer.\1."), (r"^norm\.", "layernorm.")],
    "dinov3": [(r"^cls_token$", "embeddings.cls_token"), (r"^mask_token$", "embeddings.mask_token"),
               (r"^storage_tokens$", "embeddings.register_tokens"),
               (r"^patch_embed\.proj\.", "embeddings.patch_embeddings."),
               (r"^blocks\.(\d+)\.attn\.proj\.", r"layer.\1.attention.o_proj."),
               (r"^blocks\.(\d+)\.ls(\d)\.gamma$", r"layer.\1.layer_scale\2.lambda1"),
               (r"^blocks\.(\d+)\.mlp\.fc1\.", r"layer.\1.mlp.up_proj."),
               (r"^blocks\.(\d+)\.mlp\.fc2\.", r"layer.\1.mlp.down_proj."),
               (r"^blocks\.(\d+)\.mlp\.w1\.", r"layer.\1.mlp.gate_proj."),
               (r"^blocks\.(\d+)\.mlp\.w2\.", r"layer.\1.mlp.up_proj."),
               (r"^blocks\.(\d+)\.mlp\.w3\.", r"layer.\1.mlp.down_proj."),
               (r"^blocks\.(\d+)\.", r"layer.\1."), (r"^norm\.", "norm.")],
}


def hf_layout(family, meta: dict) -> dict:
    """A Meta-layout DINOv2 / DINOv3 state dict in the Hugging Face layout: DINOv2's qkv cut into
    ``attention.attention.{query,key,value}``, DINOv3's into ``attention.{q,k,v}_proj`` without the
    key bias (masked to 0 in Meta's model), its ``bias_mask`` and RoPE ``periods`` dropped, its
    mask token (1, 1, C)."""
    import re

    out = {}
    for key, t in meta.items():
        if key.endswith(".bias_mask") or key == "rope_embed.periods":
            continue
        m = re.match(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", key)
        if m:
            i, kind = m.groups()
            parts = dict(zip("qkv", t.chunk(3, dim=0)))
            for n, part in parts.items():
                if family == "dinov2":
                    out[f"encoder.layer.{i}.attention.attention.{dict(q='query', k='key', v='value')[n]}.{kind}"] = part
                elif not (n == "k" and kind == "bias"):
                    out[f"layer.{i}.attention.{n}_proj.{kind}"] = part
            continue
        new = key
        for pattern, repl in _HF_NAMES[family]:
            new, hit = re.subn(pattern, repl, new)
            if hit:
                break
        out[new] = t.reshape(1, 1, -1) if (family == "dinov3" and key == "mask_token") else t
    return {k: v.contiguous().clone() for k, v in out.items()}


def save_hf(family, model, path, folder=False):
    """``model`` in the Hugging Face layout as ``path`` (a .safetensors file), or, with
    ``folder``, as a ``save_pretrained`` folder (``path/model.safetensors`` and a config.json)."""
    import json

    from safetensors.torch import save_file

    state = hf_layout(family, model.state_dict())
    path = Path(path)
    if folder:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"model_type": "dinov2" if family == "dinov2" else "dinov3_vit",
                                                      "hidden_size": model.dim}))
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_file(state, str(path), metadata={"format": "pt"})
    return path
