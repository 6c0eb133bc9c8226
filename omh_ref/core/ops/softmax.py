"""Softmax with temperature over the last axis."""
from ..backend import get_array_module


def forward(x, tau=1.0):
    """p = softmax(x / τ) over the last axis (max-shifted, so any finite x is safe)."""
    xp = get_array_module(x)
    t = x / x.dtype.type(tau)
    e = xp.exp(t - xp.max(t, axis=-1, keepdims=True))
    p = e / xp.sum(e, axis=-1, keepdims=True)
    return p, (p, tau)


def backward(dp, cache):
    """dx = p (dp − <dp, p>) / τ."""
    p, tau = cache
    xp = get_array_module(dp)
    return p * (dp - xp.sum(dp * p, axis=-1, keepdims=True)) / p.dtype.type(tau)
