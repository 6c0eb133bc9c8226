"""Channel dropout (torch's Dropout2d on a channels-last grid): whole channels of an image are zeroed."""
from ..backend import get_array_module


def channel_mask(shape, p, rng, like):
    """Keep-mask for x of ``shape`` (N, ..., C): one Bernoulli(1-p) draw per (image, channel),
    scaled by 1/(1-p) so the expectation is unchanged. Drawn on the host from ``rng``."""
    xp = get_array_module(like)
    N, C = shape[0], shape[-1]
    keep = rng.random((N, C)) >= p
    mask = keep.astype(like.dtype) / like.dtype.type(1.0 - p)
    return xp.asarray(mask.reshape((N,) + (1,) * (len(shape) - 2) + (C,)))


def forward(x, p, rng=None, training=True, mask=None):
    """y = x * mask with mask (N, 1.., C) from :func:`channel_mask` (or given).

    Identity when not training or p == 0 (no draw is made, so the generator is untouched).
    """
    if not training or p == 0:
        return x, None
    if not 0 <= p < 1:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    if mask is None:
        mask = channel_mask(x.shape, p, rng, x)
    return x * mask, mask


def backward(dy, cache):
    """-> dx."""
    mask = cache
    return dy if mask is None else dy * mask
