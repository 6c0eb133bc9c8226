"""Differentiable ops, one family per module: ``forward(...) -> (out, cache)``, ``backward(dout, cache)``."""
from . import (cosine, dropout, grid_sample, kl, linear, log_softmax, normalize, relu, resize,
               softmax)

__all__ = ["cosine", "dropout", "grid_sample", "kl", "linear", "log_softmax", "normalize", "relu",
           "resize", "softmax"]
