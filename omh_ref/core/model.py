"""The OMH model: projection head, parallel cluster levels, Sinkhorn hierarchy, STEGO correlation.

Parameters live in one flat dict (``W1 b1 W2 b2 W3 b3`` for the head, ``M0 .. M{L-1}`` for the
levels' centroids, finest first); gradients come back in a dict with the same keys.

Forward for a batch of B images with feature grids f (B, h, w, C) and their KNN partners f⁺:

    z = W1·drop(f) + b1 + W3·relu(W2·drop(f) + b2) + b3            (both images, channel dropout)
    L_corr = w_intra L(f,f) + w_inter L(f,f⁺) + w_neg mean_perm L(f, f[perm])   (STEGO, sampled)
    s_l = cos(z, M_l), log p_l = log_softmax(s_l/τ)                    (the B main images)
    L = L_corr + λ_clu Σ_l L_clu(s_l, log p_l) + λ_hier Σ_l L_hier(log p_l, log p_l+1, M_l, M_l+1)

``baseline="stego"`` is STEGO's recipe: one cluster head (the eval level's size) trained with hard
k-means on a detached code, no hierarchy. All randomness (dropout masks, sampling coordinates,
negative permutations) is drawn from the ``rng`` passed in, in a fixed order (:func:`draw`).
"""
from __future__ import annotations

import numpy as np

from . import head
from .backend import get_array_module
from .config import Config
from .losses import cluster, correlation, hierarchy
from .ops import cosine, dropout, grid_sample, log_softmax


# Loss weights of :func:`small_config`: distinct from each other and from 1 (and from the
# defaults), so that a weight dropped, swapped or applied twice in a backward changes the gradient.
SMALL_WEIGHTS = dict(lam_clu=0.7, lam_hier=1.3, lam_w=0.37, lam_sparse=0.23, weight_intra=0.45, weight_inter=0.85,
                     weight_neg=1.55)


def small_config(**overrides) -> Config:
    """A tiny valid config with odd, distinct sizes (so transposes fail loudly) and distinct,
    non-unit loss weights (so a wrong weight in a backward fails loudly: :data:`SMALL_WEIGHTS`),
    for tests, benchmarks and outside checkers."""
    base = dict(in_dim=7, dim=5, levels=(6, 4, 3), feature_samples=3, neg_samples=2,
                sinkhorn_iters=10, sinkhorn_iters_q=5, eps=0.3, eps_q=0.3, tau=0.5, **SMALL_WEIGHTS)
    base.update(overrides)
    return Config(**base)


def random_batch(cfg: Config, rng, B=3, h=5, w=4, dtype=np.float64) -> dict:
    """A valid batch of random features: {'feats', 'feats_pos'} each (B, h, w, C)."""
    shape = (B, h, w, cfg.in_dim)
    return {"feats": rng.standard_normal(shape).astype(dtype),
            "feats_pos": rng.standard_normal(shape).astype(dtype)}


def init_params(cfg: Config, rng, dtype=np.float32) -> dict:
    """Head weights as torch's Conv2d default (uniform ±1/sqrt(fan_in)), centroids ~ N(0, 1) as
    STEGO's cluster probe. Host (numpy) arrays; move them with backend.to_device."""
    cfg = cfg.effective()
    C, D = cfg.in_dim, cfg.dim
    params = head.init(C, D, rng, dtype)
    for i, k in enumerate(cfg.levels):
        params[f"M{i}"] = rng.standard_normal((k, D)).astype(dtype)
    return params


def derangement(n, rng):
    """A uniformly random permutation of range(n) without fixed points (rejection sampling)."""
    if n < 2:
        raise ValueError("negative pairs need a batch of at least 2 images (batch_size >= 2)")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            return perm


