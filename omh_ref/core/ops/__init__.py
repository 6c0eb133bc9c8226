"""Differentiable ops, one family per module: ``forward(...) -> (out, cache)`` and
``backward(dout, cache) -> gradients in argument order``, side by side (Sinkhorn among them)."""
from . import (cosine, dropout, grid_sample, kl, linear, log_softmax, neighbour_mix, normalize, pairwise_distance,
               relu, resize, silu, sinkhorn, softmax)

__all__ = ["cosine", "dropout", "grid_sample", "kl", "linear", "log_softmax", "neighbour_mix", "normalize",
           "pairwise_distance", "relu", "resize", "silu", "sinkhorn", "softmax"]
