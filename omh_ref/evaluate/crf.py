"""Optional dense-CRF refinement of cluster predictions (STEGO's parameters), ``pip install
omh-ref[crf]`` (pydensecrf2, which imports as ``pydensecrf``).

STEGO (``crf.py``): unary from softmax(2 · cosine logits) bilinearly upsampled to the image,
Gaussian pairwise sxy=1 compat=3, bilateral sxy=67 srgb=3 compat=4, 10 mean-field iterations,
on the image's channels in BGR order. Batches run serially or in a process pool; the pool is
bounded by a timeout and terminated when it expires, so a stuck worker never hangs the caller.
"""
from __future__ import annotations

import multiprocessing as mp

import numpy as np

from ..core.errors import InputError

MAX_ITER, POS_W, POS_XY_STD, BI_W, BI_XY_STD, BI_RGB_STD = 10, 3, 1, 4, 67, 3
ALPHA = 2.0   # STEGO's cluster-probe temperature for the CRF's probabilities


def available() -> bool:
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _require():
    if not available():
        raise InputError("--crf: needs the dense-CRF package; install it with pip install 'omh-ref[crf]'")


def refine(image, probs):
    """image (H, W, 3) uint8 RGB; probs (K, H, W) class probabilities -> refined (K, H, W)."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    K, H, W = probs.shape
    if image.shape[:2] != (H, W):
        raise InputError(f"crf: image {image.shape[:2]} and probabilities {(H, W)} differ in size")
    d = dcrf.DenseCRF2D(W, H, K)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs.astype(np.float32))))
    d.addPairwiseGaussian(sxy=POS_XY_STD, compat=POS_W)
    d.addPairwiseBilateral(sxy=BI_XY_STD, srgb=BI_RGB_STD, compat=BI_W,
                           rgbim=np.ascontiguousarray(image[:, :, ::-1]))
    return np.asarray(d.inference(MAX_ITER), dtype=np.float32).reshape(K, H, W)


def probs_from_logits(logits):
    """(H, W, K) cosine logits -> (K, H, W) softmax(ALPHA · logits), as STEGO feeds its CRF."""
    x = ALPHA * np.moveaxis(np.asarray(logits, dtype=np.float64), -1, 0)
    x = np.exp(x - x.max(axis=0, keepdims=True))
    return x / x.sum(axis=0, keepdims=True)


def _one(args):
    image, logits = args
    return refine(image, probs_from_logits(logits)).argmax(axis=0)


def refine_batch(images, logits, workers=1, timeout=600.0):
    """CRF-refined label maps (N, H, W) for images (N, H, W, 3) and logits (N, H, W, K).

    workers <= 1: serial. Otherwise a process pool; if it has not finished within ``timeout``
    seconds the pool is terminated and an InputError says so (never a hang)."""
    return np.stack(refine_all(list(zip(images, logits)), workers, timeout))


def refine_all(jobs, workers=1, timeout=600.0) -> list:
    """:func:`refine_batch` for ``[(image (H, W, 3), logits (H, W, K))]`` whose sizes may differ
    (segmentation's whole images): a list of (H, W) label maps, same pool and timeout."""
    _require()
    if workers <= 1 or len(jobs) <= 1:
        return [_one(j) for j in jobs]
    ctx = mp.get_context("spawn")   # no fork of a process that may hold BLAS threads
    pool = ctx.Pool(min(workers, len(jobs)))
    try:
        res = pool.map_async(_one, jobs).get(timeout)
    except mp.TimeoutError:
        raise InputError(f"--crf: {len(jobs)} images not refined within {timeout:.0f} s; use fewer "
                         "--crf-workers or a larger --crf-timeout") from None
    finally:
        pool.terminate()
        pool.join()
    return list(res)
