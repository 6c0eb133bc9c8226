"""Losses, each ``forward(...) -> (loss, cache)`` and ``backward(dloss, cache) -> gradients in
argument order``: STEGO correlation, per-level cluster loss, OMH hierarchy loss, HP's masked SupCon."""
from . import cluster, correlation, hierarchy, supcon

__all__ = ["cluster", "correlation", "hierarchy", "supcon"]
