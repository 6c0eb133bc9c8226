"""Euclidean distance between paired vectors, with torch's ``PairwiseDistance`` eps (p = 2).

HP's consistency term is the mean over pixels of ``‖ẑ_i − ẑ′_i + 1e-6‖₂`` between the projected
codes of an image and of its augmented copy (docs/hp_reading.md §8; torch's
``F.pairwise_distance`` adds eps to the difference, not to the norm).
"""
from ..backend import get_array_module

EPS = 1e-6   # torch.nn.PairwiseDistance's default


def forward(a, b, eps=EPS):
    """d = ‖a − b + eps‖₂ over the last axis. a, b (..., D) -> d (...)."""
    if a.shape != b.shape:
        raise ValueError(f"pairwise_distance: a and b must have one shape, got {a.shape} and {b.shape}")
    xp = get_array_module(a, b)
    diff = a - b + a.dtype.type(eps)                       # ...,D
    d = xp.sqrt(xp.sum(diff * diff, axis=-1))              # ...
    return d, (diff, d)


def backward(dd, cache):
    """-> (da, db): da = (a − b + eps)/d · dd, db = −da; 0 where d = 0 (torch's norm subgradient)."""
    diff, d = cache
    xp = get_array_module(diff)
    safe = xp.where(d > 0, d, 1)
    g = diff * (dd / safe)[..., None]
    return g, -g
