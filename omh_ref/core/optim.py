"""Adam over a flat params dict (one loop; state in plain dicts so checkpoints can hold it), with
AdamW's decoupled weight decay and global-norm gradient clipping where a base asks for them (HP)."""
import math

import numpy as np

from .backend import cupy_kernel, fusing, get_array_module, is_cupy, to_host
from .errors import NonFiniteError


def adam_init(params) -> dict:
    """Zero first and second moments with the params' shapes, dtypes and device; t = 0."""
    xp = get_array_module(*params.values())
    return {"t": 0,
            "m": {k: xp.zeros_like(p) for k, p in params.items()},
            "v": {k: xp.zeros_like(p) for k, p in params.items()}}


def squared_norm(grads):
    """Σ over every gradient of its squared entries: a 0-d array on the gradients' device, NaN or
    inf when any entry is (or when a square overflows the dtype). On CuPy one reduction kernel a
    gradient (NumPy: a product and a sum), then one stack and one sum of those."""
    xp = get_array_module(*grads.values())
    with np.errstate(over="ignore", invalid="ignore"):   # an overflow is reported, not warned about
        return xp.sum(xp.stack([_squared_sum(g) for g in grads.values()]))


def finite(grads):
    """A 0-d boolean on the gradients' device: every gradient finite, and no square overflowing
    (what guards an update: finite gradients keep parameters and moments finite)."""
    return get_array_module(*grads.values()).isfinite(squared_norm(grads))


def _squared_sum(g):
    xp = get_array_module(g)
    if is_cupy(xp):
        return cupy_kernel("reduction", "omh_squared_sum", "T x", "T y", "x * x", "a + b", "y = a", "0")(g)
    with fusing("squared_sum"):
        return xp.sum(g * g)


# One Adam update of one parameter, in place, where ``ok`` holds: CuPy's kernel and the NumPy
# rendering below it compute the same operations in the same order (backend: fused kernels).
_ADAM_KERNEL = ("T g, bool ok, T b1, T one_b1, T b2, T one_b2, T step, T c2, T eps", "T p, T m, T v", """
    T m_new = m * b1 + one_b1 * g;
    T v_new = v * b2 + one_b2 * (g * g);
    if (ok) {
        p = p - step * m_new / (sqrt(v_new / c2) + eps);
        m = m_new;
        v = v_new;
    }""")


def _adam_update(p, g, m, v, ok, b1, b2, step, c2, eps):
    """p, m, v updated in place where ``ok`` (a 0-d boolean on the device) holds; ``step`` = the
    rate over the first moment's bias correction, ``c2`` the second's."""
    xp = get_array_module(p)
    dt = p.dtype.type
    if is_cupy(xp):
        cupy_kernel("elementwise", "omh_adam", *_ADAM_KERNEL)(
            g, ok, dt(b1), dt(1 - b1), dt(b2), dt(1 - b2), dt(step), dt(c2), dt(eps), p, m, v)
        return
    with fusing("adam"), np.errstate(invalid="ignore", over="ignore"):
        m_new = m * dt(b1) + dt(1 - b1) * g
        v_new = v * dt(b2) + dt(1 - b2) * (g * g)
        upd = dt(step) * m_new / (xp.sqrt(v_new / dt(c2)) + dt(eps))
        m[...] = xp.where(ok, m_new, m)
        v[...] = xp.where(ok, v_new, v)
        p -= xp.where(ok, upd, dt(0))


def clip_by_norm(grads, keys, max_norm):
    """``grads`` with the gradients of ``keys`` scaled together so that their global L2 norm is
    at most ``max_norm``: torch's ``clip_grad_norm_`` (each times min(1, max_norm / (norm + 1e-6)),
    norm the square root of :func:`squared_norm` over ``keys``), on the device, no read. A
    non-finite norm gives non-finite gradients, which the caller's guard has already seen."""
    sub = {k: grads[k] for k in keys}
    xp = get_array_module(*sub.values())
    norm = xp.sqrt(squared_norm(sub))
    dt = next(iter(sub.values())).dtype.type
    coef = xp.minimum(dt(max_norm) / (norm + dt(1e-6)), dt(1.0)).astype(next(iter(sub.values())).dtype)
    return {k: (g * coef if k in sub else g) for k, g in grads.items()}


def adam_step(params, grads, state, lr, betas=(0.9, 0.999), eps=1e-8, ok=None, grads_checked=False,
              weight_decay=None):
    """One in-place Adam update (torch.optim.Adam's formula; with ``weight_decay``, AdamW's).

    lr is a float or a dict key -> float (e.g. a larger rate for the centroids).
    ``weight_decay``: None, or a dict key -> decay λ_wd (keys not in it: none): AdamW's decoupled
    decay p ← p (1 − lr λ_wd) before the Adam update (torch.optim.AdamW), where the update applies.

    Non-finite gradients (their squared norm is not finite) never change anything. Two ways:

    * ``ok=None`` (checked): the norm is read back (one synchronisation) and a non-finite one
      raises :class:`~omh_ref.core.errors.NonFiniteError` before anything changes. -> the squared
      norm (a float).
    * ``ok`` a 0-d boolean on the device (guarded, the training loop's way, no synchronisation):
      the update is applied only where ``ok`` holds and the gradients are finite; otherwise
      parameters and moments keep their values, bit for bit. -> the new ``ok`` (``ok`` and finite),
      so a loop that carries it freezes the state from the first bad step until it looks.
      ``grads_checked``: ``ok`` already holds :func:`finite` of these gradients (the caller needed
      it first), so it is not computed again.
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
    elif not grads_checked:
        ok = ok & finite(grads)
    state["t"] += 1
    t = state["t"]
    c1, c2 = 1 - b1 ** t, 1 - b2 ** t
    every = xp.asarray(True) if ok is None else ok     # checked above: every gradient is finite
    for k, p in params.items():
        if k not in grads:     # a parameter without a gradient (a base's teacher) is not Adam's
            continue
        rate = lr[k] if isinstance(lr, dict) else lr
        decay = (weight_decay or {}).get(k, 0.0)
        if decay:
            dt = p.dtype.type
            p *= xp.where(every, dt(1 - rate * decay), dt(1))
        _adam_update(p, grads[k], state["m"][k], state["v"][k], every, b1, b2, rate / c1, c2, eps)
    return norm2 if ok is None else ok
