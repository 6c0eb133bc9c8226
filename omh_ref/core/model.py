"""The model: projection head, a base's loss on it, cluster levels, and OMH's hierarchy on top.

Parameters live in one flat dict (``W1 b1 W2 b2 W3 b3`` for the head, ``M0 .. M{L-1}`` for the
levels' centroids, finest first); gradients come back in a dict with the same keys.

Forward for a batch of B images with feature grids f (B, h, w, C) and their KNN partners f⁺:

    z = W1·drop(f) + b1 + W3·relu(W2·drop(f) + b2) + b3            (both images, channel dropout)
    L_base(f, f⁺, z)                                   (the base, core/bases: STEGO's correlation)
    s_l = cos(z, M_l), log p_l = log_softmax(s_l/τ)                    (the B main images)
    L = L_base + λ_clu Σ_l L_clu(s_l, log p_l) + λ_hier Σ_l L_hier(log p_l, log p_l+1, M_l, M_l+1)

With ``omh = false`` the config holds one level, the base's probe, trained on a detached code,
and no hierarchy (resolved by :class:`~omh_ref.core.config.Config` itself). All randomness
(dropout masks, the base's draws) is drawn from the ``rng`` passed in, in a fixed order
(:func:`draw`).

A base may add parameters of its own (HP's ``project_head`` PW, Pb, trained with the head, and its
moving-average head E*, a teacher), batch inputs besides the features (HP's attention weights and
augmented features) and a state outside the parameters (HP's reference pools, ``state``); see
:mod:`omh_ref.core.bases`.
"""
from __future__ import annotations

import numpy as np

from . import bases, clusters, head, omh
from .backend import get_array_module
from .config import Config
from .ops import dropout


def init_params(cfg: Config, rng, dtype=np.float32) -> dict:
    """Head weights as torch's Conv2d default (uniform ±1/sqrt(fan_in)), centroids ~ N(0, 1) as
    STEGO's cluster probe. Host (numpy) arrays; move them with backend.to_device."""
    C, D = cfg.in_dim, cfg.dim
    params = head.init(C, D, rng, dtype)
    for i, k in enumerate(cfg.levels):
        params[f"M{i}"] = rng.standard_normal((k, D)).astype(dtype)
    base = bases.get(cfg.base)
    if hasattr(base, "new_params"):          # the base's own trainable parameters, drawn last
        params.update(base.new_params(cfg, rng, dtype))
    return base.init(params, cfg)


def param_shapes(cfg: Config) -> dict:
    """Every parameter's shape: the head's, each level's centroids, the base's own and its
    teacher's."""
    out = {**head.shapes(cfg.in_dim, cfg.dim), **{f"M{i}": (k, cfg.dim) for i, k in enumerate(cfg.levels)}}
    return {**out, **bases.shapes(bases.get(cfg.base), cfg)}


def grad_keys(cfg: Config) -> tuple:
    """The keys :func:`backward` returns gradients of: the head's, the base's own trainable
    parameters', the levels' (not a teacher's)."""
    return (*head.KEYS, *bases.trainable(bases.get(cfg.base)), *(f"M{i}" for i in range(len(cfg.levels))))


def predictor(cfg: Config, level: int) -> str:
    """The key of the centroids whose cosine logits are level ``level``'s predictions: the level's
    own, except for a base alone with teacher centres (SmooSeg predicts with them)."""
    teacher = bases.teacher_centres(bases.get(cfg.base))
    return teacher if teacher and not cfg.omh else f"M{level}"


def update_buffers(params, cfg: Config, ok) -> None:
    """The base's no-gradient parameters after a step's gradients (SmooSeg's teacher EMA, HP's
    moving-average head), where the device flag ``ok`` holds; nothing for a base without them."""
    base = bases.get(cfg.base)
    if bases.teacher_keys(base):
        base.update(params, cfg, ok)


def start_state(cfg: Config, params, read, n_rows, cells, rng) -> dict:
    """The base's state of a new run (HP's pools, drawn from ``rng``; {} for a base without):
    ``read(rows, cells) -> (P, C)`` host features of one cell of each training row, ``n_rows`` the
    training rows, ``cells`` = h·w. On the params' device."""
    base = bases.get(cfg.base)
    return base.start_state(cfg, params, read, n_rows, cells, rng) if bases.state_names(base) else {}


