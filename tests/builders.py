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


def hp_inputs(folder, seed=0, attention=True, augmented=True, write_attn=True) -> str:
    """The HP base's inputs beside ``folder``'s feats.npy: attn.npy (HP's window weights of random
    attention logits, omh_ref/features/attention.py) and feats_aug.npy (the features plus noise),
    named in its feats.json (made when missing; ``attention``/``augmented`` False leave a name
    out, ``write_attn`` False the file). -> the features' path as a string."""
    import json

    from omh_ref.features import attention as att
    from omh_ref.extract import augment as aug
    from omh_ref.features import meta

    folder = Path(folder)
    f = np.load(folder / "feats.npy", mmap_mode="r")
    N, h, w, c = f.shape
    rng = np.random.default_rng(seed + 1)
    if write_attn:
        logits = rng.standard_normal((N, h * w, h * w))
        np.save(folder / "attn.npy", att.window_weights(logits, h, w).astype(np.float16))
    np.save(folder / "feats_aug.npy", (np.asarray(f, np.float32) + 0.3 * rng.standard_normal(f.shape)).astype(f.dtype))
    path = folder / "feats.json"
    rec = json.loads(path.read_text()) if path.is_file() else meta.make(
        shape=[N, h, w, c], dtype=str(f.dtype), backbone="b", resolution=h * PATCH, patch=PATCH)
    if attention:
        rec["attention"] = att.record(N, h, w)
    if augmented:
        rec["augmented"] = aug.record(N, h, w, c, str(f.dtype), 0, "normalised")
    meta.write(path, rec)
    return str(folder / "feats.npy")


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


# --------------------------------------------------------------------------------------------------
# The peers' Lightning checkpoints (omh-ref import): their key layouts, rendered in torch
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def tiny_dino():
    """While the block runs, ``vit_tiny`` (32 channels, 2 blocks, 2 heads) is a size of DINO (v1)
    too, in both tables omh-ref export reads (``archs.FAMILIES`` and ``export_dino.ARCHS``)."""
    from omh_ref.extract import archs, export_dino

    archs.FAMILIES["dino"].sizes["vit_tiny"] = archs.Size(32, 2, 2, "vitt")
    export_dino.ARCHS["vit_tiny"] = (32, 2, 2, "vitt")
    try:
        yield
    finally:
        archs.FAMILIES["dino"].sizes.pop("vit_tiny", None)
        export_dino.ARCHS.pop("vit_tiny", None)


class _Module:
    """The modules the fakes below pretend to live in, registered while a checkpoint is saved."""

    def __init__(self, name):
        self.__name__ = name


def _named(cls, module, name):
    cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
    return cls


class _Meta:
    """omegaconf.base.Metadata / ContainerMetadata: dataclasses, pickled as their __dict__
    (omry/omegaconf omegaconf/base.py: ref_type, object_type, optional, key, flags, flags_root,
    resolver_cache = defaultdict(dict); the container's key_type and element_type: a ListConfig's
    key_type is int, which protocol 2 pickles as ``__builtin__ long``)."""

    def __init__(self, key, container):
        import typing
        from collections import defaultdict

        self.ref_type, self.object_type = typing.Any, (dict if container == "dict" else list if container else None)
        self.optional, self.key, self.flags, self.flags_root = True, key, {}, False
        self.resolver_cache = defaultdict(dict)
        if container:
            self.key_type, self.element_type = (int if container == "list" else typing.Any), typing.Any


class _MetaC(_Meta):
    pass


class _Node:
    """omegaconf.nodes.AnyNode: Node.__getstate__ pickles __dict__ without _flags_cache."""

    def __init__(self, value, key, parent):
        self._metadata, self._parent, self._val, self._flags_cache = _Meta(key, None), parent, value, None

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_flags_cache"}


class _Container(_Node):
    """omegaconf.dictconfig.DictConfig / listconfig.ListConfig: BaseContainer.__getstate__ pickles
    __dict__ (_metadata, _parent, _content) without _flags_cache (omegaconf/basecontainer.py)."""

    def __init__(self, content, key=None, parent=None):
        kind = "dict" if isinstance(content, dict) else "list"
        self._metadata, self._parent, self._flags_cache = _MetaC(key, kind), parent, None
        items = content.items() if kind == "dict" else enumerate(content)
        built = {k: _omega(v, k, self) for k, v in items}
        self._content = built if kind == "dict" else list(built.values())


class _DictConfig(_Container):
    pass


class _ListConfig(_Container):
    pass


class _ModelCheckpoint:
    """pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint: Lightning 1.x keyed a
    checkpoint's "callbacks" by this class."""


