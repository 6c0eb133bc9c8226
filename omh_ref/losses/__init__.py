"""Losses: STEGO correlation, per-level cluster loss, OMH hierarchy loss."""
from . import cluster, correlation, hierarchy

__all__ = ["cluster", "correlation", "hierarchy"]