def draw(cfg: Config, B, C, rng) -> dict:
    """Every random draw of one training step, in a fixed order: dropout keep-mask (2B, C) on the
    host, sampling coordinates (B, S, S, 2) for the image and its partners, the negative
    permutations. An outside rendering fed these numbers computes the same loss."""
    S = cfg.feature_samples
    keep = rng.random((2 * B, C)) >= cfg.dropout if cfg.dropout > 0 else None
    coords1 = rng.uniform(-1.0, 1.0, size=(B, S, S, 2))
    coords2 = rng.uniform(-1.0, 1.0, size=(B, S, S, 2))
    perms = [derangement(B, rng) for _ in range(cfg.neg_samples)] if cfg.weight_neg > 0 else []
    return {"keep": keep, "coords1": coords1, "coords2": coords2, "perms": perms}


def _check_batch(params, batch, cfg):
    f = batch.get("feats")
    if f is None or getattr(f, "ndim", 0) != 4:
        raise ValueError(f"batch['feats']: expected an array (B, h, w, C), got {getattr(f, 'shape', f)}")
    if f.shape[-1] != cfg.in_dim:
        raise ValueError(f"batch['feats']: expected C={cfg.in_dim} channels (config in_dim), got {f.shape[-1]}")
    fp = batch.get("feats_pos")
    if fp is not None and fp.shape != f.shape:
        raise ValueError(f"batch['feats_pos']: expected shape {f.shape} like feats, got {fp.shape}")
    if fp is None and cfg.weight_inter > 0:
        raise ValueError("batch['feats_pos']: KNN partner features are needed when weight_inter > 0")
    for i, _ in enumerate(cfg.levels):
        if f"M{i}" not in params:
            raise ValueError(f"params: missing centroids 'M{i}' for level {i} of {cfg.levels}")


def to_device_draws(d: dict, xp, dt, n_images, dropout_p) -> dict:
    """A step's draws (:func:`draw`, host arrays) on the params' device in one transfer: the
    dropout mask (n_images, 1, 1, C) scaled by 1/(1-p), both coordinate sets in ``dt`` and the
    permutations as integer index arrays (a GPU then receives one buffer a step, not one per draw).
    The same numbers as converting each draw on its own."""
    parts = [np.ravel(d["coords1"]), np.ravel(d["coords2"])] + [np.asarray(p, np.float64) for p in d["perms"]]
    keep = None if d["keep"] is None else d["keep"][:n_images]
    if keep is not None:
        parts.insert(0, keep.ravel().astype(np.float64))
    buf = xp.asarray(np.concatenate(parts))                            # the one host -> device copy
    out, at = {}, 0

    def take(n):
        nonlocal at
        at += n
        return buf[at - n:at]

    if keep is not None:
        N, C = keep.shape
        out["mask"] = (take(N * C) / (1.0 - dropout_p)).astype(dt).reshape(N, 1, 1, C)
    else:
        out["mask"] = None
    for k in ("coords1", "coords2"):
        out[k] = take(d[k].size).astype(dt).reshape(d[k].shape)
    out["perms"] = [take(len(p)).astype(np.int64) for p in d["perms"]]
    return out


