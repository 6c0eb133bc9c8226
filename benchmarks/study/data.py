"""The method study's data families: mosaics of the real textures and photographs scikit-image
ships, described by a fixed hand-made feature extractor. Not part of the package (scikit-image is
the study's dependency only: ``pip install scikit-image``, or the ``study`` extra).

Images (128 x 128 px) are warped, weighted Voronoi mosaics of 2-5 regions (the layout of the demo
data), each region filled with its own random crop of its class's source picture. Two families:

* ``flat``: 9 classes, each one source: the textures ``brick``, ``grass``, ``gravel``, ``moon``
  and the colour pictures ``immunohistochemistry``, ``hubble_deep_field``, ``coffee``,
  ``astronaut``, ``rocket`` (a photograph's class is everything a crop of it shows);
* ``tree``: 3 superclasses, the base textures ``brick``, ``grass``, ``gravel``, each with 3
  classes that are variants of it: a colour tint (warm, green, cool; the same three tints in every
  superclass, so colour alone cuts across the superclasses) and a scale (1, 1.4, 0.7 times the
  base's grain). The superclass -> class structure is in the feature geometry: variants of a base
  share its texture statistics.

Train and evaluation images never share a pixel of a source: crops for the train split come from
the left 60 % of every source picture, those for the evaluation split from the right 40 %. Per
image there is a nuisance shared by its regions (a global gain, a white balance and a linear
illumination gradient) and pixel noise. Class frequencies are geometric (the most common class 4x
the rarest, in a fixed random order); in ``tree`` half of the regions take their class from the
image's scene superclass.

The feature extractor (fixed, nothing learned; :func:`extract`): per pixel, intensity I and two
colour-opponent channels (R − G, (R + G)/2 − B), and the magnitude of 12 complex Gabor filters
(frequencies 0.06, 0.12, 0.24 cycles/px x 4 orientations) of I; per 8 x 8 patch (a 16 x 16 grid),
the mean and standard deviation of I and the opponents and the mean log(1 + 10·magnitude) of each
Gabor filter (18 numbers), and the same averaged over the 3 x 3 patch neighbourhood (18 more:
context, as a ViT's patch tokens carry); standardised with the train split's mean and standard
deviation per number; then a fixed random feature map to C = 256 channels,
``relu(W x / sqrt(36) + b)`` with W ~ N(0, 1), b ~ N(0, 0.5²) drawn once from seed 1234, so
that, as with DINO, every pair of patches has a positive cosine and the variation has a low rank.

Every random draw comes from ``numpy.random.default_rng(SeedSequence(seed, spawn_key=...))``.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np

from omh_ref.core.files import atomic_path
from omh_ref.features import attention as hp_attention
from omh_ref.features import meta as feats_meta
from omh_ref.features import synthetic

RES, PATCH = 128, 8
GRID = RES // PATCH
DIM = 256
HP_INPUTS = 1   # version of the train split's HP inputs (attn.npy, feats_aug.npy), part of the cache key
N_RAW = 36
FEATURE_SEED = 1234
TRAIN_SHARE = 0.6          # the left share of a source picture that train crops come from
GABOR_FREQS = (0.06, 0.12, 0.24)
GABOR_THETAS = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4)

FLAT_SOURCES = ("brick", "grass", "gravel", "moon", "immunohistochemistry", "hubble_deep_field", "coffee",
                "astronaut", "rocket")
TREE_BASES = ("brick", "grass", "gravel")
TINTS = {"warm": (1.0, 0.82, 0.62), "green": (0.72, 1.0, 0.72), "cool": (0.62, 0.8, 1.0)}
SCALES = (1.0, 1.4, 0.7)


@dataclass(frozen=True)
class ClassSpec:
    name: str
    source: str
    tint: tuple = (1.0, 1.0, 1.0)
    scale: float = 1.0
    superclass: int = 0


def family_classes(family: str) -> list:
    if family == "flat":
        return [ClassSpec(s, s, superclass=i) for i, s in enumerate(FLAT_SOURCES)]
    if family == "tree":
        return [ClassSpec(f"{b}.{t}", b, TINTS[t], SCALES[v], s)
                for s, b in enumerate(TREE_BASES) for v, t in enumerate(TINTS)]
    raise ValueError(f"family: expected 'flat' or 'tree', got {family!r}")


def _source(name):
    """A source picture as float32 RGB in [0, 1]."""
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img.astype(np.float32) / (255.0 if img.dtype == np.uint8 else max(float(img.max()), 1.0))
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _split_part(img, split):
    cut = int(round(img.shape[1] * TRAIN_SHARE))
    return img[:, :cut] if split == "train" else img[:, cut:]


def _crop(rng, part, size):
    """A random size x size crop of ``part`` (random position, random horizontal flip), resized to
    RES x RES with antialiasing."""
    from skimage.transform import resize

    size = int(min(size, part.shape[0], part.shape[1]))
    y = int(rng.integers(0, part.shape[0] - size + 1))
    x = int(rng.integers(0, part.shape[1] - size + 1))
    c = part[y:y + size, x:x + size]
    if rng.random() < 0.5:
        c = c[:, ::-1]
    return resize(c, (RES, RES), order=1, anti_aliasing=size > RES, preserve_range=True).astype(np.float32)


def _waves(coef, phase, t):
    ay = 2 * np.pi * coef[..., 0, None] * t + phase[..., None]
    ax = 2 * np.pi * coef[..., 1, None] * t
    return (np.sin(ay)[..., :, None] * np.cos(ax)[..., None, :]
            + np.cos(ay)[..., :, None] * np.sin(ax)[..., None, :])


@dataclass
class FamilySpec:
    family: str
    n_images: int
    seed: int = 0
    min_regions: int = 2
    max_regions: int = 5
    warp: float = 0.06
    freq_ratio: float = 4.0
    scene_bias: float = 0.5       # tree only
    gain: float = 0.2             # global gain in [1 - gain, 1 + gain]
    balance: float = 0.08         # per-channel white balance
    gradient: float = 0.15        # illumination gradient across the image
    noise: float = 0.02


def _world(spec: FamilySpec):
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(0,)))
    classes = family_classes(spec.family)
    K = len(classes)
    order = rng.permutation(K)
    freq = spec.freq_ratio ** (-order / max(K - 1, 1))
    return classes, freq / freq.sum()


def draw_image(spec: FamilySpec, classes, freq, parts, rng):
    """One image: (rgb (RES, RES, 3) float32, label (RES, RES) uint8)."""
    K = len(classes)
    n = int(rng.integers(spec.min_regions, spec.max_regions + 1))
    sup = np.array([c.superclass for c in classes])
    if spec.family == "tree":
        super_freq = np.bincount(sup, weights=freq)
        scene = int(rng.choice(len(super_freq), p=super_freq))
        in_scene = np.where(sup == scene, freq, 0.0)
        cls = np.array([rng.choice(K, p=in_scene / in_scene.sum()) if rng.random() < spec.scene_bias
                        else rng.choice(K, p=freq) for _ in range(n)])
    else:
        cls = rng.choice(K, size=n, p=freq)
    seeds = rng.uniform(0.05, 0.95, size=(n, 2))
    weights = rng.uniform(0.6, 1.4, size=n)
    wcoef = rng.uniform(-2.0, 2.0, size=(2, 3, 2))
    wphase = rng.uniform(0, 2 * np.pi, size=(2, 3))
    t = (np.arange(RES) + 0.5) / RES
    disp = (spec.warp / math.sqrt(1.5)) * _waves(wcoef, wphase, t).sum(axis=1)
    dy = t[:, None] + disp[0] - seeds[:, 0, None, None]
    dx = t[None, :] + disp[1] - seeds[:, 1, None, None]
    region = np.argmin((dy * dy + dx * dx) / (weights * weights)[:, None, None], axis=0)
    img = np.zeros((RES, RES, 3), np.float32)
    for r in range(n):
        c = classes[cls[r]]
        size = RES * c.scale * rng.uniform(0.85, 1.15)
        tex = _crop(rng, parts[c.source], size) * np.asarray(c.tint, np.float32)
        m = region == r
        img[m] = tex[m]
    gain = rng.uniform(1 - spec.gain, 1 + spec.gain)
    balance = 1 + rng.uniform(-spec.balance, spec.balance, size=3)
    g = rng.uniform(-1, 1, size=2)
    grad = 1 + spec.gradient * (g[0] * (t[:, None] - 0.5) + g[1] * (t[None, :] - 0.5)) * 2
    img = img * (gain * balance)[None, None, :] * grad[:, :, None]
    img = img + rng.standard_normal(img.shape).astype(np.float32) * spec.noise
    return np.clip(img, 0, 1).astype(np.float32), cls[region].astype(np.uint8)


# ------------------------------------------------------------------------------ feature extractor
def _gabor_bank():
    from skimage.filters import gabor_kernel

    return [gabor_kernel(f, theta=th) for f in GABOR_FREQS for th in GABOR_THETAS]


def raw_descriptors(img, bank):
    """(GRID, GRID, N_RAW) float64: per patch colour and texture statistics and their 3 x 3
    neighbourhood mean."""
    from scipy.ndimage import uniform_filter
    from scipy.signal import fftconvolve

    I = img.mean(axis=2)
    opp = np.stack([I, img[..., 0] - img[..., 1], (img[..., 0] + img[..., 1]) / 2 - img[..., 2]], axis=-1)
    Ic = I - I.mean()
    mags = np.stack([np.log1p(10 * np.abs(fftconvolve(Ic, k, mode="same"))) for k in bank], axis=-1)

    def pool(x):
        return x.reshape(GRID, PATCH, GRID, PATCH, -1).mean(axis=(1, 3))
    mean = pool(opp)
    std = np.sqrt(np.maximum(pool(opp * opp) - mean * mean, 0))
    local = np.concatenate([mean, std, pool(mags)], axis=-1)                        # GRID,GRID,18
    context = uniform_filter(local, size=(3, 3, 1), mode="nearest")
    return np.concatenate([local, context], axis=-1)


def random_map():
    rng = np.random.default_rng(FEATURE_SEED)
    return rng.standard_normal((N_RAW, DIM)) / math.sqrt(N_RAW), rng.standard_normal(DIM) * 0.5


def extract(raw, norm, rmap):
    """Features (…, DIM) float32 of raw descriptors (…, N_RAW)."""
    mu, sd = norm
    W, b = rmap
    return np.maximum((raw - mu) / sd @ W + b, 0).astype(np.float32)


# ------------------------------------------------------------------------------ writing a family
def _draw_split(spec: FamilySpec, split: str, augmented=False):
    """-> (classes, raw descriptors (N, GRID, GRID, N_RAW), labels, and with ``augmented`` the raw
    descriptors of each image under one photometric augmentation (HP's, omh_ref.extract.augment,
    applied to the [0, 1] image, seeded by the image's name), else None)."""
    from omh_ref.extract import augment

    classes, freq = _world(spec)
    parts = {s: _split_part(_source(s), split) for s in {c.source for c in classes}}
    rng = np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(1 if split == "train" else 2,)))
    bank = _gabor_bank()
    raws, labels, augs = [], [], []
    for i in range(spec.n_images):
        img, lab = draw_image(spec, classes, freq, parts, rng)
        raws.append(raw_descriptors(img, bank))
        labels.append(lab)
        if augmented:
            x = augment.apply(np.moveaxis(img, -1, 0), augment.draw(spec.seed, f"{split}_{i:06d}"))
            augs.append(raw_descriptors(np.clip(np.moveaxis(x, 0, -1), 0, 1), bank))
    return classes, np.stack(raws), np.stack(labels), (np.stack(augs) if augmented else None)


