"""Adam over a flat params dict (one loop; state in plain dicts so checkpoints can hold it)."""
import math

import numpy as np

from .backend import get_array_module, to_host
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


def adam_step(params, grads, state, lr, betas=(0.9, 0.999), eps=1e-8, ok=None):
    """One in-place Adam update (torch.optim.Adam's formula, no weight decay).

    lr is a float or a dict key -> float (e.g. a larger rate for the centroids).

    Non-finite gradients (their squared norm is not finite) never change anything. Two ways:

    * ``ok=None`` (checked): the norm is read back (one synchronisation) and a non-finite one
      raises :class:`~omh_ref.core.errors.NonFiniteError` before anything changes. -> the squared
      norm (a float).
    * ``ok`` a 0-d boolean on the device (guarded, the training loop's way, no synchronisation):
      the update is applied only where ``ok`` holds and the gradients are finite; otherwise
      parameters and moments keep their values, bit for bit. -> the new ``ok`` (``ok`` and finite),
      so a loop that carries it freezes the state from the first bad step until it looks.
    Finite gradients keep parameters and moments finite (a step moves a parameter by at most a few
    lr), so the gradients' norm guards both."""
    b1, b2 = betas
    xp = get_array_module(*params.values())
    if ok is None:
        norm2 = float(to_host(squared_norm(grads)))
        if not math.isfinite(norm2):
            bad = [k for k, g in grads.items() if not bool(to_host(get_array_module(g).isfinite(g).all()))]
            raise NonFiniteError(f"gradient squared norm {norm2}: "
                                 + (f"non-finite entries in {', '.join(bad)}" if bad else "an overflow"))
    else:
        ok = ok & xp.isfinite(squared_norm(grads))
    state["t"] += 1
    t = state["t"]
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    for k, p in params.items():
        g = grads[k]
        m, v = state["m"][k], state["v"][k]
        rate = lr[k] if isinstance(lr, dict) else lr
        if ok is None:
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * (g * g)
            p -= (rate / c1) * m / (xp.sqrt(v / c2) + eps)
        else:   # the same arithmetic, kept only where ok holds
            with np.errstate(invalid="ignore", over="ignore"):
                m_new = m * b1 + (1 - b1) * g
                v_new = v * b2 + (1 - b2) * (g * g)
                upd = (rate / c1) * m_new / (xp.sqrt(v_new / c2) + eps)
            m[...] = xp.where(ok, m_new, m)
            v[...] = xp.where(ok, v_new, v)
            p -= xp.where(ok, upd, 0)
    return norm2 if ok is None else ok
