"""Synthetic DINO-like patch features with a true superclass → class → part hierarchy: the demo data.

A *world* (drawn once per seed, shared by every split) holds the prototypes; each *image* is a few
regions at pixel resolution, each region one class whose parts lie side by side inside it. A
patch's feature is the pixel-fraction-weighted mixture of the features of the pixels it covers:

    g(region r, part q) = μ + P_super[s(c_r)] + P_class[c_r] + P_part[c_r, q] + u_r     (pixel)
    f(patch)            = Σ_pixels∈patch g(pixel) / p²  +  v_img  +  n(y, x)  +  ε        (patch)

- μ: a large mean shared by every patch, so raw cosines between unrelated patches are positive
  (as in DINO, and why STEGO's shifts matter);
- P_super, P_class, P_part: the hierarchy, superclass strongest, so a method that clusters raw
  similarity tends to merge the classes of a superclass;
- u_r: the instance offset of region r (within-class, per-image variation);
- v_img + n(y, x): a per-image offset and a spatially smooth nuisance field (a few low-frequency
  plane waves), shared by the image's patches whatever their class;
- ε: i.i.d. noise per patch and channel.
Prototypes and instance offsets live in a rank-``latent_dim`` subspace of the C channels
(DINO features are far from isotropic: their variation has a low effective rank, so nuisance
competes with the class signal), v_img and n in a ``style_dim``-dimensional subspace of that (a few
global directions, like lighting or context, that vary between images far more than within one:
clustering raw similarity then splits a superclass by style rather than by class, while a linear
probe still separates the classes); ε is isotropic in all C channels. Every ``*_scale`` is the
component's RMS per channel: its vectors have norm ≈ scale·sqrt(C). Sibling prototypes are
orthogonal to each other and to their ancestors'.

Randomness: the world comes from ``Generator(SeedSequence(seed, spawn_key=(0,)))``; the images of
a split from one Generator of their own (spawn key 1 = train, 2 = val), drawn image by image in a
fixed order (:func:`_draw_image`), so the data do not depend on the batch size, :func:`write`
equals :func:`generate` exactly, and train and val are different images of the same world.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np

from ..core.files import atomic_path
from . import attention as hp_attention
from . import meta as feats_meta

SPLITS = {"train": 1, "val": 2}     # spawn keys of the image streams; 0 is the world
DTYPES = ("float16", "float32")
AUG_FILE = "feats_aug.npy"          # the HP base's augmented features, as extraction names them


@dataclass
class SynthSpec:
    """Everything that defines a synthetic data set (recorded in ``feats.json``)."""

    n_images: int = 600
    grid: int = 16                  # h = w, the feature grid
    patch: int = 8                  # pixels per patch side: labels are (grid·patch)²
    dim: int = 384                  # C, as DINO ViT-S
    n_super: int = 3
    classes_per_super: int = 3
    parts_per_class: int = 2
    latent_dim: int | None = None   # rank of the structured (non-noise) variation; None: min(32, dim)
    style_dim: int = 4              # rank of the image offset and nuisance, inside the latent space
    mean_scale: float = 1.0         # μ: shared by all patches
    super_scale: float = 1.0        # superclass prototypes (the strongest semantic component)
    class_scale: float = 0.5        # class prototypes
    part_scale: float = 0.3         # part prototypes
    instance_scale: float = 0.6     # per-region offset (within-class variation)
    image_scale: float = 0.5        # per-image offset
    nuisance_scale: float = 0.5     # smooth per-image field
    noise_scale: float = 0.5        # i.i.d. per patch and channel
    nuisance_waves: int = 4         # plane waves in the nuisance field
    nuisance_freq: float = 1.0      # their largest frequency per axis, cycles per image
    min_regions: int = 2
    max_regions: int = 5
    warp: float = 0.06              # boundary wiggle, fraction of the image side
    scene_bias: float = 0.5         # P(a region's class is drawn from the image's scene superclass)
    class_freq_ratio: float = 4.0   # frequency of the most common class / the rarest
    seed: int = 0

    def __post_init__(self):
        self.validate()

    @property
    def n_classes(self) -> int:
        return self.n_super * self.classes_per_super

    @property
    def resolution(self) -> int:
        return self.grid * self.patch

    @property
    def rank(self) -> int:
        """The latent rank in use (``latent_dim``, or min(32, dim) when it is None)."""
        return min(32, self.dim) if self.latent_dim is None else self.latent_dim

    def validate(self):
        """Raise a ValueError naming the first bad field."""
        def bad(name, expected):
            return ValueError(f"synth spec field {name!r}: expected {expected}, got {getattr(self, name)!r}")

        for name in ("n_images", "grid", "patch", "dim", "n_super", "classes_per_super",
                     "parts_per_class", "latent_dim", "style_dim", "nuisance_waves", "min_regions",
                     "max_regions"):
            v = getattr(self, name)
            if name == "latent_dim" and v is None:
                continue
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise bad(name, "a positive integer")
        if self.n_classes > 255:
            raise bad("classes_per_super", "n_super·classes_per_super <= 255 (labels are uint8)")
        if self.n_classes * self.parts_per_class > 255:
            raise bad("parts_per_class", "n_super·classes_per_super·parts_per_class <= 255 (part labels are uint8)")
        if self.rank > self.dim:
            raise bad("latent_dim", f"at most dim={self.dim}")
        need = max(self.n_super, self.classes_per_super + 1, self.parts_per_class + 2)
        if self.rank < need:
            raise bad("latent_dim" if self.latent_dim is not None else "dim",
                      f"a latent rank >= {need} (room for orthogonal sibling prototypes)")
        if self.style_dim > self.rank:
            raise bad("style_dim", f"at most the latent rank {self.rank}")
        if self.max_regions < self.min_regions:
            raise bad("max_regions", f">= min_regions={self.min_regions}")
        for name in ("mean_scale", "super_scale", "class_scale", "part_scale", "instance_scale",
                     "image_scale", "nuisance_scale", "noise_scale", "nuisance_freq", "warp"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
                raise bad(name, "a finite number >= 0")
        if not 0 <= self.scene_bias <= 1:
            raise bad("scene_bias", "a probability in [0, 1]")
        if not (self.class_freq_ratio >= 1 and math.isfinite(self.class_freq_ratio)):
            raise bad("class_freq_ratio", "a finite number >= 1")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise bad("seed", "an integer >= 0")


def _rng(spec: SynthSpec, key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(int(spec.seed), spawn_key=(key,)))


def _split_key(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {tuple(SPLITS)}, got {split!r}")
    return SPLITS[split]


def superclass_of_class(spec: SynthSpec) -> list:
    return [c // spec.classes_per_super for c in range(spec.n_classes)]


def class_names(spec: SynthSpec) -> list:
    """``s{superclass}.c{class}``, the class index being the label value."""
    return [f"s{s}.c{c}" for c, s in enumerate(superclass_of_class(spec))]


def label_hierarchy(spec: SynthSpec) -> list:
    """The ``feats.json`` label hierarchy (:func:`omh_ref.features.meta.granularity`): parts
    (``labels_fine.npy``, part id = class·parts_per_class + the part's index in its region) ->
    classes (``labels.npy``) -> superclasses (``labels.npy`` through the class's superclass)."""
    P, sup = spec.parts_per_class, superclass_of_class(spec)
    names = class_names(spec)
    return [feats_meta.granularity("parts", spec.n_classes * P, "labels_fine.npy",
                                   [f"{names[c]}.p{q}" for c in range(spec.n_classes) for q in range(P)],
                                   parent=[c for c in range(spec.n_classes) for _ in range(P)]),
            feats_meta.granularity("classes", spec.n_classes, "labels.npy", names, parent=sup),
            feats_meta.granularity("superclasses", spec.n_super, "labels.npy", [f"s{s}" for s in range(spec.n_super)],
                                   map=sup)]


def make_world(spec: SynthSpec) -> dict:
    """The prototypes and class frequencies, shared by every split of a seed.

    Prototypes have exact norms (scale·sqrt(C)) so the hierarchy's strengths are the spec's, not a
    draw's; the latent basis U (C, R) has orthonormal columns, as has the style basis (Sd, R).
    """
    rng = _rng(spec, 0)
    C, R, S, K, P = spec.dim, spec.rank, spec.n_super, spec.n_classes, spec.parts_per_class
    Kc = spec.classes_per_super
    sq = math.sqrt(C)

    def orthonormal(n, against):
        """n random unit vectors (n, R), orthogonal to each other and to the rows of ``against``."""
        q, _ = np.linalg.qr(np.concatenate([against, rng.standard_normal((n, R))]).T)   # R,m+n
        return q[:, len(against):].T

    basis, _ = np.linalg.qr(rng.standard_normal((C, R)))                        # C,R
    style = orthonormal(spec.style_dim, np.zeros((0, R)))                        # Sd,R
    mean = rng.standard_normal(C)
    mean *= spec.mean_scale * sq / np.linalg.norm(mean)                          # C
    # Each level's prototypes are orthogonal to their siblings and to their ancestors' (random
    # angles between them would make one world's classes much easier to tell apart than another's).
    u_super = orthonormal(S, np.zeros((0, R)))                                   # S,R
    u_class = np.concatenate([orthonormal(Kc, u_super[s:s + 1]) for s in range(S)])        # K,R
    u_part = np.stack([orthonormal(P, np.stack([u_super[c // Kc], u_class[c]])) for c in range(K)])  # K,P,R
    p_super = spec.super_scale * sq * u_super                                   # S,R
    p_class = spec.class_scale * sq * u_class                                   # K,R
    p_part = spec.part_scale * sq * u_part                                      # K,P,R
    # Class frequencies: geometric from 1 down to 1/ratio, in a random class order.
    order = rng.permutation(K)
    freq = spec.class_freq_ratio ** (-order / max(K - 1, 1))
    freq /= freq.sum()
    sup = np.asarray(superclass_of_class(spec))
    super_freq = np.bincount(sup, weights=freq, minlength=S)
    # Each class's latent vector at the pixel level, before the part and the instance offset.
    p_class_full = p_super[sup] + p_class                                        # K,R
    return {"basis_t": np.ascontiguousarray(basis.T), "style_c": style @ basis.T, "mean": mean,
            "super": p_super, "class": p_class, "part": p_part, "class_full": p_class_full,
            "freq": freq, "super_freq": super_freq, "sup": sup}


def _pixel_coords(n):
    """Pixel centres in [0, 1]."""
    return (np.arange(n) + 0.5) / n


def _waves(coef, phase, t):
    """sin(2π(f_y·y + f_x·x) + φ) on the grid t x t for each row of ``coef`` (…, 2): expanded as a
    sum of two outer products, so no transcendental is evaluated per pixel. -> (…, T, T)"""
    ay = 2 * np.pi * coef[..., 0, None] * t + phase[..., None]                     # …,T
    ax = 2 * np.pi * coef[..., 1, None] * t                                         # …,T
    return (np.sin(ay)[..., :, None] * np.cos(ax)[..., None, :]
            + np.cos(ay)[..., :, None] * np.sin(ax)[..., None, :])


def _draw_image(spec: SynthSpec, world: dict, rng: np.random.Generator, aug_rng=None):
    """One image: (feat (h, w, C) float32, label (H, W) uint8, part (H, W) uint8), and with
    ``aug_rng`` a fourth array, the features of its *restyled* copy (:func:`iter_batches`).

    Every draw of the image is made from ``rng``, in this order (each step draws its own, in
    turn): region count, scene superclass, region seeds and weights, boundary warp (layout);
    region classes; part directions; instance offsets; image offset, nuisance waves; noise. The
    restyled copy's offset, nuisance waves and noise come from ``aug_rng`` (the same steps), so
    ``rng``'s draws, and the data, are the same with or without it.
    """
    H, C = spec.resolution, spec.dim
    t = _pixel_coords(H)
    n, scene, region = _layout(spec, world, rng, t)
    cls = _region_classes(spec, world, rng, n, scene)
    part = _parts(spec, rng, region, t, n)
    content = _region_features(spec, world, rng, region, part, cls)
    feat = _styled(spec, world, rng, content)
    out = (feat, cls[region].astype(np.uint8), part.astype(np.uint8))
    return out if aug_rng is None else out + (_styled(spec, world, aug_rng, content),)


def _styled(spec, world, rng, content):
    """The image's content (hw, C) with its style: a nuisance field and offset, the shared mean and
    noise, drawn from ``rng``. -> (h, w, C) float32."""
    field, offset = _nuisance(spec, world, rng)
    feat = content + field
    feat += world["mean"] + offset
    noise = rng.standard_normal((spec.grid * spec.grid, spec.dim), dtype=np.float32)      # hw,C
    noise *= np.float32(spec.noise_scale)
    return (feat + noise).astype(np.float32).reshape(spec.grid, spec.grid, spec.dim)


def _layout(spec, world, rng, t):
    """A multiplicatively weighted Voronoi diagram of warped pixel coordinates: curved boundaries
    and enclosed blobs, not aligned with patches. -> (n regions, scene superclass, region (H, W))."""
    n = int(rng.integers(spec.min_regions, spec.max_regions + 1))
    scene = int(rng.choice(spec.n_super, p=world["super_freq"]))
    seeds = rng.uniform(0.05, 0.95, size=(n, 2))                                  # n,2 (y, x)
    weights = rng.uniform(0.6, 1.4, size=n)                                       # n
    wcoef = rng.uniform(-2.0, 2.0, size=(2, 3, 2))     # displaced axis, wave, (f_y, f_x) cycles/image
    wphase = rng.uniform(0, 2 * np.pi, size=(2, 3))
    disp = (spec.warp / math.sqrt(1.5)) * _waves(wcoef, wphase, t).sum(axis=1)    # 2,H,W
    dy = t[:, None] + disp[0] - seeds[:, 0, None, None]                           # n,H,W
    dx = t[None, :] + disp[1] - seeds[:, 1, None, None]                           # n,H,W
    return n, scene, np.argmin((dy * dy + dx * dx) / (weights * weights)[:, None, None], axis=0)


def _region_classes(spec, world, rng, n, scene):
    """With probability scene_bias from the image's scene superclass, else from all; either way a
    region's class has the world's class frequencies as its marginal. -> (n,) class ids."""
    from_scene = rng.random(n) < spec.scene_bias
    u = rng.random(n)
    cum_scene = np.cumsum(np.where(world["sup"] == scene, world["freq"], 0.0))    # K
    cum_all = np.cumsum(world["freq"])                                            # K
    # Divided by their last entry, the CDFs end in exactly 1.0 (as do the equal entries after the
    # scene's last class), so u < 1 never lands past the scene or the class range.
    cum = np.where(from_scene[:, None], cum_scene / cum_scene[-1], cum_all / cum_all[-1])  # n,K
    return (cum <= u[:, None]).sum(axis=1)                                        # n


def _parts(spec, rng, region, t, n):
    """Equal-area stripes across each region along a random direction. -> part (H, W)."""
    H, P = spec.resolution, spec.parts_per_class
    theta = rng.uniform(0, 2 * np.pi, size=n)
    part = np.zeros((H, H), dtype=np.int64)
    if P > 1:
        for r in range(n):
            mask = region == r
            if mask.any():
                proj = (np.cos(theta[r]) * t[:, None] + np.sin(theta[r]) * t[None, :])[mask]
                cuts = np.quantile(proj, np.arange(1, P) / P)
                part[mask] = np.searchsorted(cuts, proj, side="right")
    return part


def _region_features(spec, world, rng, region, part, cls):
    """Region x part features, mixed into patches by their pixel fractions. -> (hw, C). Products
    are einsums (numpy's own loops, not BLAS): one thread, the same bits whatever the load or the
    batch size. With 2 cores and one of them busy, OpenBLAS's threads on these small products made
    generation 2-3x slower."""
    h = w = spec.grid
    p, H, C, R, P = spec.patch, spec.resolution, spec.dim, spec.rank, spec.parts_per_class
    n = len(cls)
    lat = math.sqrt(C / R)   # latent N(0, I_R) vectors times this have norm ≈ sqrt(C)
    basis = world["basis_t"]                                                      # R,C
    inst = rng.standard_normal((n, R)) * (spec.instance_scale * lat)             # n,R
    seg_lat = world["class_full"][cls][:, None, :] + world["part"][cls] + inst[:, None, :]  # n,P,R
    seg = np.einsum("kr,rc->kc", seg_lat.reshape(n * P, R), basis)               # nP,C
    pix_patch = (np.arange(H) // p)[:, None] * w + (np.arange(H) // p)[None, :]   # H,W
    counts = np.bincount((pix_patch * (n * P) + region * P + part).ravel(), minlength=h * w * n * P)
    return np.einsum("pk,kc->pc", counts.reshape(h * w, n * P) / (p * p), seg)   # hw,C


def _nuisance(spec, world, rng):
    """Smooth nuisance field (at patch centres) and per-image offset, both in the style subspace.
    -> (field (hw, C), offset (C,))."""
    h = w = spec.grid
    C, Sd, J = spec.dim, spec.style_dim, spec.nuisance_waves
    style = world["style_c"] * math.sqrt(C / Sd)    # N(0, I_Sd) coefficients -> norm ≈ sqrt(C)  Sd,C
    offset = np.einsum("s,sc->c", rng.standard_normal(Sd) * spec.image_scale, style)             # C
    nfreq = rng.uniform(-spec.nuisance_freq, spec.nuisance_freq, size=(J, 2))
    nphase = rng.uniform(0, 2 * np.pi, size=J)
    # A wave's mean square is 1/2, hence sqrt(J/2): the field's RMS is nuisance_scale.
    namp = rng.standard_normal((J, Sd)) * (spec.nuisance_scale / math.sqrt(J / 2))  # J,Sd
    nvec = np.einsum("js,sc->jc", namp, style)                                    # J,C
    waves = _waves(nfreq, nphase, _pixel_coords(h)).reshape(J, h * w)              # J,hw
    return np.einsum("jp,jc->pc", waves, nvec), offset


def iter_batches(spec: SynthSpec, split: str = "train", batch: int = 64, restyled: bool = False):
    """Yield ``(start, feats (b,h,w,C) float32, labels (b,H,W) uint8, parts (b,H,W) uint8)``,
    and with ``restyled`` a fifth array: each image's restyled copy (b,h,w,C), the same regions,
    classes, parts and instances under a new draw of the image's style (offset and nuisance field)
    and noise, from a stream of its own. It is the synthetic data's stand-in for a photometric
    augmentation (HP's consistency term): what changes is what a change of light and colour
    changes in a backbone's features, the content stays. Draws go image by image through one
    stream (two with ``restyled``), so the data do not depend on ``batch``."""
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch: expected a positive integer, got {batch!r}")
    world = make_world(spec)
    key = _split_key(split)
    rng = _rng(spec, key)
    aug_rng = np.random.default_rng(np.random.SeedSequence(int(spec.seed), spawn_key=(key, 1))) if restyled else None
    for start in range(0, spec.n_images, batch):
        items = [_draw_image(spec, world, rng, aug_rng) for _ in range(min(batch, spec.n_images - start))]
        yield (start,) + tuple(np.stack(x) for x in zip(*items))


def image_names(spec: SynthSpec, split: str = "train") -> list:
    prefix = "synth_" if split == "train" else f"synth_{split}_"
    return [f"{prefix}{i:06d}" for i in range(spec.n_images)]


def describe(spec: SynthSpec, split: str = "train", dtype: str = "float32", hp: bool = False) -> dict:
    """The ``feats.json`` record of a data set (:mod:`omh_ref.features.meta`, plus the hierarchy
    and the spec; with ``hp``, the records of ``attn.npy`` and ``feats_aug.npy``)."""
    h = spec.grid
    extra = {}
    if hp:
        att = hp_attention.record(spec.n_images, h, h)
        att["source"] = ("synthetic: the scaled dot products of each image's centred patch features "
                         "(omh_ref.features.synthetic.attention_logits), in place of a ViT's logits")
        extra = {"attention": att,
                 "augmented": {"file": AUG_FILE, "shape": [spec.n_images, h, h, spec.dim], "dtype": dtype,
                               "seed": int(spec.seed), "space": "synthetic",
                               "draws": "one per image: its style (offset, nuisance field) and noise redrawn",
                               "source": "omh_ref.features.synthetic.iter_batches(restyled=True), in place of "
                                         "a photometric augmentation"}}
    return feats_meta.make(
        shape=[spec.n_images, h, h, spec.dim], dtype=dtype, backbone="synthetic", resolution=spec.resolution,
        patch=spec.patch, images=image_names(spec, split), labels="labels.npy", n_classes=spec.n_classes,
        class_names=class_names(spec), dataset="synthetic", split=split, labels_fine="labels_fine.npy",
        label_hierarchy=label_hierarchy(spec), hierarchy={"superclass_of_class": superclass_of_class(spec), "n_super": spec.n_super,
                   "n_parts": spec.parts_per_class},
        synth_spec=dataclasses.asdict(spec), **extra)


def generate(spec: SynthSpec, split: str = "train"):
    """All of a split in memory: ``(feats (N,h,w,C) float32, labels (N,H,W) uint8, meta)``.

    ``meta`` is :func:`describe`'s record plus ``parts`` (N,H,W) uint8, the part index of each
    pixel within its class, and ``class_freq``, the world's class frequencies.
    """
    _split_key(split)
    N, h, H, C = spec.n_images, spec.grid, spec.resolution, spec.dim
    feats = np.empty((N, h, h, C), dtype=np.float32)
    labels = np.empty((N, H, H), dtype=np.uint8)
    parts = np.empty((N, H, H), dtype=np.uint8)
    for start, f, l, q in iter_batches(spec, split):
        end = start + len(f)
        feats[start:end], labels[start:end], parts[start:end] = f, l, q
    meta = describe(spec, split, "float32")
    meta["parts"] = parts
    meta["class_freq"] = make_world(spec)["freq"].tolist()
    return feats, labels, meta


def attention_logits(feats: np.ndarray) -> np.ndarray:
    """The synthetic data's stand-in for a ViT's last-block attention logits (the HP base's
    ``attn.npy``): (B, h, w, C) -> (B, n, n), the scaled dot products of the image's centred patch
    features, (f_p − f̄)·(f_q − f̄)/sqrt(C). A DINO head's q·k is large where two patches look
    alike; here that is what the features hold (the shared mean removed, it would make every pair
    alike). float32."""
    B, h, w, C = feats.shape
    f = np.asarray(feats, dtype=np.float32).reshape(B, h * w, C)
    f = f - f.mean(axis=1, keepdims=True)
    return np.einsum("bpc,bqc->bpq", f, f) / np.float32(math.sqrt(C))


def write(spec: SynthSpec, out_dir, dtype: str = "float16", batch: int = 64, split: str = "train",
          hp: bool = False) -> dict:
    """Write ``feats.npy``, ``labels.npy`` (classes), ``labels_fine.npy`` (parts, numbered
    class·parts_per_class + part) and ``feats.json`` under ``out_dir``; return their paths. With
    ``hp``, also the HP base's two inputs: ``attn.npy``, HP's window weights
    (:mod:`omh_ref.features.attention`) of :func:`attention_logits`, and ``feats_aug.npy``, the
    restyled copies (:func:`iter_batches`), named in ``feats.json`` as extraction names them.

    Features go through ``open_memmap`` in batches (never whole in memory); each file is written
    atomically (:func:`omh_ref.core.files.atomic_path`), ``feats.json`` last, so a reader never
    sees a half-written file. ``split="val"`` writes other images of the same world (names
    ``synth_val_000000``...).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, got {dtype!r}")
    _split_key(split)
    os.makedirs(out_dir, exist_ok=True)
    N, h, H, C = spec.n_images, spec.grid, spec.resolution, spec.dim
    paths = {"feats": os.path.join(out_dir, "feats.npy"), "labels": os.path.join(out_dir, "labels.npy"),
             "labels_fine": os.path.join(out_dir, "labels_fine.npy")}
    if hp:
        paths.update(attn=os.path.join(out_dir, hp_attention.FILE), aug=os.path.join(out_dir, AUG_FILE))
    P = spec.parts_per_class
    with contextlib.ExitStack() as stack:
        tmp = {k: stack.enter_context(atomic_path(v)) for k, v in paths.items()}
        shapes = {"feats": ((N, h, h, C), dtype), "labels": ((N, H, H), np.uint8),
                  "labels_fine": ((N, H, H), np.uint8), "attn": ((N, h, h, 9), hp_attention.DTYPE),
                  "aug": ((N, h, h, C), dtype)}
        out = {k: np.lib.format.open_memmap(tmp[k], mode="w+", dtype=shapes[k][1], shape=shapes[k][0])
               for k in paths}
        for start, f, l, q, *aug in iter_batches(spec, split, batch, restyled=hp):
            end = start + len(f)
            out["feats"][start:end] = f
            out["labels"][start:end] = l
            out["labels_fine"][start:end] = l * np.uint8(P) + q
            if hp:
                out["attn"][start:end] = hp_attention.window_weights(attention_logits(f), h, h)
                out["aug"][start:end] = aug[0]
        for a in out.values():
            a.flush()
        del out
    paths["json"] = os.path.join(out_dir, "feats.json")
    feats_meta.write(paths["json"], describe(spec, split, dtype, hp=hp))
    return paths
