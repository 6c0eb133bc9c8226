"""Adam over a flat params dict (one loop; state in plain dicts so checkpoints can hold it)."""
import math

import numpy as np

from .backend import get_array_module
from .errors import NonFiniteError


def adam_init(params) -> dict:
    """Zero first and second moments with the params' shapes, dtypes and device; t = 0."""
    xp = get_array_module(*params.values())
    return {"t": 0,
            "m": {k: xp.zeros_like(p) for k, p in params.items()},
            "v": {k: xp.zeros_like(p) for k, p in params.items()}}


def squared_norm(grads):
    """Σ over every gradient of its squared entries: a 0-d array on the gradients' device, NaN or
    inf when any entry is (or when a square overflows the dtype)."""
    with np.errstate(over="ignore", invalid="ignore"):   # an overflow is reported, not warned about
        return sum(get_array_module(g).sum(g * g) for g in grads.values())


def adam_step(params, grads, state, lr, betas=(0.9, 0.999), eps=1e-8):
    """One in-place Adam update (torch.optim.Adam's formula, no weight decay).

    lr is a float or a dict key -> float (e.g. a larger rate for the centroids). Gradients with a
    NaN or inf (their squared norm, one scalar read back per step, is not finite) raise
    :class:`~omh_ref.core.errors.NonFiniteError` before anything changes: parameters and moments
    stay as they were. Finite gradients keep both finite (a step moves a parameter by at most a few
    lr), so this one check guards the parameters too. -> the squared norm (a float)."""
    norm2 = float(squared_norm(grads))
    if not math.isfinite(norm2):
        bad = [k for k, g in grads.items() if not bool(get_array_module(g).isfinite(g).all())]
        raise NonFiniteError(f"gradient squared norm {norm2}: "
                             + (f"non-finite entries in {', '.join(bad)}" if bad else "an overflow"))
    b1, b2 = betas
    state["t"] += 1
    t = state["t"]
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    xp = get_array_module(*params.values())
    for k, p in params.items():
        g = grads[k]
        m, v = state["m"][k], state["v"][k]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * (g * g)
        rate = lr[k] if isinstance(lr, dict) else lr
        p -= (rate / c1) * m / (xp.sqrt(v / c2) + eps)
    return norm2
