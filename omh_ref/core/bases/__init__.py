"""Bases: the method whose loss trains the projection head, and the way its own cluster probe is
trained. OMH (the levels and the hierarchy, ``Config.omh``) is a switch on top of any of them.

A base is one module here and one line in :data:`BASES`. It provides

* ``PROBE_TARGET``: the cluster target of its probe when it runs alone (``omh = false``), one of
  :data:`omh_ref.core.losses.cluster.TARGETS`;
* ``needs_partners(cfg) -> bool``: whether a step needs each image's KNN partner features;
* ``draw(cfg, B, rng) -> dict``: its random draws of one step, host arrays (floats) or lists of
  integer index arrays, drawn from ``rng`` in a fixed order;
* ``forward(cfg, f, x, z, draws, B) -> (loss, parts, cache)``: its loss on the features ``f``
  (B, h, w, C), all images' features ``x`` (main then partners), their codes ``z``, and the draws on
  the device;
* ``backward(dloss, cache, dz)``: adds the loss's gradient with respect to the codes into ``dz``.
"""
from . import stego

BASES = {"stego": stego}


def get(name):
    """The base module called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return BASES[name]
    except KeyError:
        raise ValueError(f"base: expected one of {tuple(BASES)}, got {name!r}") from None
