"""Adam over a flat params dict (one loop; state in plain dicts so checkpoints can hold it)."""
from .backend import get_array_module


def adam_init(params) -> dict:
    """Zero first and second moments with the params' shapes, dtypes and device; t = 0."""
    xp = get_array_module(*params.values())
    return {"t": 0,
            "m": {k: xp.zeros_like(p) for k, p in params.items()},
            "v": {k: xp.zeros_like(p) for k, p in params.items()}}


def adam_step(params, grads, state, lr, betas=(0.9, 0.999), eps=1e-8):
    """One in-place Adam update (torch.optim.Adam's formula, no weight decay).

    lr is a float or a dict key -> float (e.g. a larger rate for the centroids)."""
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
