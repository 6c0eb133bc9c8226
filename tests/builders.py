"""What the tests build, in one place: feature files and known worlds with labels (the package's
own synthetic data, omh_ref.features.synthetic, is the demo's; these are the small, exact ones).
Test modules import these instead of each other's helpers."""
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