def forward(params, batch, cfg: Config, rng, targets=None, draws=None):
    """-> (loss, parts, cache). ``targets`` (a list of per-level cluster targets, as returned in
    ``cache['targets']``) holds the no-gradient targets fixed, for gradient checks. ``draws``: the
    step's random draws made beforehand with :func:`draw` (the training loop makes them before it
    draws the next batch); by default drawn here from ``rng``.

    loss is a 0-d array on the params' device; parts a dict of 0-d arrays on that device too (the
    loss parts and diagnostics ``sinkhorn_err_l``, ``plan_sparsity_l``, ``target_err_l``), so
    nothing here waits for the device: read them with :func:`omh_ref.core.backend.host_floats`
    (one transfer) where they are logged."""
    cfg = cfg.effective()
    _check_batch(params, batch, cfg)
    W1 = params["W1"]
    xp = get_array_module(*params.values())
    dt = W1.dtype
    f = xp.asanyarray(batch["feats"], dtype=dt)                       # B,h,w,C (any: a test's watched type stays)
    fp = batch.get("feats_pos")
    B, h, w, C = f.shape
    d = draw(cfg, B, C, rng) if draws is None else draws
    x = f if fp is None else xp.concatenate([f, xp.asanyarray(fp, dtype=dt)])   # 2B,h,w,C
    dd = to_device_draws(d, xp, dt, x.shape[0], cfg.dropout)
    mask = dd["mask"]
    xd, dcache = dropout.forward(x, cfg.dropout, mask=mask, training=mask is not None)

    z, headc = head.forward(params, xd)                                # 2B,h,w,D
    parts = {}

    # STEGO correlation loss on sampled points.
    coords1, coords2 = dd["coords1"], dd["coords2"]
    fs1, _ = grid_sample.forward(f, coords1)                           # B,S,S,C
    zs1, g1 = grid_sample.forward(z[:B], coords1)                      # B,S,S,D
    corr = []  # (pair type, weight, loss cache, where the partner's code gradient goes)
    loss_intra, cc = correlation.forward(fs1, fs1, zs1, zs1, cfg.shift_intra, cfg.pointwise, cfg.zero_clamp)
    corr.append(("intra", cfg.weight_intra, cc, None))
    parts["corr_intra"] = loss_intra
    loss = cfg.weight_intra * loss_intra
    if fp is not None:
        fs2, _ = grid_sample.forward(x[B:], coords2)
        zs2, g2 = grid_sample.forward(z[B:], coords2)
        loss_inter, cc = correlation.forward(fs1, fs2, zs1, zs2, cfg.shift_inter, cfg.pointwise, cfg.zero_clamp)
        corr.append(("inter", cfg.weight_inter, cc, g2))
        parts["corr_inter"] = loss_inter
        loss = loss + cfg.weight_inter * loss_inter
    neg = []
    for perm in dd["perms"]:
        fsn, _ = grid_sample.forward(f, coords2, images=perm)          # f[perm] sampled, no copy
        zsn, gn = grid_sample.forward(z, coords2, images=perm)         # z[:B][perm] likewise
        ln, cc = correlation.forward(fs1, fsn, zs1, zsn, cfg.shift_neg, cfg.pointwise, cfg.zero_clamp)
        corr.append(("neg", cfg.weight_neg / len(dd["perms"]), cc, (gn, perm)))
        neg.append(ln)
    if neg:
        parts["corr_neg"] = sum(neg) / len(neg)
        loss = loss + cfg.weight_neg * parts["corr_neg"]
    parts["corr"] = loss

    # Parallel cluster levels on the main images' codes.
    zmain = z[:B].reshape(-1, z.shape[-1])                             # P,D
    L = len(cfg.levels)
    levels, new_targets = [], []
    for i in range(L):
        s, sc = cosine.forward(zmain, params[f"M{i}"])                 # P,K
        logp, lc = log_softmax.forward(s, cfg.tau)
        Q = None if targets is None else targets[i]
        if Q is None and cfg.cluster_target == "relaxed":
            Q, terr = cluster.relaxed_targets(s, cfg.eps_q, cfg.sinkhorn_iters_q, cfg.rho_q, span_bound=2.0)
        elif Q is None and cfg.cluster_target == "balanced":
            Q, terr = cluster.balanced_targets(s, cfg.eps_q, cfg.sinkhorn_iters_q, span_bound=2.0)
            parts[f"target_err_{i}"] = terr
        lclu, kc = cluster.forward(s, logp, cfg.cluster_target, cfg.eps_q, cfg.sinkhorn_iters_q, Q=Q)
        new_targets.append(kc[1])
        parts[f"clu_{i}"] = lclu
        loss = loss + cfg.lam_clu * lclu
        levels.append((sc, lc, kc, logp))

    hier = []
    if cfg.lam_hier > 0:
        for i in range(L - 1):
            lh, hc = hierarchy.forward(levels[i][3], levels[i + 1][3], params[f"M{i}"],
                                       params[f"M{i + 1}"], cfg.eps, cfg.sinkhorn_iters, cfg.lam_w,
                                       cfg.marginals, cfg.sinkhorn_backward, cfg.hier_form, cfg.lam_sparse,
                                       new_targets[i + 1] if cfg.hier_form == "targets" else None,
                                       check=False)
            diag = hc[-1]
            parts[f"hier_{i}"] = lh
            parts[f"hier_kl_{i}"] = diag["kl"]
            parts[f"hier_w_{i}"] = diag["wasserstein"]
            parts[f"sinkhorn_err_{i}"] = diag["marginal_error"]
            parts[f"plan_sparsity_{i}"] = diag["plan_sparsity"]
            if cfg.lam_sparse > 0:
                parts[f"hier_entropy_{i}"] = diag["entropy"]
            loss = loss + cfg.lam_hier * lh
            hier.append(hc)

    parts["loss"] = loss
    cache = {"cfg": cfg, "B": B, "dcache": dcache, "head": headc, "z_shape": z.shape, "g1": g1,
             "corr": corr, "levels": levels, "hier": hier,
             "targets": new_targets, "dtype": dt}
    return loss, parts, cache


