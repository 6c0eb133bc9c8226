"""Per-vector L2 normalisation over the last axis (torch.nn.functional.normalize semantics)."""
from ..backend import get_array_module

EPS = 1e-12  # torch's default: x / max(||x||, eps), so a zero vector maps to zero, not NaN


def forward(x, eps=EPS):
    """y = x / max(||x||, eps) over the last axis. x (..., C) -> y (..., C)."""
    xp = get_array_module(x)
    n = xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True))   # ...,1
    n = xp.maximum(n, x.dtype.type(eps))
    y = x / n
    return y, (y, n, eps)


def backward(dy, cache):
    """dx = (dy − y <dy, y>) / ||x|| where ||x|| > eps, else dy / eps (the clamp has no gradient)."""
    y, n, eps = cache
    xp = get_array_module(dy)
    proj = xp.sum(dy * y, axis=-1, keepdims=True)
    active = n > eps
    return xp.where(active, dy - y * proj, dy) / n
