"""Bases: the method whose loss trains the projection head, and the way its own cluster probe is
trained. OMH (the levels and the hierarchy, ``Config.omh``) is a switch on top of any of them.

A base is one module here and one line in :data:`BASES`. It provides

* ``PROBE_TARGET``: the cluster target of its probe when it runs alone (``omh = false``), one of
  :data:`omh_ref.core.losses.cluster.TARGETS`, and ``PROBE_TAU``: the probe's softmax temperature
  then (None: the config's ``tau``);
* ``DEFAULTS``: its own values of the config fields where they differ from omh-ref's (applied to a
  new config where no file or flag gives the field, :func:`omh_ref.core.config.with_base_defaults`),
  and ``LOOP_DEFAULTS`` likewise for the training loop's options (``lr``, ``lr_clusters``,
  ``batch_size``, ``weight_decay``, ``grad_clip``);
* ``LOSS_PART``: the name of its loss in the step's parts;
* ``TEACHER``: the key of a parameter the base keeps without a gradient (SmooSeg's teacher
  centres, which predict when it runs alone), a tuple of such keys (HP's moving-average head), or
  None; with one, ``update(params, cfg, ok)`` moves it after each step's gradients, where the
  device flag ``ok`` holds;
* ``init(params, cfg) -> params``: its changes to the initial parameters (and its teacher's);
* ``needs_partners(cfg) -> bool``: whether a step needs each image's KNN partner features;
* ``draw(cfg, B, rng) -> dict``: its random draws of one step, host arrays (floats), lists of
  integer index arrays or Python numbers (a seed), drawn from ``rng`` in a fixed order;
* ``forward(cfg, f, x, z, draws, B, params) -> (loss, parts, cache)``: its loss on the features
  ``f`` (B, h, w, C), all images' features ``x`` (main then the second view: KNN partners, or
  HP's augmented features), their codes ``z``, the draws on the device and the parameters (read
  only);
* ``backward(dloss, cache, dz)``: adds the loss's gradient with respect to the codes into ``dz``,
  and returns the gradients of its own trainable parameters (a dict; None when it has none).

and, where it needs them (the HP base does; each has a default below for a base without):

* ``TRAINABLE``: the keys of its own trainable parameters (HP's ``project_head``), trained by
  Adam at the head's rate; ``new_params(cfg, rng, dtype) -> dict`` draws them (after the head and
  the levels), ``shapes(cfg) -> dict`` gives every parameter the base adds (trainable and teacher);
* ``SECOND_VIEW``: the batch key of the images the head also runs on (default ``feats_pos``, the
  KNN partners); ``inputs(cfg) -> tuple``: batch keys a step needs besides the features, read
  by the training loop from the row files beside them;
* ``STATE``: the names of arrays it keeps outside the parameters (HP's reference pools), saved in
  checkpoints: ``start_state(cfg, params, read, n_rows, cells, rng)`` makes them for a new run,
  ``state_draws(cfg, t, n_rows, cells, rng)`` draws what step ``t`` (0-based, global) changes in
  them (None: nothing due) and ``advance_state(cfg, params, state, draws, read)`` applies it
  before the step's forward; ``read(rows, cells) -> (P, C)`` host features of one cell of each
  row; ``forward`` then takes ``extra={"state": ..., <inputs>: ...}``;
* ``schedule(cfg, t, T) -> dict``: Python numbers of step ``t`` of a run of ``T`` steps that the
  step's draws carry (HP's λ);
* ``NEGATIVES = False`` where it pairs no image with another (so a batch of one image trains).
"""
from . import hp, smooseg, stego

BASES = {"stego": stego, "smooseg": smooseg, "hp": hp}


def get(name):
    """The base module called ``name``; a ValueError naming the known ones otherwise."""
    try:
        return BASES[name]
    except KeyError:
        raise ValueError(f"base: expected one of {tuple(BASES)}, got {name!r}") from None


def teacher_keys(base) -> tuple:
    """The keys of the base's no-gradient parameters (``TEACHER`` as a tuple; () for none)."""
    t = base.TEACHER
    return () if not t else (t,) if isinstance(t, str) else tuple(t)


def teacher_centres(base):
    """The key of teacher centres that predict and give the ``teacher`` cluster target (SmooSeg's
    G), or None (a base without a teacher, or whose teacher is not centres: HP's head)."""
    return base.TEACHER if isinstance(base.TEACHER, str) else None


def trainable(base) -> tuple:
    """The keys of the base's own trainable parameters (() for STEGO and SmooSeg)."""
    return tuple(getattr(base, "TRAINABLE", ()))


def shapes(base, cfg) -> dict:
    """The shapes of every parameter the base adds: its own ``shapes``, else teacher centres of
    the eval level's size."""
    if hasattr(base, "shapes"):
        return base.shapes(cfg)
    t = teacher_centres(base)
    return {t: (cfg.eval_k, cfg.dim)} if t else {}


def second_view(base) -> str:
    """The batch key of the images the head also runs on (after the main ones)."""
    return getattr(base, "SECOND_VIEW", "feats_pos")


def inputs(base, cfg) -> tuple:
    """Batch keys a step of the base needs besides ``feats`` and the KNN partners."""
    return tuple(base.inputs(cfg)) if hasattr(base, "inputs") else ()


def state_names(base) -> tuple:
    """The names of the arrays the base keeps outside its parameters (checkpointed)."""
    return tuple(getattr(base, "STATE", ()))


def negatives(base, cfg) -> bool:
    """Whether a step pairs each image with another of the batch (STEGO's and SmooSeg's negative
    pairs, ``weight_neg`` > 0): a batch of one image cannot. A base without them says
    ``NEGATIVES = False`` (HP)."""
    return getattr(base, "NEGATIVES", True) and cfg.weight_neg > 0


def takes_extra(base) -> bool:
    """Whether the base's ``forward`` takes ``extra`` (its inputs and state)."""
    return bool(state_names(base)) or hasattr(base, "inputs")
