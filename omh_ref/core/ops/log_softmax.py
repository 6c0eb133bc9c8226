"""Log-softmax with temperature over the last axis."""
from ..backend import get_array_module, logsumexp


def forward(x, tau=1.0):
    """l = x/τ − logsumexp(x/τ) over the last axis. Also returns p = exp(l) in the cache."""
    xp = get_array_module(x)
    t = x / x.dtype.type(tau)
    logp = t - logsumexp(t, axis=-1)[..., None]
    return logp, (xp.exp(logp), tau)


def backward(dlogp, cache):
    """dx = (dl − p Σ dl) / τ."""
    p, tau = cache
    xp = get_array_module(dlogp)
    return (dlogp - p * xp.sum(dlogp, axis=-1, keepdims=True)) / p.dtype.type(tau)
