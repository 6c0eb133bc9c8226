"""HP (Seong et al., CVPR 2023, "Hidden Positives") as a base: supervised-contrastive losses on
the pixels of the batch, with positives found against reference pools, train the projection head,
and its cluster probe is STEGO's (docs/METHOD.md, "The HP base"; what HP's code does, with file and
line, is in docs/hp_reading.md, from hynnsk/HP at 8913644, MIT). HP's files are cited as that page
abbreviates them: R run.py, L loss.py, DF model/dino/DinoFeaturizer.py, P make_reference_pool.py,
BD build.py, J the training JSON files.

A step, on the B main images' N = B·h·w pixels (one channel-dropout mask per image, the head's)::

    z  = head(drop(f))                     the code (what the levels and the probes read)
    ẑ  = normalise(PW z + Pb)              project_head (R:69-70, 178-182)
    m  = mix(z, ω)                         each pixel's 3 x 3 window weighted by the attention
                                           weights ω (attn.npy), over the window's cells in the grid
    m̂  = normalise(PW m + Pb)              (DF:199-210; R:186-189)
    f̂  = normalise(drop(f))                the agnostic view (the head's dropped input)
    ê  = normalise(head_E(drop(f)))        the moving-average head's code, no gradient (R:191-192)

Thresholds against the pools (max cosine to a pool: Π_ag of features, Π_sp of EMA codes), the
positives a_ij = [f̂_i·f̂_j > R_i or > R_j], b_ij likewise on ê, weights w = a + λ b, and the SupCon
of :mod:`omh_ref.core.losses.supcon` on ẑ and on m̂ with the same weights and denominators::

    L = (L_sup[ẑ] + L_sup[m̂]) / 2 + α mean_i ‖ẑ_i − ẑ'_i + 10⁻⁶‖        (R:210; L:300; R:176-184)

ẑ' the projected code of the augmented features (feats_aug.npy), α ``consistency_weight``. λ is 0
through step ``warmup``, then (t − w)/(T − w) (R:134-141); the denominator holds the anchor's
agnostic positives and a ``denominator_share`` of all pixels, one draw a step shared by the anchors
at the same position of every image (L:186-188, 214-215).

The base alone (``omh = false``): STEGO's hard cluster probe on the detached code (HP keeps STEGO's
probes, R:199-208). With OMH on top the levels read z, as for every base. The moving-average head
E (``TEACHER``) starts as a copy of the head and follows it (:func:`update`); ``project_head`` (PW,
Pb) is trained by Adam at the head's rate, without weight decay or clipping (R:71).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from .. import head
from ..backend import get_array_module
from ..losses import supcon
from ..ops import linear, neighbour_mix, normalize, pairwise_distance

PROBE_TARGET = "hard"    # STEGO's cluster probe, which HP keeps (R:199-208; docs/hp_reading.md §8)
PROBE_TAU = None         # its loss reads the cosines: the config's tau stays
TEACHER = tuple(f"E{k}" for k in head.KEYS)   # the moving-average head (DF:73-86): no gradient
TRAINABLE = ("PW", "Pb")                      # project_head, nn.Linear(D, D) with bias (R:69-70)
SECOND_VIEW = "feats_aug"                     # the head also runs on the augmented features (R:169)
STATE = ("pool_ag", "pool_sp")                # the reference pools (P), outside the parameters
LOSS_PART = "supcon"
NEGATIVES = False        # no negative image pairs: every pixel of the batch is contrasted with every other
BASE_TAU = 0.07          # SupConLoss's base_temperature, left at its default (L:164-165)
PAIR_EPS = 1e-6          # torch PairwiseDistance's eps, added to the difference (R:176)
TERM_WEIGHTS = (0.5, 0.5)   # (L_sup[ẑ] + L_sup[m̂]) / 2: the two terms weigh the same (L:300)

# HP's values (COCO-Stuff's where the data sets differ; docs/hp_reading.md §9, J = its JSON files):
DEFAULTS = {
    "dim": 512,                     # J:41 (COCO-Stuff, Cityscapes; Potsdam 256)
    "dropout": 0.1,                 # DF:24 (Dropout2d p = 0.1), J:52
    "head_activation": "relu",      # STEGO's nonlinear head (J:51; DF:68-71)
    "ema_alpha": 0.99,              # J:35 (ema_m; Cityscapes and Potsdam 0.999)
    "supcon_tau": 0.8,              # J:25 (tau; Cityscapes 0.6, Potsdam 0.4)
    "consistency_weight": 0.05,     # J:26 (alpha; Potsdam 0.0)
    "denominator_share": 0.02,      # J:27 (rho; Potsdam 1.0)
    "pool_size": 2048,              # J:34 (Potsdam 1024)
    "renew_interval": 100,          # J:31 (Cityscapes and Potsdam 20)
    "warmup": 1000,                 # J:36 (Cityscapes 50, Potsdam 100)
}
# HP's optimiser (J:74-78, 83-86, 97) and batch (J:21): AdamW at 5e-4 with decay 0.1 and the
# head's gradients clipped at norm 10; the cluster probe's Adam at 5e-3.
LOOP_DEFAULTS = {"lr": 5e-4, "lr_clusters": 5e-3, "batch_size": 64, "weight_decay": 0.1, "grad_clip": 10.0}


def needs_partners(cfg) -> bool:
    return False          # no KNN partners (BD:182-185; its correlation weight is 0, J:62)


def inputs(cfg) -> tuple:
    """The batch's rows of attn.npy, always; of feats_aug.npy only where the consistency term
    weighs something (docs/DECISIONS.md, "The HP base")."""
    return ("attn", "feats_aug") if cfg.consistency_weight > 0 else ("attn",)


def shapes(cfg) -> dict:
    """project_head (D x D, D) and the moving-average head (the head's shapes)."""
    D = cfg.dim
    return {"PW": (D, D), "Pb": (D,), **{f"E{k}": s for k, s in head.shapes(cfg.in_dim, D).items()}}


def state_shapes(cfg) -> dict:
    """The pools' shapes: P x C backbone features and P x D moving-average codes."""
    return {"pool_ag": (cfg.pool_size, cfg.in_dim), "pool_sp": (cfg.pool_size, cfg.dim)}


def new_params(cfg, rng, dtype) -> dict:
    """project_head as torch's Linear default: weight and bias uniform ±1/sqrt(D) (R:69)."""
    D = cfg.dim
    bound = 1.0 / math.sqrt(D)
    return {"PW": rng.uniform(-bound, bound, size=(D, D)).astype(dtype),
            "Pb": rng.uniform(-bound, bound, size=(D,)).astype(dtype)}


def init(params, cfg):
    """The moving-average head starts as an exact copy of the head (DF:73-86)."""
    for k in head.KEYS:
        params[f"E{k}"] = params[k].copy()
    return params


def update(params, cfg, ok):
    """E ← α E + (1 − α) θ for every head parameter, from the step's own (pre-Adam) head, where
    ``ok`` holds (DF:138-145, run inside HP's forward, before its optimiser step)."""
    for k in head.KEYS:
        E, W = params[f"E{k}"], params[k]
        xp = get_array_module(E)
        dt = E.dtype.type
        E[...] = xp.where(ok, E * dt(cfg.ema_alpha) + W * dt(1 - cfg.ema_alpha), E)


def lam(t: int, T: int, warmup: int) -> float:
    """λ of the 0-based step ``t`` of a run of ``T`` steps: 0 through ``warmup`` inclusive, then
    (t − w)/(T − w) (R:134-141), so it ends at (T − 1 − w)/(T − w), below 1."""
    if t <= warmup or T <= warmup:
        return 0.0
    return (t - warmup) / (T - warmup)


def schedule(cfg, t, T) -> dict:
    return {"lam": lam(int(t), int(T), cfg.warmup)}


def draw(cfg, B, rng) -> dict:
    """The seed of the step's denominator draw (a 63-bit integer; none where every pixel is in
    every denominator)."""
    return {"u_seed": int(rng.integers(0, 1 << 63))} if cfg.denominator_share < 1 else {}


# ---- the denominator draw ----------------------------------------------------------------------
def _mix32(x, xp):
    """Chris Wellons' lowbias32 integer hash, elementwise on uint32 (wrapping arithmetic)."""
    u = xp.uint32
    x = x ^ (x >> u(16))
    x = x * u(0x21F0AAAD)
    x = x ^ (x >> u(15))
    x = x * u(0x735A2D97)
    return x ^ (x >> u(15))


def check_batch(cfg, B, n):
    """A ValueError when a batch of ``B`` images of ``n`` patches is past :func:`denominator`'s
    32-bit index (n·N ≥ 2³², N = B·n; 1.8 million batch rows at 28 x 28), where the draw is used."""
    if cfg.denominator_share < 1 and n * B * n >= 1 << 32:
        raise ValueError(f"{B} images of {n} patches make a {n} x {B * n} denominator draw, past its 2^32 "
                         "entries; a smaller batch, or denominator_share 1")


def denominator(seed, n, N, share, xp):
    """U (n, N) boolean, each entry 1 with probability ``share``: a hash of the entry's index and
    the 63-bit ``seed``, computed where ``xp`` computes (nothing crosses from the host but two
    integers), the same bits on NumPy and CuPy. None where ``share`` is 1 (every pixel)."""
    if share >= 1:
        return None
    if n * N >= 1 << 32:
        raise ValueError(f"denominator draw: {n} x {N} entries exceed the 32-bit index of the hash")
    u = xp.uint32
    k0, k1 = u(seed & 0xFFFFFFFF), u((seed >> 32) & 0xFFFFFFFF)
    idx = xp.arange(n * N, dtype=xp.uint32)
    h = _mix32(_mix32(idx * u(0x9E3779B9) + k0, xp) ^ k1, xp)
    return (h < u(min(round(share * 2.0 ** 32), 2 ** 32 - 1))).reshape(n, N)


# ---- the reference pools -----------------------------------------------------------------------
def _pool_rows(cfg, n_rows, rng):
    """P crops (distinct where the training set has P) for a pool fill, HP's P/B batches of a
    shuffled loader (R:42-43; P:11-16)."""
    return rng.choice(n_rows, size=cfg.pool_size, replace=cfg.pool_size > n_rows)


def _ema_code(params, x, cfg):
    """ê = normalise(head_E(x)): the moving-average head's code, unit rows."""
    e, _ = head.forward({k: params[f"E{k}"] for k in head.KEYS}, x, cfg.head_activation)
    return normalize.forward(e)[0]


def _patches(read, rows, cells, like):
    xp = get_array_module(like)
    return xp.asarray(read(rows, cells), dtype=like.dtype)


def start_state(cfg, params, read, n_rows, cells, rng) -> dict:
    """Both pools of a new run, from one draw of P crops and a patch index per crop for each pool
    (P:27-33, 57-59): Π_ag the normalised features, filled once (R:107); Π_sp the normalised EMA
    code of the initial head."""
    rows = _pool_rows(cfg, n_rows, rng)
    cell_ag = rng.integers(0, cells, size=cfg.pool_size)
    cell_sp = rng.integers(0, cells, size=cfg.pool_size)
    W = params["W1"]
    return {"pool_ag": normalize.forward(_patches(read, rows, cell_ag, W))[0],
            "pool_sp": _ema_code(params, _patches(read, rows, cell_sp, W), cfg)}


def state_draws(cfg, t, n_rows, cells, rng):
    """The crops and patches of Π_sp's renewal at step ``t`` (0-based, global), due where t is a
    multiple of ``renew_interval`` but not 0 (R:144-145 count within the epoch; we count the run's
    steps); None otherwise (no draw)."""
    if t == 0 or t % cfg.renew_interval:
        return None
    rows = _pool_rows(cfg, n_rows, rng)
    return {"rows": rows, "cells": rng.integers(0, cells, size=cfg.pool_size)}


def advance_state(cfg, params, state, draws, read) -> dict:
    """Π_sp refilled with the EMA head as it is before the step (R:144-145); Π_ag kept."""
    if draws is None:
        return state
    return {**state, "pool_sp": _ema_code(params, _patches(read, draws["rows"], draws["cells"], params["W1"]), cfg)}


# ---- the loss ----------------------------------------------------------------------------------
class HPCache(NamedTuple):
    B: int
    grid: tuple                 # (h, w, D)
    weights: tuple              # the two SupCon terms' weights (TERM_WEIGHTS)
    cons_weight: float          # α, or 0 where the consistency term is off
    supcon: object
    proj: object                # (linear, normalize) caches of ẑ
    proj_mix: object            # of m̂
    mix: object                 # neighbour_mix's cache
    proj_aug: object            # of ẑ' (None without the consistency term)
    dist: object                # pairwise_distance's cache


def _project(v, params):
    p, lc = linear.forward(v, params["PW"], params["Pb"])
    y, nc = normalize.forward(p)
    return y, (lc, nc)


def _project_back(dy, cache):
    lc, nc = cache
    return linear.backward(normalize.backward(dy, nc), lc)


def forward(cfg, f, x, z, draws, B, params, extra):
    """-> (loss, parts, cache) of the B main images (``z[B:]``: the augmented features' codes,
    present where the consistency term is on). ``extra``: ``attn`` (B, h, w, 9) the window
    weights, ``dropped`` the head's dropped input (all images), ``state`` the pools."""
    _, h, w, D = z.shape
    n, N = h * w, B * h * w
    state, omega, xd = extra["state"], extra["attn"], extra["dropped"]
    xp = get_array_module(z)
    fd = xd[:B].reshape(N, -1)
    fa = normalize.forward(fd)[0]                                        # agnostic: the dropped features
    fs = _ema_code(params, fd, cfg)                                      # specific: the EMA code
    Ra, Rs = supcon.thresholds(fa, state["pool_ag"]), supcon.thresholds(fs, state["pool_sp"])
    zl = z[:B]
    zh, pc = _project(zl.reshape(N, D), params)                          # ẑ
    m, mc = neighbour_mix.forward(zl, omega)                             # B,h,w,D
    mh, pmc = _project(m.reshape(N, D), params)                          # m̂
    U = denominator(draws.get("u_seed", 0), n, N, cfg.denominator_share, xp)
    lam_t = float(draws.get("lam", 0.0))                                 # a host number, never a device read
    losses, sc = supcon.forward([zh, mh], fa, Ra, fs, Rs, lam_t, U, n, cfg.supcon_tau, base_tau=BASE_TAU)
    parts = {"supcon_global": losses[0], "supcon_local": losses[1], "lam": lam_t}
    loss = TERM_WEIGHTS[0] * losses[0] + TERM_WEIGHTS[1] * losses[1]
    alpha, pa, dc = 0.0, None, None
    if cfg.consistency_weight > 0 and z.shape[0] > B:
        alpha = cfg.consistency_weight
        ah, pa = _project(z[B:2 * B].reshape(N, D), params)             # ẑ'
        d, dc = pairwise_distance.forward(zh, ah, eps=PAIR_EPS)
        parts["consistency"] = d.mean()
        loss = loss + alpha * parts["consistency"]
    parts[LOSS_PART] = loss
    return loss, parts, HPCache(B, (h, w, D), TERM_WEIGHTS, alpha, sc, pc, pmc, mc, pa, dc)


def backward(dloss, cache: HPCache, dz):
    """Adds the loss's gradient with respect to the codes into ``dz`` (both views) and returns
    project_head's, summed over its uses on ẑ, m̂ and ẑ'."""
    B, (h, w, D) = cache.B, cache.grid
    N = B * h * w
    dzh, dmh = supcon.backward([wt * dloss for wt in cache.weights], cache.supcon)
    xp = get_array_module(dz)
    if cache.dist is not None:
        dd = xp.full((N,), dloss * cache.cons_weight / N, dtype=dz.dtype)
        dzh_c, dah = pairwise_distance.backward(dd, cache.dist)
        dzh = dzh + dzh_c
        dza, dW3, db3 = _project_back(dah, cache.proj_aug)
        dz[B:2 * B] += dza.reshape(B, h, w, D)
    dzl, dW, db = _project_back(dzh, cache.proj)
    dmx, dW2, db2 = _project_back(dmh, cache.proj_mix)
    back = neighbour_mix.backward(dmx.reshape(B, h, w, D), cache.mix)
    dz[:B] += dzl.reshape(B, h, w, D) + (back[0] if isinstance(back, tuple) else back)
    grads = {"PW": dW + dW2, "Pb": db + db2}
    if cache.dist is not None:
        grads = {"PW": grads["PW"] + dW3, "Pb": grads["Pb"] + db3}
    return grads