_FAKES = {"omegaconf.dictconfig": {"DictConfig": _DictConfig}, "omegaconf.listconfig": {"ListConfig": _ListConfig},
          "omegaconf.base": {"Metadata": _Meta, "ContainerMetadata": _MetaC}, "omegaconf.nodes": {"AnyNode": _Node},
          "pytorch_lightning.callbacks.model_checkpoint": {"ModelCheckpoint": _ModelCheckpoint}}
for _mod, _classes in _FAKES.items():
    for _name, _cls in _classes.items():
        _named(_cls, _mod, _name)


def _omega(value, key=None, parent=None):
    if isinstance(value, dict):
        return _DictConfig(value, key, parent)
    if isinstance(value, (list, tuple)):
        return _ListConfig(list(value), key, parent)
    return _Node(value, key, parent)


@contextlib.contextmanager
def peer_modules():
    """While the block runs, ``omegaconf.*`` and ``pytorch_lightning.callbacks.model_checkpoint``
    are modules holding the fakes above, so a pickle names the globals a real checkpoint names."""
    import sys

    added = []
    try:
        for mod, classes in _FAKES.items():
            parts = mod.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name not in sys.modules:
                    sys.modules[name] = _Module(name)
                    added.append(name)
            for cname, cls in classes.items():
                setattr(sys.modules[mod], cname, cls)
        yield
    finally:
        for name in added:
            sys.modules.pop(name, None)


def dictconfig(d: dict):
    """``d`` as the object hydra hands a Lightning module (a DictConfig of nodes), pickling as
    omegaconf's does (under :func:`peer_modules`)."""
    return _DictConfig(d)


# STEGO's train_config.yml (src/configs/train_config.yml @ eb4d6b5) keys the import reads, and some it
# does not; the shifts differ from omh-ref's defaults so the config shows they were read.
STEGO_CFG = {"output_root": "../", "dataset_name": "cocostuff27", "extra_clusters": 2, "model_type": "vit_tiny",
             "arch": "dino", "dino_feat_type": "feat", "projection_type": "nonlinear", "dino_patch_size": 8,
             "continuous": True, "dim": 8, "dropout": True, "zero_clamp": True, "lr": 5e-4, "pointwise": True,
             "feature_samples": 11, "neg_samples": 5, "correspondence_weight": 1.0, "neg_inter_weight": 0.63,
             "pos_inter_weight": 0.25, "pos_intra_weight": 0.67, "neg_inter_shift": 0.46, "pos_inter_shift": 0.12,
             "pos_intra_shift": 0.18, "rec_weight": 0.0, "crf_weight": 0.0, "reset_probe_steps": None,
             "res": 224, "batch_size": 16, "max_steps": 5000, "pretrained_weights": None, "val_freq": 100}
# Neither peer's config holds a list, but a hydra config may (an override, a user's key), and then
# the DictConfig holds a ListConfig: save_lightning adds this key so every fake checkpoint pickles
# one (nested: a list in it and a dict in it; its key_type int pickles as ``__builtin__ long``).
CONFIG_LIST = {"crop_sizes": [224, [0.5, "five"], {"crop": None}]}
# SmooSeg's configs/train_config.yaml (@ 1eecdec) keys, its DINOv2 setting.
SMOOSEG_CFG = {"output_root": "outputs/", "dataset_name": "potsdam", "extra_clusters": 0, "model_type": "vit_tiny",
               "arch": "dinov2", "dino_feat_type": "feat", "projection_type": "nonlinear", "dino_patch_size": 8,
               "n_feats": 32, "dim": 8, "lr1": 1e-4, "lr2": 5e-4, "dropout": True, "temperature": 0.1,
               "alpha": 0.998, "pointwise": True, "seed": 0, "neg_inter_shift": 0.5, "pos_intra_shift": 0.32,
               "res": 224, "batch_size": 32, "max_steps": 3000}