def state_draws(cfg: Config, t, n_rows, cells, rng):
    """What step ``t`` (0-based) changes in the base's state, drawn from ``rng`` (None: nothing
    due, nothing drawn)."""
    base = bases.get(cfg.base)
    return base.state_draws(cfg, t, n_rows, cells, rng) if bases.state_names(base) else None


def advance_state(cfg: Config, params, state, draws, read) -> dict:
    """The base's state for the step whose :func:`state_draws` are ``draws``, before its forward."""
    if draws is None:
        return state
    return bases.get(cfg.base).advance_state(cfg, params, state, draws, read)


def draw(cfg: Config, B, C, rng, progress=None) -> dict:
    """Every random draw of one training step, in a fixed order: the dropout keep-mask (2B, C),
    then the base's draws (STEGO: sampling coordinates for the image and its partners, the
    negative permutations; HP: the seed of its denominator draw), host arrays or numbers; then
    what the base's schedule says of this step (HP's λ), ``progress`` = (0-based step, total
    steps), (0, 1) when not given. An outside rendering fed these numbers computes the same
    loss."""
    base = bases.get(cfg.base)
    keep = rng.random((2 * B, C)) >= cfg.dropout if cfg.dropout > 0 else None
    out = {"keep": keep, **base.draw(cfg, B, rng)}
    if hasattr(base, "schedule"):
        out.update(base.schedule(cfg, *(progress or (0, 1))))
    return out


INPUT_LAST = {"attn": 9}     # the last axis of a base's batch input (feats_aug: the features' C)


def _check_batch(params, batch, cfg):
    f = batch.get("feats")
    if f is None or getattr(f, "ndim", 0) != 4:
        raise ValueError(f"batch['feats']: expected an array (B, h, w, C), got {getattr(f, 'shape', f)}")
    if f.shape[-1] != cfg.in_dim:
        raise ValueError(f"batch['feats']: expected C={cfg.in_dim} channels (config in_dim), got {f.shape[-1]}")
    base = bases.get(cfg.base)
    view = bases.second_view(base)
    fp = batch.get(view)
    if fp is not None and fp.shape != f.shape:
        raise ValueError(f"batch[{view!r}]: expected shape {f.shape} like feats, got {fp.shape}")
    if fp is None and base.needs_partners(cfg):
        raise ValueError("batch['feats_pos']: KNN partner features are needed when weight_inter > 0")
    for key in bases.inputs(base, cfg):
        want = f.shape[:3] + (INPUT_LAST.get(key, f.shape[3]),)
        got = batch.get(key)
        if got is None or getattr(got, "shape", None) != want:
            raise ValueError(f"batch[{key!r}]: the {cfg.base} base needs an array of shape {want}, got "
                             f"{getattr(got, 'shape', got)}")
    for i, _ in enumerate(cfg.levels):
        if f"M{i}" not in params:
            raise ValueError(f"params: missing centroids 'M{i}' for level {i} of {cfg.levels}")


def to_device_draws(d: dict, xp, dt, n_images, dropout_p) -> dict:
    """A step's draws (:func:`draw`, host arrays) on the params' device in one transfer: the
    dropout mask (n_images, 1, 1, C) scaled by 1/(1-p), every float draw in ``dt`` and every list
    of permutations as integer index arrays (a GPU then receives one buffer a step, not one per
    draw). The same numbers as converting each draw on its own."""
    keep = None if d["keep"] is None else d["keep"][:n_images]
    scalars = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    names = [k for k in d if k != "keep" and k not in scalars]   # numbers (a seed, λ) stay host numbers
    parts = [keep.ravel().astype(np.float64)] if keep is not None else []
    for k in names:
        v = d[k]
        parts += [np.asarray(p, np.float64) for p in v] if isinstance(v, list) else [np.ravel(v)]
    buf = xp.asarray(np.concatenate(parts) if parts else np.zeros(0))  # the one host -> device copy
    out, at = {}, 0
    if keep is not None:
        N, C = keep.shape
        out["mask"] = (buf[:N * C] / (1.0 - dropout_p)).astype(dt).reshape(N, 1, 1, C)
        at = N * C
    else:
        out["mask"] = None
    out.update(scalars)
    for k in names:
        v = d[k]
        if isinstance(v, list):
            out[k] = []
            for p in v:
                out[k].append(buf[at:at + len(p)].astype(np.int64))
                at += len(p)
        else:
            out[k] = buf[at:at + v.size].astype(dt).reshape(v.shape)
            at += v.size
    return out


