"""The projection head (STEGO's two-branch 1x1 head), written once for training, evaluation and
the benchmarks:

    z = W1·x + b1 + W3·act(W2·x + b2) + b3          x (..., C) -> z (..., D)

act is ReLU (STEGO) or SiLU (SmooSeg), ``Config.head_activation``.

A 1x1 convolution over a channels-last grid is a matmul over the last axis (``ops.linear``). The
input is the frozen backbone's features, so the backward pass returns the weights' gradients only.
"""
import math

from .ops import linear, relu, silu

KEYS = ("W1", "b1", "W2", "b2", "W3", "b3")
ACTIVATIONS = {"relu": relu, "silu": silu}


def init(C, D, rng, dtype):
    """Weights as torch's Conv2d default: uniform ±1/sqrt(fan_in), drawn in ``KEYS`` order."""
    def uniform(shape):
        bound = 1.0 / math.sqrt(C)
        return rng.uniform(-bound, bound, size=shape).astype(dtype)

    return {"W1": uniform((D, C)), "b1": uniform((D,)), "W2": uniform((C, C)), "b2": uniform((C,)),
            "W3": uniform((D, C)), "b3": uniform((D,))}


def shapes(C, D) -> dict:
    return {"W1": (D, C), "b1": (D,), "W2": (C, C), "b2": (C,), "W3": (D, C), "b3": (D,)}


def forward(params, x, activation):
    """x (..., C) -> (z (..., D), cache); ``activation`` 'relu' or 'silu' (the config's
    ``head_activation``: no default, so no caller can forget it)."""
    act = ACTIVATIONS[activation]
    z1, c1 = linear.forward(x, params["W1"], params["b1"])            # ...,D
    h2, c2 = linear.forward(x, params["W2"], params["b2"])            # ...,C
    r2, rc = act.forward(h2)
    z3, c3 = linear.forward(r2, params["W3"], params["b3"])           # ...,D
    return z1 + z3, (c1, c2, (act, rc), c3)


def backward(dz, cache) -> dict:
    """-> {'W1', 'b1', 'W2', 'b2', 'W3', 'b3'} (no gradient for the frozen input)."""
    c1, c2, (act, rc), c3 = cache
    g = {}
    g["W1"], g["b1"] = linear.backward_params(dz, c1)
    dr2, g["W3"], g["b3"] = linear.backward(dz, c3)
    g["W2"], g["b2"] = linear.backward_params(act.backward(dr2, rc), c2)
    return {k: g[k] for k in KEYS}