def _lit_modules():
    """The peers' modules in torch, written from their definitions (their attribute names are the
    state-dict keys): STEGO src/train_segmentation.py lines 53-78 and src/modules.py lines 17-81,
    134-161 (@ eb4d6b5); SmooSeg train_segmentation.py lines 20-38 and modules.py lines 98-177
    (@ 1eecdec, described, not copied). Each ``predict`` renders the peer's evaluation of a feature
    grid (STEGO src/eval_segmentation.py lines 124-138, no flip, no CRF; SmooSeg
    train_segmentation.py lines 118-126): the code upsampled to the label size, then the probes."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ClusterLookup(nn.Module):            # STEGO M 134-140
        def __init__(self, dim, n):
            super().__init__()
            self.clusters = nn.Parameter(torch.randn(n, dim))

        def argmax(self, code):                 # M 147-153: normalised inner products, argmax
            inner = torch.einsum("bchw,nc->bnhw", F.normalize(code, dim=1), F.normalize(self.clusters, dim=1))
            return inner.argmax(1)

    def two_branches(owner, C, D, act):        # STEGO M 68-81 (ReLU), SmooSeg M 107-121 (SiLU)
        owner.cluster1 = nn.Sequential(nn.Conv2d(C, D, (1, 1)))
        owner.cluster2 = nn.Sequential(nn.Conv2d(C, C, (1, 1)), act(), nn.Conv2d(C, D, (1, 1)))

    class StegoLit(nn.Module):
        def __init__(self, vit, n_classes, dim, extra):
            super().__init__()
            C = vit.dim
            self.net = nn.Module()              # DinoFeaturizer: model, cluster1, cluster2
            self.net.model = vit
            two_branches(self.net, C, dim, nn.ReLU)
            self.train_cluster_probe = ClusterLookup(dim, n_classes)          # TS 73
            self.cluster_probe = ClusterLookup(dim, n_classes + extra)        # TS 75
            self.linear_probe = nn.Conv2d(dim, n_classes, (1, 1))             # TS 76
            self.decoder = nn.Conv2d(dim, C, (1, 1))                          # TS 78

        def code(self, feats):                  # M 108-111, eval mode: no dropout
            return self.net.cluster1(feats) + self.net.cluster2(feats)

        def predict(self, feats, size):
            code = F.interpolate(self.code(feats), size, mode="bilinear", align_corners=False)   # EV 128
            return self.cluster_probe.argmax(code), self.linear_probe(code).argmax(1)            # EV 130-131

    class SmooSegLit(nn.Module):
        def __init__(self, vit, n_classes, dim, extra, seed):
            super().__init__()
            C = vit.dim
            self.net = nn.Module()              # DinoV2Featurizer: model
            self.net.model = vit
            self.projection = nn.Module()       # Projection: cluster1, cluster2 (SiLU)
            two_branches(self.projection, C, dim, nn.SiLU)
            self.prediction = nn.Module()       # Prediction: local_clusters, global_clusters
            g = torch.Generator().manual_seed(seed)
            local = F.normalize(nn.init.xavier_normal_(torch.empty(n_classes + extra, dim), generator=g), dim=1)
            self.prediction.local_clusters = nn.Parameter(local)                                  # M 145, 155
            moved = F.normalize(local + 0.6 * torch.randn(local.shape, generator=g), dim=1)      # as after EMA steps
            self.prediction.global_clusters = nn.Parameter(moved, requires_grad=False)          # M 156-157

        def code(self, feats):                  # M 124-128
            return self.projection.cluster1(feats) + self.projection.cluster2(feats)

        def predict(self, feats, size, centres="global_clusters"):
            code = F.interpolate(self.code(feats), size, mode="bilinear", align_corners=False)   # TS 121
            c = getattr(self.prediction, centres)
            inner = torch.einsum("bchw,nc->bnhw", F.normalize(code, dim=1), F.normalize(c, dim=1))  # M 166-172
            return inner.argmax(1), None

    return StegoLit, SmooSegLit


def peer_module(peer, vit, n_classes=4, dim=8, extra=2, seed=0):
    """A random-weight module of ``peer`` ("stego" | "smooseg") around ``vit`` (eval mode)."""
    import torch

    StegoLit, SmooSegLit = _lit_modules()
    torch.manual_seed(seed)
    lit = StegoLit(vit, n_classes, dim, extra) if peer == "stego" else SmooSegLit(vit, n_classes, dim, extra, seed)
    return lit.eval()


def save_lightning(lit, path, peer, cfg: dict, n_classes, state=None):
    """``lit`` saved as Lightning saves a ``LitUnsupervisedSegmenter``: STEGO's as Lightning 1.x did
    (callbacks keyed by the ModelCheckpoint class, three optimisers: TS 373-383), SmooSeg's as
    Lightning 2.x does (string keys, one optimiser of two groups: TS 102-105, the AMP scaler);
    ``hyper_parameters`` {n_classes, cfg: a DictConfig} (save_hyperparameters, TS 106 / TS 58), the
    config with :data:`CONFIG_LIST` added.
    ``state`` replaces the state dict (a test's edited one)."""
    import torch

    sd = lit.state_dict() if state is None else state
    params = [p for p in lit.parameters() if p.requires_grad and not any(p is q for q in lit.net.model.parameters())]
    opt = torch.optim.Adam(params, lr=1e-3)
    sum((p * p).sum() for p in params).backward()
    opt.step()
    opt.zero_grad()
    best = {"monitor": "test/cluster/mIoU", "best_model_score": torch.tensor(0.31), "best_model_path": "x.ckpt",
            "current_score": torch.tensor(0.29), "dirpath": "checkpoints/"}
    if peer == "stego":
        ck = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.4.9", "state_dict": sd,
              "callbacks": {_ModelCheckpoint: best}, "optimizer_states": [opt.state_dict()] * 3,
              "lr_schedulers": [], "hparams_name": "kwargs"}
    else:
        ck = {"epoch": 1, "global_step": 3000, "pytorch-lightning_version": "2.0.9", "state_dict": sd,
              "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 2, "completed": 1}}}},
              "callbacks": {"ModelCheckpoint{'monitor': 'test/cluster/mIoU', 'mode': 'max'}": best},
              "optimizer_states": [opt.state_dict()], "lr_schedulers": [],
              "MixedPrecisionPlugin": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                                       "growth_interval": 2000, "_growth_tracker": 17},
              "hparams_name": "kwargs"}
    with peer_modules():
        ck["hyper_parameters"] = {"n_classes": n_classes, "cfg": dictconfig({**cfg, **CONFIG_LIST})}
        torch.save(ck, path)
    return Path(path)