def backward(dloss, cache) -> dict:
    """-> grads of ``dloss · loss``, a dict with the params' keys."""
    cfg, B = cache["cfg"], cache["B"]
    xp = get_array_module(cache["head"][0][0])
    grads = {}
    dz = xp.zeros(cache["z_shape"], dtype=cache["dtype"])              # 2B,h,w,D

    # Correlation: the main image's sampled code collects every pair's first-argument gradient.
    dzs1 = 0
    for name, wt, cc, route in cache["corr"]:
        dca, dcb = correlation.backward(wt * dloss, cc)
        dzs1 = dzs1 + dca
        if name == "intra":
            dzs1 = dzs1 + dcb
        elif name == "inter":
            dz[B:] += grid_sample.backward(dcb, route)
        else:
            gn, perm = route
            dz[:B][perm] += grid_sample.backward(dcb, gn)   # perm has no repeats: += is safe
    dz[:B] += grid_sample.backward(dzs1, cache["g1"])

    # Cluster levels and hierarchy; dlogp collects both losses before the one softmax backward.
    L = len(cfg.levels)
    dlogp = [0] * L
    dM = [0] * L
    for i, hc in enumerate(cache["hier"]):
        dlc, dlp, dMc, dMp = hierarchy.backward(cfg.lam_hier * dloss, hc)
        dlogp[i] = dlogp[i] + dlc
        dlogp[i + 1] = dlogp[i + 1] + dlp
        dM[i] = dM[i] + dMc
        dM[i + 1] = dM[i + 1] + dMp
    dzmain = 0
    for i, (sc, lc, kc, _) in enumerate(cache["levels"]):
        ds, dl = cluster.backward(cfg.lam_clu * dloss, kc)
        ds = ds + log_softmax.backward(dlogp[i] + dl, lc)
        dzi, dMi = cosine.backward(ds, sc)
        dzmain = dzmain + dzi
        grads[f"M{i}"] = dM[i] + dMi
    if not cfg.detach_clusters:
        dz[:B] += dzmain.reshape(dz[:B].shape)

    grads.update(head.backward(dz, cache["head"]))   # the frozen features need no gradient
    return {k: grads[k] for k in (*head.KEYS, *(f"M{i}" for i in range(L)))}


def loss_and_grads(params, batch, cfg: Config, rng, targets=None, draws=None):
    """-> (loss, parts, grads): one forward and backward pass of the full objective."""
    loss, parts, cache = forward(params, batch, cfg, rng, targets, draws)
    return loss, parts, backward(1.0, cache)
