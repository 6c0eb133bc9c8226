"""Bases: the method whose loss trains the projection head, and the way its own cluster probe is
trained. OMH (the levels and the hierarchy, ``Config.omh``) is a switch on top of any of them.

A base is one module here and one line in :data:`BASES`. It provides

* ``PROBE_TARGET``: the cluster target of its probe when it runs alone (``omh = false``), one of
  :data:`omh_ref.core.losses.cluster.TARGETS`, and ``PROBE_TAU``: the probe's softmax temperature
  then (None: the config's ``tau``);
* ``DEFAULTS``: its own values of the config fields where they differ from omh-ref's (applied to a
  new config where no file or flag gives the field, :func:`omh_ref.core.config.with_base_defaults`),
  and ``LOOP_DEFAULTS`` likewise for the training loop's options (``lr``, ``lr_clusters``,
  ``batch_size``);
* ``LOSS_PART``: the name of its loss in the step's parts;
* ``TEACHER``: the key of a parameter the base keeps without a gradient (SmooSeg's teacher
  centres), or None; with one, ``update(params, cfg, ok)`` moves it after each step's gradients,
  where the device flag ``ok`` holds;
* ``init(params, cfg) -> params``: its changes to the initial parameters (and its teacher's);
* ``needs_partners(cfg) -> bool``: whether a step needs each image's KNN partner features;
* ``draw(cfg, B, rng) -> dict``: its random draws of one step, host arrays (floats) or lists of
  integer index arrays, drawn from ``rng`` in a fixed order;
* ``forward(cfg, f, x, z, draws, B, params) -> (loss, parts, cache)``: its loss on the features
  ``f`` (B, h, w, C), all images' features ``x`` (main then partners), their codes ``z``, the draws
  on the device and the parameters (read only);
* ``backward(dloss, cache, dz)``: adds the loss's gradient with respect to the codes into ``dz``.
"""
from . import smooseg, stego

BASES = {"stego": stego, "smooseg": smooseg}


def get(name):
    """The base module called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return BASES[name]
    except KeyError:
        raise ValueError(f"base: expected one of {tuple(BASES)}, got {name!r}") from None