def write_family(family, root, n_train=600, n_val=200, seed=0, say=print) -> dict:
    """Write the family's train and val splits under ``root/<split>/`` (feats.npy float16,
    labels.npy, feats.json with the label hierarchy); the standardisation is the train split's.
    Skipped when the folder holds the same spec already. -> {'train': dir, 'val': dir}."""
    import json

    out = {s: os.path.join(root, s) for s in ("train", "val")}
    specs = {"train": FamilySpec(family, n_train, seed), "val": FamilySpec(family, n_val, seed)}
    want = {s: dict(dataclasses.asdict(specs[s]), split=s, dim=DIM, feature_seed=FEATURE_SEED,
                    hp_inputs=HP_INPUTS if s == "train" else None) for s in specs}
    done = all(os.path.isfile(os.path.join(out[s], "feats.json"))
               and json.load(open(os.path.join(out[s], "feats.json"))).get("study_spec") == want[s] for s in out)
    if done:
        return out
    say(f"study data: writing family {family!r} under {root}")
    drawn = {s: _draw_split(specs[s], s, augmented=s == "train") for s in specs}
    tr = drawn["train"][1].reshape(-1, N_RAW)
    norm = (tr.mean(axis=0), tr.std(axis=0) + 1e-6)
    rmap = random_map()
    for s, (classes, raw, labels, raw_aug) in drawn.items():
        os.makedirs(out[s], exist_ok=True)
        feats = extract(raw, norm, rmap).astype(np.float16)
        arrays = [("feats.npy", feats), ("labels.npy", labels)]
        hp = {}
        if raw_aug is not None:   # the HP base's inputs (train split only: evaluation needs neither)
            attn = np.concatenate([hp_attention.window_weights(synthetic.attention_logits(feats[i:i + 64]), GRID, GRID)
                                   for i in range(0, len(feats), 64)]).astype(np.float16)
            arrays += [(hp_attention.FILE, attn), (synthetic.AUG_FILE, extract(raw_aug, norm, rmap).astype(np.float16))]
            att = hp_attention.record(len(feats), GRID, GRID)
            att["source"] = "study: synthetic.attention_logits of the features, in place of a ViT's logits"
            hp = {"attention": att, "augmented": {
                "file": synthetic.AUG_FILE, "shape": list(feats.shape), "dtype": "float16", "seed": specs[s].seed,
                "space": "rgb", "draws": "one per image, omh_ref.extract.augment.draw(seed, '<split>_<index>')",
                "source": "HP's photometric augmentation on the [0, 1] image, then this module's extractor"}}
        for name, arr in arrays:
            with atomic_path(os.path.join(out[s], name)) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr)
        sup = [c.superclass for c in classes]
        names = [c.name for c in classes]
        if family == "tree":
            hier = [feats_meta.granularity("classes", len(classes), "labels.npy", names, parent=sup),
                    feats_meta.granularity("superclasses", len(TREE_BASES), "labels.npy", list(TREE_BASES), map=sup)]
        else:
            hier = [feats_meta.granularity("classes", len(classes), "labels.npy", names)]
        rec = feats_meta.make(shape=list(feats.shape), dtype="float16", backbone="study-texture-features",
                              resolution=RES, patch=PATCH, labels="labels.npy", n_classes=len(classes),
                              class_names=names, dataset=f"study-{family}", split=s, label_hierarchy=hier,
                              study_spec=want[s], **hp)
        feats_meta.write(os.path.join(out[s], "feats.json"), rec)
    return out
