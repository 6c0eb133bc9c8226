"""HP's photometric augmentation, in NumPy, for ``omh-ref extract --augment``: one seeded draw per
crop, aligned pixel for pixel with it (no geometric change), whose features go to ``feats_aug.npy``.

HP (hynnsk/HP @ 8913644, docs/hp_reading.md §8) builds ``T.Compose([T.ColorJitter(brightness=.3,
contrast=.3, saturation=.3, hue=.1), T.RandomGrayscale(.2), T.RandomApply([T.GaussianBlur((5,
5))])])`` (``build.py`` 165-169) and applies it to the item's image tensor **after** ``ToTensor``
and ImageNet ``Normalize`` (``dataset/data.py`` 594, the transform of lines 30-44), anew every time
an item is loaded (``dataset/data.py`` 562). What each piece does is torchvision's (its tensor
functions, ``torchvision/transforms/_functional_tensor.py``; the parameter draws,
``transforms.py``), written here from that behaviour:

* **ColorJitter(0.3, 0.3, 0.3, 0.1)**: factors uniform in [0.7, 1.3] for brightness, contrast and
  saturation ([max(0, 1 - v), 1 + v]) and in [-0.1, 0.1] for the hue, applied in a random order
  (a random permutation of the four). On a float image: brightness ``blend(x, 0, f)``; contrast
  ``blend(x, mean(gray(x)), f)`` (the mean over the whole image); saturation ``blend(x, gray(x),
  f)``; ``blend(a, b, f) = clamp(f a + (1 - f) b, 0, 1)``; gray = 0.2989 R + 0.587 G + 0.114 B.
  Hue: RGB -> HSV (Pillow's formulas, no clamp of the input), h <- (h + f) mod 1, HSV -> RGB with
  p, q, t clamped to [0, 1] and v as it is.
* **RandomGrayscale(0.2)**: with probability 0.2, gray(x) on all three channels.
* **RandomApply([GaussianBlur((5, 5))])**, p = 0.5 (RandomApply's default): a 5 x 5 Gaussian,
  sigma uniform in [0.1, 2.0] (GaussianBlur's default), the kernel exp(-x² / 2σ²) at x = -2..2
  normalised to sum 1, outer product, reflect padding (no edge repeat), per channel.

**Where it acts** (``space``): ``normalised`` (the default, HP's code): on the ImageNet-normalised
image, so the blends' clamp to [0, 1] acts in normalised space (a hard squeeze of every channel to
[mean, mean + std] of the original pixel scale from the first blend on; a hue shift drawn first
sees the unclamped values); ``rgb``: on the [0, 1] image, normalised afterwards (the augmentation
torchvision's transforms are written for). docs/DECISIONS.md, "HP's extraction inputs", says why
the default is HP's.

**The draw** is seeded per crop from the extraction seed and the crop's row name in ``feats.json``
(``<image>`` or ``<image>#tl`` ...): the same bytes on a rerun, in any chunking, on Dask, and
whatever other images the folder holds. HP draws anew every epoch; one stored draw per crop is
what extraction once can give (DECISIONS.md says what that changes).
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from .backbone import IMAGENET_MEAN, IMAGENET_STD

# torchvision ColorJitter(0.3, 0.3, 0.3, 0.1): [max(0, 1 - 0.3), 1 + 0.3] and [-0.1, 0.1] (HP build.py 166)
BRIGHTNESS = CONTRAST = SATURATION = (0.7, 1.3)
HUE = (-0.1, 0.1)
GRAYSCALE_P = 0.2            # RandomGrayscale(.2), HP build.py 167
BLUR_P = 0.5                 # RandomApply's default p, HP build.py 168
BLUR_KERNEL = 5              # GaussianBlur((5, 5)), HP build.py 168
BLUR_SIGMA = (0.1, 2.0)      # GaussianBlur's default sigma range
GRAY = (0.2989, 0.587, 0.114)  # torchvision rgb_to_grayscale's weights
SPACES = ("normalised", "rgb")
FILE = "feats_aug.npy"
JITTER = ("brightness", "contrast", "saturation", "hue")   # ColorJitter's fn_idx 0..3


@dataclass(frozen=True)
class Draw:
    """One crop's augmentation: the jitter's order (indices into :data:`JITTER`) and factors,
    grayscale or not, and the blur's sigma (None: no blur)."""
    order: tuple
    brightness: float
    contrast: float
    saturation: float
    hue: float
    grayscale: bool
    blur_sigma: float | None

    def as_dict(self) -> dict:
        return {**asdict(self), "order": [JITTER[i] for i in self.order]}


