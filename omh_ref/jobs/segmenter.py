"""Segmentation of whole images: an image of any size and aspect in, masks at its own size out.
The Python API that ``omh-ref segment`` (:mod:`.segment`) and notebooks share::

    from omh_ref.jobs.segmenter import Segmenter
    seg = Segmenter("dino_vits8_224.onnx", "ckpt.npz", levels="all", flip=True)
    masks = seg.segment("photo.jpg")        # or an (H, W, 3) uint8 array
    masks.clusters, masks.levels, masks.classes

The path (docs/METHOD.md section 7; the choices in docs/DECISIONS.md):

1. **Canvas.** The image is resized so that its short side is ``resolution`` px (NEAREST,
   torchvision's size rule, as extraction: :func:`omh_ref.extract.images.resize_short`), then its
   bottom and right edges are padded by replication to whole patches.
2. **Backbone.** One pass over the canvas when the model takes any input size; otherwise square
   windows of the model's input size at whole-patch offsets, evenly spread, neighbours overlapping
   by at least a quarter of a window, so that every window's feature grid lies on the canvas's
   patch grid. Windows of several images share forward batches of ``batch_size``.
3. **Blend.** The code of each patch (projection head, L2-normalised: ẑ) is averaged over the
   windows that cover it with weights that fall linearly to zero across each overlap with a
   neighbour (a cross-fade: the two weights sum to 1), divided by the sum of weights. Cosine logits
   are linear in ẑ, so this blends every level's logits.
4. **Upsample.** Each level's logits ẑ·m̂ᵀ on the patch grid are bilinearly upsampled
   (align_corners=False geometry) to the image's own height and width, over the part of the grid
   that lies on the image (the padding is not stretched over it), in bands of rows, then argmax.
5. **Flip** (optional): the same for the mirrored image; its upsampled logits are mirrored back and
   averaged. Symmetric by construction: segmenting the mirrored image gives the mirrored masks.
6. **CRF** (optional): the eval level's averaged full-size logits refined by the dense CRF on the
   image itself (:mod:`.crf`, same timeout guarantee as evaluation).

Memory: one batch of images, their canvases' codes (a patch grid each) and one band of upsampled
logits are held at a time; a full-size (H, W, K) array only with ``crf`` (the CRF needs it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..core import head
from ..core.model import predictor
from ..core.backend import get_array_module, resolve_device, to_device, to_host
from ..core.errors import InputError
from ..core.files import file_sha256
from ..core.ops import normalize as l2, resize
from ..evaluate import matching, pictures
from ..evaluate.hierarchy import hierarchy_plans
from ..extract.backbone import inspect_model, normalize, run, session
from ..extract.datasets import ImageError, read_rgb
from ..extract.images import short_side_size
from ..features import provenance
from ..train.checkpoint import backbone_of, load_params

DEFAULT_RESOLUTION = 224     # a model whose input size is free
MAX_ASPECT = 32              # long / short side: beyond, an image is refused (its canvas would be huge)
BAND_BYTES = 2 << 20         # upsampled logits held at once (2 MiB: a band stays in cache)
WINDOW_MODES = ("auto", "always")
LEVEL_MODES = ("eval", "all")


# --------------------------------------------------------------------------------------------------
# Geometry: canvas, windows, blending weights, upsampling
# --------------------------------------------------------------------------------------------------
def window_offsets(G: int, g: int) -> tuple:
    """Offsets (in patches) of windows of ``g`` patches covering ``G >= g``: the fewest windows
    whose neighbours overlap by at least ``g // 4`` patches, evenly spread, the first at 0 and the
    last at ``G - g``."""
    if G < g:
        raise ValueError(f"a side of {G} patches cannot hold a window of {g}")
    if G == g:
        return (0,)
    m = g // 4
    n = max(2, -(-(G - m) // (g - m)))
    return tuple(i * (G - g) // (n - 1) for i in range(n))


def ramps(offsets, g: int) -> np.ndarray:
    """(n, g) blending weights of windows at ``offsets``: 1 inside, falling linearly across each
    overlap ``v`` with a neighbour (``(i + 0.5) / v`` from the start, ``(g - i - 0.5) / v``
    towards the end), so that where two windows overlap their weights sum to exactly 1. Every
    weight is positive; where more than two overlap the blend divides by the sum anyway."""
    n = len(offsets)
    c = np.arange(g) + 0.5
    out = np.ones((n, g))
    for i, o in enumerate(offsets):
        if i > 0 and (v := offsets[i - 1] + g - o) > 0:
            out[i] = np.minimum(out[i], c / v)
        if i < n - 1 and (v := o + g - offsets[i + 1]) > 0:
            out[i] = np.minimum(out[i], (g - c) / v)
    return out


@dataclass(frozen=True)
class Layout:
    """Where an image of ``size`` = (H, W) goes: resized to ``resized`` (short side = resolution),
    padded to the canvas of ``grid`` = (Gh, Gw) patches of ``patch`` px, covered by one pass
    (``window`` None) or by windows of ``window`` patches at ``rows`` x ``cols`` offsets."""
    size: tuple
    resized: tuple
    grid: tuple
    patch: int
    window: int | None
    rows: tuple
    cols: tuple

    @property
    def canvas(self) -> tuple:
        return self.grid[0] * self.patch, self.grid[1] * self.patch

    @property
    def windows(self) -> list:
        """[(row, col)] offsets in patches, row-major; [(0, 0)] for one pass."""
        return [(r, c) for r in self.rows for c in self.cols]

    def weights(self):
        """(per-window (g, g) weights in :attr:`windows` order, (Gh, Gw) sum of weights), or
        (None, None) for one pass."""
        if self.window is None:
            return None, None
        wr, wc = ramps(self.rows, self.window), ramps(self.cols, self.window)
        per = [wr[i][:, None] * wc[j][None, :] for i in range(len(self.rows)) for j in range(len(self.cols))]
        sr, sc = np.zeros(self.grid[0]), np.zeros(self.grid[1])
        for o, w in zip(self.rows, wr):
            sr[o:o + self.window] += w
        for o, w in zip(self.cols, wc):
            sc[o:o + self.window] += w
        return per, sr[:, None] * sc[None, :]

    def upsample_matrices(self, xp, dtype):
        """(Rh (H, Gh), Rw (W, Gw)): bilinear interpolation (align_corners=False geometry) from the
        patch grid to the image's own pixels, over the ``resized / patch`` cells that lie on the
        image (the rest is padding)."""
        (H, W), (h, w), (Gh, Gw), p = self.size, self.resized, self.grid, self.patch
        return (resize.resize_matrix(H, Gh, xp, dtype, extent=h / p),
                resize.resize_matrix(W, Gw, xp, dtype, extent=w / p))


def layout(size, resolution: int, patch: int, window: int | None) -> Layout:
    """The :class:`Layout` of an image of ``size`` = (H, W): short side ``resolution``, windows of
    ``window`` px (a multiple of ``patch``) or one pass (None)."""
    H, W = size
    w, h = short_side_size((W, H), resolution)
    grid = (-(-h // patch), -(-w // patch))
    if window is None:
        return Layout((H, W), (h, w), grid, patch, None, (0,), (0,))
    g = window // patch
    return Layout((H, W), (h, w), grid, patch, g, window_offsets(grid[0], g), window_offsets(grid[1], g))


def canvas_image(rgb: np.ndarray, lay: Layout) -> np.ndarray:
    """(Hc, Wc, 3) uint8: ``rgb`` resized (NEAREST, torchvision's rule) and edge-padded to whole patches."""
    img = Image.fromarray(np.ascontiguousarray(rgb))
    h, w = lay.resized
    if (w, h) != img.size:
        img = img.resize((w, h), Image.NEAREST)
    arr = np.asarray(img)
    Hc, Wc = lay.canvas
    if (Hc, Wc) != (h, w):
        arr = np.pad(arr, ((0, Hc - h), (0, Wc - w), (0, 0)), mode="edge")
    return arr


def as_rgb(image, name="image") -> np.ndarray:
    """An (H, W, 3) uint8 array from a path (read as extraction reads it) or an array: (H, W) gray,
    (H, W, 3) RGB or (H, W, 4) RGBA, uint8. Anything else is an InputError naming ``name``."""
    if isinstance(image, (str, Path)):
        try:
            return np.asarray(read_rgb(image))
        except ImageError as e:
            raise InputError(str(e)) from None
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise InputError(f"{name}: expected an (H, W, 3) uint8 RGB array (or (H, W) gray, (H, W, 4) RGBA), "
                         f"got {arr.dtype} {arr.shape}")
    if min(arr.shape[:2]) < 1:
        raise InputError(f"{name}: empty image of shape {arr.shape}")
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def check_aspect(size, name="image"):
    """An image too elongated to segment (long / short side > ``MAX_ASPECT``): an ImageError."""
    H, W = size
    if max(H, W) > MAX_ASPECT * min(H, W):
        raise ImageError(f"{name}: {W}x{H} px is too elongated to segment (long side more than "
                         f"{MAX_ASPECT} times the short one)")


def id_dtype(n: int):
    """The mask dtype for ids 0..n-1: uint8 while they fit, else uint16."""
    if n > 65536:
        raise InputError(f"{n} ids do not fit a 16-bit mask")
    return np.uint8 if n <= 256 else np.uint16


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------
@dataclass
class Masks:
    """The segmentation of one image, every map (H, W) at the image's own size.

    clusters: eval-level cluster ids (CRF-refined with ``crf``), uint8 or uint16 (K > 256);
    levels: per-level cluster ids, finest first (``levels="all"``), the eval level's included
    (without the CRF); classes: class ids through a match (``match``), ``unmatched`` where the
    cluster has no class."""
    clusters: np.ndarray
    levels: list | None = None
    classes: np.ndarray | None = None
    unmatched: int | None = None


class Segmenter:
    """A backbone (.onnx) and a checkpoint, ready to segment images (:meth:`segment`,
    :meth:`segment_batch`). Everything is checked here, before any image is read: the device, the
    resolution against the model, the checkpoint's feature size against the backbone's output,
    the match against the checkpoint.

    resolution: the short side in px (default: the model's input size, 224 for a dynamic model);
    windows: "auto" (one pass when the model takes any size, else windows) or "always";
    levels: "eval" or "all" (also every level's mask); flip, crf: as ``omh-ref eval``;
    match: a match file (``omh-ref eval --save-match``); batch_size: windows per forward pass;
    allow_backbone_mismatch: go on (saying so) when the model is another backbone than the one
    the checkpoint's training features came from (refused otherwise)."""

    def __init__(self, model, checkpoint, resolution=None, windows="auto", levels="eval", flip=False, crf=False,
                 crf_workers=1, crf_timeout=600.0, match=None, device="cpu", batch_size=8, threads=None,
                 allow_backbone_mismatch=False, say=print):
        for flag, v, allowed in (("--windows", windows, WINDOW_MODES), ("--levels", levels, LEVEL_MODES)):
            if v not in allowed:
                raise InputError(f"{flag}: expected one of {', '.join(allowed)}, got {v!r}")
        for flag, v in (("--batch-size", batch_size), ("--crf-workers", crf_workers)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise InputError(f"{flag}: expected a positive integer, got {v!r}")
        if resolution is not None and (not isinstance(resolution, (int, np.integer)) or resolution < 1):
            raise InputError(f"--resolution: expected a positive number of pixels, got {resolution!r}")
        if not crf_timeout > 0:
            raise InputError(f"--crf-timeout: expected a positive number of seconds, got {crf_timeout!r}")
        try:
            resolve_device(device)
        except ValueError as e:
            raise InputError(str(e)) from None
        if crf:
            from ..evaluate import crf as crf_mod

            crf_mod._require()
        for flag, p, what in (("--model", model, "an .onnx backbone made by omh-ref export"),
                              ("--checkpoint", checkpoint, "a ckpt.npz written by omh-ref train")):
            if not Path(p).is_file():
                raise InputError(f"{p}: no such file (expected {flag} to be {what})")
        self.params, self.cfg = load_params(checkpoint, device)
        ins = session(model, device, threads).get_inputs()
        free = len(ins) == 1 and len(ins[0].shape) == 4 and not any(isinstance(d, int) for d in ins[0].shape[2:])
        self.bb = inspect_model(model, (resolution or DEFAULT_RESOLUTION) if free else None, device, threads)
        if self.bb.dynamic:
            res = self.bb.resolution
            self.window = res if windows == "always" else None
        else:
            res = resolution or self.bb.resolution
            if res < self.bb.resolution:
                raise InputError(f"--resolution {res}: smaller than the {self.bb.resolution} px input of {model} "
                                 "(the short side must fill a window)")
            self.window = self.bb.resolution
        C = self.params["W1"].shape[1]
        if C != self.bb.dim:
            raise InputError(f"{checkpoint}: its head takes C={C} features, but {model} gives C={self.bb.dim} "
                             "(a checkpoint trained on another backbone's features)")
        mine = self.bb.provenance()
        note = provenance.random_note(mine, f"the features of {model}")
        if note:
            say(note)
        provenance.require_same(backbone_of(checkpoint), mine, given_what=f"the --model {model}'s features",
                                trained_what=f"{checkpoint}'s training features", allow=allow_backbone_mismatch,
                                say=say)
        self.model, self.checkpoint = str(model), str(checkpoint)
        self.resolution, self.windows_mode, self.levels_mode = int(res), windows, levels
        self.flip, self.crf, self.crf_workers, self.crf_timeout = bool(flip), bool(crf), crf_workers, crf_timeout
        self.device, self.batch_size, self.threads = device, int(batch_size), threads
        self.sess = session(model, device, threads)
        self.level_sizes = tuple(self.cfg.levels)
        self.eval_level = self.cfg.eval_index
        self.centroids = [l2.forward(self.params[predictor(self.cfg, i)])[0] for i in range(len(self.level_sizes))]
        self.checkpoint_sha256 = file_sha256(checkpoint)
        self.match = None
        if match is not None:
            self.match = matching.load(match, self.checkpoint_sha256, self.level_sizes[self.eval_level])
            self.match_path = str(match)

    # ---- what decides the masks, and how to draw them -------------------------------------------
    @property
    def n_clusters(self) -> int:
        return self.level_sizes[self.eval_level]

    @property
    def settings(self) -> dict:
        """Every setting that decides the masks (a resumed run must match them)."""
        return {"checkpoint_sha256": self.checkpoint_sha256, "backbone_sha256": self.bb.sha256,
                "resolution": self.resolution, "window": self.window, "patch": self.bb.patch,
                "windows": self.windows_mode, "flip": self.flip, "crf": self.crf, "levels": self.levels_mode,
                "match_sha256": file_sha256(self.match_path) if self.match is not None else None}

    def palettes(self) -> list:
        """One (K_l, 3) palette per level, children in shades of their parent's colour
        (:func:`omh_ref.evaluate.pictures.hierarchy_palettes`, parents from the learned plans)."""
        return pictures.hierarchy_palettes(self.level_sizes, hierarchy_plans(self.params, self.cfg))

    def class_palette(self):
        """(n_classes, 3) colours of the match's classes, those of ``omh-ref eval``'s pictures
        (:func:`omh_ref.evaluate.pictures.palette`); None without a match."""
        return None if self.match is None else pictures.palette(self.match["n_classes"])

    def layout(self, size) -> Layout:
        return layout(size, self.resolution, self.bb.patch, self.window)

    # ---- segmentation ---------------------------------------------------------------------------
    def segment(self, image) -> Masks:
        """The :class:`Masks` of one image (a path or an array, see :func:`as_rgb`)."""
        return self.segment_batch([image])[0]

    def segment_batch(self, images) -> list:
        """:class:`Masks` of a list of images, their windows sharing forward batches."""
        rgbs = [as_rgb(im, f"image {i}") for i, im in enumerate(images)]
        for i, r in enumerate(rgbs):
            try:
                check_aspect(r.shape[:2], f"image {i}")
            except ImageError as e:
                raise InputError(str(e)) from None
        lays = [self.layout(r.shape[:2]) for r in rgbs]
        codes = self.canvas_codes(rgbs, lays)
        out, crf_jobs = [], []
        for rgb, lay, (z, zf) in zip(rgbs, lays, codes):
            want = range(len(self.level_sizes)) if self.levels_mode == "all" else [self.eval_level]
            ids, full = {}, None
            for lvl in want:
                keep = self.crf and lvl == self.eval_level
                ids[lvl], f = self._upsampled_ids(z, zf, lvl, lay, keep)
                full = f if keep else full
            m = Masks(ids[self.eval_level],
                      [ids[lvl] for lvl in range(len(self.level_sizes))] if self.levels_mode == "all" else None)
            if self.crf:
                crf_jobs.append((rgb, to_host(full)))
            out.append(m)
        if self.crf:
            from ..evaluate import crf as crf_mod

            dt = id_dtype(self.n_clusters)
            for m, refined in zip(out, crf_mod.refine_all(crf_jobs, self.crf_workers, self.crf_timeout)):
                m.clusters = refined.astype(dt)
        if self.match is not None:
            n = self.match["n_classes"]
            unmatched = 255 if n < 255 else 65535
            lut = np.where(self.match["lut"] < 0, unmatched, self.match["lut"]).astype(id_dtype(unmatched + 1))
            for m in out:
                m.classes, m.unmatched = lut[m.clusters], unmatched
        return out

    def codes(self, image, flipped=False) -> np.ndarray:
        """The blended code ẑ (Gh, Gw, D) of one image's canvas (of its mirror image with
        ``flipped``), on the host: what the logits of every level are computed from."""
        rgb = as_rgb(image)
        z, zf = self.canvas_codes([rgb], [self.layout(rgb.shape[:2])])[0]
        return to_host(zf if flipped else z)

    def logits(self, image, level=None) -> np.ndarray:
        """The (H, W, K) logits of one level (default: the eval level) at the image's own size,
        flip-averaged with ``flip``: what the argmax of :meth:`segment` is taken of (no CRF)."""
        rgb = as_rgb(image)
        lay = self.layout(rgb.shape[:2])
        z, zf = self.canvas_codes([rgb], [lay])[0]
        lvl = self.eval_level if level is None else level % len(self.level_sizes)
        return to_host(self._upsampled_ids(z, zf, lvl, lay, keep=True)[1])

    def canvas_codes(self, rgbs, lays) -> list:
        """[(ẑ (Gh, Gw, D), ẑ of the mirror image or None)] on the device. The mirror images run
        in forward batches of their own, shaped as the originals' (so the mirror image's own
        segmentation runs exactly the computation its flip view does)."""
        views = [rgbs] + ([[r[:, ::-1] for r in rgbs]] if self.flip else [])
        out = [[None, None] for _ in rgbs]
        for v, imgs in enumerate(views):
            for i, z in enumerate(self._view_codes(imgs, lays)):
                out[i][v] = z
        return [tuple(o) for o in out]

    def _view_codes(self, imgs, lays) -> list:
        p = self.bb.patch
        crops, weights, sums = {}, [], []
        for i, (img, lay) in enumerate(zip(imgs, lays)):
            canvas = canvas_image(img, lay)
            per, total = lay.weights()
            weights.append(per)
            sums.append(total)
            side = None if lay.window is None else lay.window * p
            for k, (r, c) in enumerate(lay.windows):
                crop = canvas if side is None else canvas[r * p:r * p + side, c * p:c * p + side]
                crops.setdefault(crop.shape, []).append((i, k, r, c, crop))
        dt = self.params["W1"].dtype
        acc = [None] * len(imgs)
        for group in crops.values():   # crops of one shape (windows; or equal canvases in one pass)
            for s in range(0, len(group), self.batch_size):
                chunk = group[s:s + self.batch_size]
                f = run(self.sess, self.bb, normalize(np.stack([c[4] for c in chunk])))
                z = l2.forward(head.forward(self.params, to_device(f.astype(dt, copy=False), self.device),
                                             self.cfg.head_activation)[0])[0]
                xp = get_array_module(z)
                for (i, k, r, c, _), zk in zip(chunk, z):
                    if weights[i] is None:
                        acc[i] = zk
                        continue
                    if acc[i] is None:
                        acc[i] = xp.zeros(lays[i].grid + (zk.shape[-1],), dtype=zk.dtype)
                    g = lays[i].window
                    acc[i][r:r + g, c:c + g] += xp.asarray(weights[i][k], dtype=zk.dtype)[..., None] * zk
        for i, lay in enumerate(lays):
            if sums[i] is not None:
                xp = get_array_module(acc[i])
                acc[i] = acc[i] / xp.asarray(sums[i], dtype=acc[i].dtype)[..., None]
        return acc

    def _upsampled_ids(self, z, zf, lvl, lay, keep=False):
        """(ids (H, W) of the argmax, the (H, W, K) logits if ``keep`` else None) of level ``lvl``.

        Separable: the logits on the grid (Gh, Gw, K) are first upsampled along the columns to the
        image's width (a small matmul, (Gh, W, K)), averaged there with the mirror image's mirrored
        back (the average of the full-size logits, since the rows' interpolation is linear and acts
        on each column alike), then along the rows band by band, two taps per output row (the
        interpolation matrix's two non-zero weights), and reduced by argmax before the next band."""
        xp = get_array_module(z)
        M = self.centroids[lvl]
        K = M.shape[0]
        Gh, Gw, D = z.shape
        Rh, Rw = lay.upsample_matrices(xp, z.dtype)
        c = xp.matmul(Rw, (z.reshape(-1, D) @ M.T).reshape(Gh, Gw, K))        # Gh, W, K
        if zf is not None:
            cf = xp.matmul(Rw, (zf.reshape(-1, D) @ M.T).reshape(Gh, Gw, K))
            c = (c + cf[:, ::-1]) * 0.5
        i0, i1, w0, w1 = _taps(Rh)
        H, W = lay.size
        band = max(1, BAND_BYTES // (W * K * z.dtype.itemsize))
        ids = np.empty((H, W), id_dtype(K))
        full = xp.empty((H, W, K), z.dtype) if keep else None
        for r0 in range(0, H, band):
            r = slice(r0, r0 + band)
            y = c[i0[r]] * w0[r, None, None]
            y += c[i1[r]] * w1[r, None, None]                                     # b, W, K
            ids[r] = to_host(y.argmax(axis=-1))
            if keep:
                full[r] = y
        return ids, full


def _taps(R):
    """(i0, i1, w0, w1): the two non-zero entries of each row of a bilinear interpolation matrix
    (R[r, i0] and R[r, i1], i1 = i0 + 1; w1 = 0 where the row has one, at the last column)."""
    xp = get_array_module(R)
    n = R.shape[1]
    i0 = (R > 0).argmax(axis=1)
    i1 = xp.minimum(i0 + 1, n - 1)
    rows = xp.arange(R.shape[0])
    return i0, i1, R[rows, i0], xp.where(i1 > i0, R[rows, i1], 0).astype(R.dtype)
