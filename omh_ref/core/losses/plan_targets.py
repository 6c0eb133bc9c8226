"""The parent level's cluster targets predicted through the hierarchy from the child level.

q = p_child A (the child assignment pushed through the row-normalised plan) is scored against the
parent level's own no-gradient cluster targets Q_parent (its OT or hard targets) by cross-entropy,

    L = −mean_pixels Σ_k Q_k log q_k,

in place of the KL to the parent's assignment (``Config.hier_form = "targets"``): the coarse
level's targets are to be predicted from the finer level through the plan, so the gradient reaches
the child assignment and the plan, not the parent's assignment. log q is floored at the dtype's
smallest normal number (an underflowed q_k with Q_k = 0 costs nothing).
"""
from ..backend import get_array_module


def forward(q, Q):
    """q (P, K) predicted distributions, Q (P, K) targets (rows summing to 1). -> (loss, cache)."""
    xp = get_array_module(q, Q)
    qf = xp.maximum(q, xp.finfo(q.dtype).tiny)
    return -(Q * xp.log(qf)).sum() / q.shape[0], (Q, qf)


def backward(dloss, cache):
    """-> (dq, dQ): dq = −dloss Q / (P q); the targets carry no gradient (dQ = 0)."""
    Q, qf = cache
    return (-Q.dtype.type(dloss / Q.shape[0])) * Q / qf, 0
