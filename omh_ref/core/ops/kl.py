"""KL divergence between distributions over the last axis."""
from ..backend import get_array_module


def forward(q, logp):
    """kl = Σ_k q_k (log q_k − log p_k) over the last axis.

    q (..., K) a distribution with q > 0 (entries are floored at the dtype's smallest normal
    number inside the log, so an underflowed 0 costs nothing and gives no -inf);
    logp (..., K) log-probabilities. -> kl (...,).
    """
    xp = get_array_module(q, logp)
    logq = xp.log(xp.maximum(q, xp.finfo(q.dtype).tiny))
    diff = logq - logp
    return xp.sum(q * diff, axis=-1), (q, diff)


def backward(dkl, cache):
    """-> (dq, dlogp): dq = dkl (log q − log p + 1), dlogp = −dkl q."""
    q, diff = cache
    d = dkl[..., None]
    return d * (diff + 1), -d * q
