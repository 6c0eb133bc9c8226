"""Losses, each ``forward(...) -> (loss, cache)`` and ``backward(dloss, cache) -> gradients in
argument order``: STEGO correlation, per-level cluster loss, OMH hierarchy loss."""
from . import cluster, correlation, hierarchy

__all__ = ["cluster", "correlation", "hierarchy"]