def forward(params, batch, cfg: Config, rng, targets=None, draws=None, state=None):
    """-> (loss, parts, cache). ``targets`` (a list of per-level cluster targets, as returned in
    ``cache['targets']``) holds the no-gradient targets fixed, for gradient checks. ``draws``: the
    step's random draws made beforehand with :func:`draw` (the training loop makes them before it
    draws the next batch); by default drawn here from ``rng``. ``state``: the base's arrays outside
    the parameters (HP's pools, on the params' device), for a base that keeps some.

    loss is a 0-d array on the params' device; parts a dict of 0-d arrays on that device too (the
    loss parts and diagnostics ``sinkhorn_err_l``, ``plan_sparsity_l``, ``target_err_l``), so
    nothing here waits for the device: read them with :func:`omh_ref.core.backend.host_floats`
    (one transfer) where they are logged."""
    _check_batch(params, batch, cfg)
    base = bases.get(cfg.base)
    W1 = params["W1"]
    xp = get_array_module(*params.values())
    dt = W1.dtype
    f = xp.asanyarray(batch["feats"], dtype=dt)                       # B,h,w,C (any: a test's watched type stays)
    fp = batch.get(bases.second_view(base))                            # KNN partners (HP: augmented features)
    B, h, w, C = f.shape
    d = draw(cfg, B, C, rng) if draws is None else draws
    x = f if fp is None else xp.concatenate([f, xp.asanyarray(fp, dtype=dt)])   # 2B,h,w,C
    dd = to_device_draws(d, xp, dt, x.shape[0], cfg.dropout)
    mask = dd["mask"]
    xd, dcache = dropout.forward(x, cfg.dropout, mask=mask, training=mask is not None)
    z, headc = head.forward(params, xd, cfg.head_activation)           # 2B,h,w,D

    if bases.takes_extra(base):    # its batch inputs, the head's dropped input and its state
        if bases.state_names(base) and state is None:
            raise ValueError(f"state: the {cfg.base} base needs its state ({', '.join(bases.state_names(base))})")
        extra = {k: xp.asanyarray(batch[k], dtype=dt) for k in bases.inputs(base, cfg)}
        extra.update(dropped=xd, state=state)
        loss, parts, basec = base.forward(cfg, f, x, z, dd, B, params, extra)
    else:
        loss, parts, basec = base.forward(cfg, f, x, z, dd, B, params)
    zmain = z[:B].reshape(-1, z.shape[-1])                             # P,D
    losses, level_parts, levels = clusters.forward(zmain, params, cfg, targets)
    parts.update(level_parts)
    for lclu in losses:
        loss = loss + cfg.lam_clu * lclu
    losses, hier_parts, hier = omh.forward(levels, params, cfg)
    parts.update(hier_parts)
    for lh in losses:
        loss = loss + cfg.lam_hier * lh
    parts["loss"] = loss
    cache = {"cfg": cfg, "B": B, "dcache": dcache, "head": headc, "z_shape": z.shape, "base": basec,
             "levels": levels, "hier": hier, "targets": [lv.loss.Q for lv in levels], "dtype": dt}
    return loss, parts, cache


def backward(dloss, cache) -> dict:
    """-> grads of ``dloss · loss``, a dict with the params' keys."""
    cfg, B = cache["cfg"], cache["B"]
    xp = get_array_module(cache["head"][0][0])
    dz = xp.zeros(cache["z_shape"], dtype=cache["dtype"])              # 2B,h,w,D
    base_grads = bases.get(cfg.base).backward(dloss, cache["base"], dz) or {}   # its own parameters'

    # Cluster levels and hierarchy; dlogp collects both losses before the one softmax backward.
    L = len(cfg.levels)
    dlogp, dM = omh.backward(cfg.lam_hier * dloss, cache["hier"], L)
    dzmain, dMs = clusters.backward(cfg.lam_clu * dloss, cache["levels"], dlogp, dM)
    if not cfg.detach_clusters:
        dz[:B] += dzmain.reshape(dz[:B].shape)

    grads = {**{f"M{i}": dMs[i] for i in range(L)}, **base_grads}
    grads.update(head.backward(dz, cache["head"]))   # the frozen features need no gradient
    return {k: grads[k] for k in grad_keys(cfg)}


def loss_and_grads(params, batch, cfg: Config, rng, targets=None, draws=None, state=None):
    """-> (loss, parts, grads): one forward and backward pass of the full objective."""
    loss, parts, cache = forward(params, batch, cfg, rng, targets, draws, state)
    return loss, parts, backward(1.0, cache)