def hp_checkpoint(vit, path, n_classes=4, dim=8, extra=0, seed=0, edit=None):
    """A random-weight HP model around ``vit`` saved as HP's run.py saves its best one (hynnsk/HP @
    8913644, described, not copied): a plain dict of torch.save (utils/common_utils.py lines 29-42)
    with ``model_only=True`` (run.py lines 282-286), the state dicts of STEGOmodel's ``net``,
    ``linear_probe`` and ``cluster_probe`` (build.py lines 14-24) under their entries, the
    optimisers' None. The modules' attributes are HP's, so the keys are: ``net`` holds ``model``,
    ``cluster1``, ``cluster2`` (ReLU), ``ema_model1``, ``ema_model2`` (model/dino/DinoFeaturizer.py
    lines 15, 68-86, 120-128), the probes model/STEGO.py lines 33-34; the moving-average branches are
    drawn apart from the live ones, as after training. ``predict(feats, size)`` renders HP's
    evaluation of a feature grid (run.py lines 361-382, eval.py lines 146-150, no CRF; in float32,
    HP's runs under autocast): the live code upsampled bilinearly to ``size``, then the cluster
    probe's argmax cosine (utils/layer_utils.py lines 18-28) and the linear probe's argmax.
    ``edit(ckpt)`` changes the dict before it is saved (a test's missing or extra key).
    -> (the model, eval mode; the path)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Featurizer(nn.Module):                # DinoFeaturizer's parameters, in its order
        def __init__(self, C, D):
            super().__init__()
            self.model = vit
            self.cluster1 = nn.Sequential(nn.Conv2d(C, D, (1, 1)))
            self.cluster2 = nn.Sequential(nn.Conv2d(C, C, (1, 1)), nn.ReLU(), nn.Conv2d(C, D, (1, 1)))
            self.ema_model1 = nn.Sequential(nn.Conv2d(C, D, (1, 1)))
            self.ema_model2 = nn.Sequential(nn.Conv2d(C, C, (1, 1)), nn.ReLU(), nn.Conv2d(C, D, (1, 1)))

    class ClusterLookup(nn.Module):             # utils/layer_utils.py lines 6-12
        def __init__(self, D, n):
            super().__init__()
            self.clusters = nn.Parameter(torch.randn(n, D))

    class HPModel(nn.Module):
        def __init__(self, C, D):
            super().__init__()
            self.net = Featurizer(C, D)
            self.cluster_probe = ClusterLookup(D, n_classes + extra)
            self.linear_probe = nn.Conv2d(D, n_classes, (1, 1))

        def code(self, feats):                  # DinoFeaturizer lines 188-193, eval mode: no dropout
            return self.net.cluster1(feats) + self.net.cluster2(feats)

        def predict(self, feats, size):
            code = F.interpolate(self.code(feats), size, mode="bilinear", align_corners=False)
            inner = torch.einsum("bchw,nc->bnhw", F.normalize(code, dim=1),
                                 F.normalize(self.cluster_probe.clusters, dim=1))
            return inner.argmax(1), self.linear_probe(code).argmax(1)

    torch.manual_seed(seed)
    model = HPModel(vit.dim, dim).eval()
    with torch.no_grad():
        for live, ema in (("cluster1", "ema_model1"), ("cluster2", "ema_model2")):
            for p, e in zip(getattr(model.net, live).parameters(), getattr(model.net, ema).parameters()):
                e.copy_(p + 0.3 * torch.randn(p.shape))
    ck = {"epoch": 2, "iter": 1500, "best_epoch": 2, "best_iter": 1500,
          "net_model_state_dict": model.net.state_dict(), "net_optimizer_state_dict": None,
          "linear_model_state_dict": model.linear_probe.state_dict(), "linear_optimizer_state_dict": None,
          "cluster_model_state_dict": model.cluster_probe.state_dict(), "cluster_optimizer_state_dict": None,
          "best": 187.25}
    if edit is not None:
        edit(ck)
    torch.save(ck, path)
    return model, Path(path)