def generator(seed: int, name: str) -> np.random.Generator:
    """The crop's own generator: seeded by the extraction seed and the sha256 of its row name."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


def draw(seed: int, name: str) -> Draw:
    """The draw of crop ``name`` (its row name in ``feats.json``) under extraction seed ``seed``.
    Every number is drawn, in one fixed order, whether used or not (the blur's sigma too)."""
    rng = generator(seed, name)
    order = tuple(int(i) for i in rng.permutation(4))
    b, c, s = (float(rng.uniform(*r)) for r in (BRIGHTNESS, CONTRAST, SATURATION))
    h = float(rng.uniform(*HUE))
    gray = bool(rng.random() < GRAYSCALE_P)          # RandomGrayscale: rand < p
    blur = not (BLUR_P < rng.random())                # RandomApply: skipped when p < rand
    sigma = float(rng.uniform(*BLUR_SIGMA))
    return Draw(order, b, c, s, h, gray, sigma if blur else None)


# --------------------------------------------------------------------------------------------------
# The transforms, on one float32 image (3, H, W)
# --------------------------------------------------------------------------------------------------
def _f32(v) -> np.float32:
    return np.float32(v)


def grayscale(x: np.ndarray) -> np.ndarray:
    """(3, H, W) -> (1, H, W): 0.2989 R + 0.587 G + 0.114 B."""
    return (_f32(GRAY[0]) * x[0] + _f32(GRAY[1]) * x[1] + _f32(GRAY[2]) * x[2])[None]


def blend(a: np.ndarray, b, f: float) -> np.ndarray:
    """clamp(f a + (1 - f) b, 0, 1)."""
    return np.clip(_f32(f) * a + _f32(1.0 - f) * b, 0.0, 1.0).astype(np.float32)


def adjust_brightness(x, f):
    return blend(x, np.zeros_like(x), f)


def adjust_contrast(x, f):
    return blend(x, grayscale(x).mean(dtype=np.float32), f)


def adjust_saturation(x, f):
    return blend(x, grayscale(x), f)


def rgb_to_hsv(x: np.ndarray) -> np.ndarray:
    """torchvision's tensor RGB -> HSV (Pillow's formulas), for any float values."""
    r, g, b = x
    maxc, minc = x.max(axis=0), x.min(axis=0)
    eqc = maxc == minc
    cr = maxc - minc
    ones = np.ones_like(maxc)
    s = cr / np.where(eqc, ones, maxc)
    crd = np.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (_f32(2.0) + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (_f32(4.0) + gc - rc)
    h = np.fmod((hr + hg + hb) / _f32(6.0) + _f32(1.0), _f32(1.0))
    return np.stack((h, s, maxc)).astype(np.float32)


def hsv_to_rgb(x: np.ndarray) -> np.ndarray:
    """torchvision's tensor HSV -> RGB: p, q, t clamped to [0, 1], v as it is."""
    h, s, v = x
    i = np.floor(h * _f32(6.0))
    f = h * _f32(6.0) - i
    i = i.astype(np.int32) % 6
    one = _f32(1.0)
    p = np.clip(v * (one - s), 0.0, 1.0)
    q = np.clip(v * (one - s * f), 0.0, 1.0)
    t = np.clip(v * (one - s * (one - f)), 0.0, 1.0)
    r = np.choose(i, (v, q, p, p, t, v))
    g = np.choose(i, (t, v, v, q, p, p))
    b = np.choose(i, (p, p, t, v, v, q))
    return np.stack((r, g, b)).astype(np.float32)


def adjust_hue(x, f):
    hsv = rgb_to_hsv(x)
    hsv[0] = np.mod(hsv[0] + _f32(f), _f32(1.0))
    return hsv_to_rgb(hsv)


def gaussian_kernel(sigma: float, size: int = BLUR_KERNEL) -> np.ndarray:
    """(size, size) float32: the outer product of exp(-x² / 2σ²), x = -(size-1)/2 .. (size-1)/2,
    normalised to sum 1."""
    half = (size - 1) * 0.5
    xs = np.linspace(-half, half, size, dtype=np.float32)
    pdf = np.exp(_f32(-0.5) * (xs / _f32(sigma)) ** 2)
    k = pdf / pdf.sum()
    return (k[:, None] * k[None, :]).astype(np.float32)


def gaussian_blur(x: np.ndarray, sigma: float, size: int = BLUR_KERNEL) -> np.ndarray:
    """Each channel convolved with :func:`gaussian_kernel`, reflect padding (x[1], x[0] | x[0] ...)."""
    k = gaussian_kernel(sigma, size)
    r = size // 2
    _, H, W = x.shape
    if H <= r or W <= r:
        raise ValueError(f"a {size}x{size} blur with reflect padding needs images larger than {r} px, got {H}x{W}")
    padded = np.pad(x, ((0, 0), (r, r), (r, r)), mode="reflect")
    out = np.zeros_like(x)
    for dy in range(size):
        for dx in range(size):
            out += k[dy, dx] * padded[:, dy:dy + H, dx:dx + W]
    return out


ADJUST = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def apply(x: np.ndarray, d: Draw) -> np.ndarray:
    """``d`` on one float32 image (3, H, W): the jitter in ``d.order``, then grayscale, then blur."""
    x = np.asarray(x, dtype=np.float32)
    factors = (d.brightness, d.contrast, d.saturation, d.hue)
    for i in d.order:
        x = ADJUST[i](x, factors[i])
    if d.grayscale:
        x = np.repeat(grayscale(x), 3, axis=0)
    if d.blur_sigma is not None:
        x = gaussian_blur(x, d.blur_sigma)
    return np.ascontiguousarray(x, dtype=np.float32)


def to_unit(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1] (ToTensor)."""
    return np.ascontiguousarray(np.moveaxis(rgb.astype(np.float32) / np.float32(255), -1, 0))


def normalise_unit(x: np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1] -> ImageNet mean/std (the same arithmetic as backbone.normalize)."""
    return ((x - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]).astype(np.float32)


def augmented_input(rgb: np.ndarray, seed: int, name: str, space: str = "normalised") -> np.ndarray:
    """The backbone's input for the augmented crop ``rgb`` (H, W, 3) uint8: (3, H, W) float32."""
    d = draw(seed, name)
    if space == "normalised":
        return apply(normalise_unit(to_unit(rgb)), d)
    if space == "rgb":
        return normalise_unit(apply(to_unit(rgb), d))
    raise ValueError(f"augmentation space {space!r}: expected one of {', '.join(SPACES)}")


def record(n_rows: int, h: int, w: int, dim: int, dtype: str, seed: int, space: str) -> dict:
    """The ``feats.json`` field ``augmented``: the file and how its images were made."""
    return {"file": FILE, "shape": [int(n_rows), int(h), int(w), int(dim)], "dtype": str(dtype), "seed": int(seed),
            "space": space, "draws": "one per crop, seeded by the seed and the sha256 of the crop's row name",
            "transforms": {"color_jitter": {"brightness": list(BRIGHTNESS), "contrast": list(CONTRAST),
                                            "saturation": list(SATURATION), "hue": list(HUE), "order": "random"},
                           "grayscale_p": GRAYSCALE_P,
                           "blur": {"p": BLUR_P, "kernel": BLUR_KERNEL, "sigma": list(BLUR_SIGMA),
                                    "padding": "reflect"}},
            "source": "HP @ 8913644 build.py 165-169, applied as dataset/data.py 594 does "
                      + ("(to the normalised image)" if space == "normalised" else "(here: to the [0, 1] image)")}
