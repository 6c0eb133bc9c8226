"""Losses, each ``forward(...) -> (loss, cache)`` and ``backward(dloss, cache) -> gradients in
argument order``: STEGO correlation, per-level cluster loss, OMH hierarchy loss and its optional
terms (plan sparsity, parent targets predicted through the plan)."""
from . import cluster, correlation, hierarchy, plan_sparsity, plan_targets

__all__ = ["cluster", "correlation", "hierarchy", "plan_sparsity", "plan_targets"]
