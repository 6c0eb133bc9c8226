"""HP's masked, weighted supervised-contrastive (SupCon) loss on pixels, one anchor image at a time.

HP (hynnsk/HP @ 8913644, ``loss.py`` SupConLoss; docs/hp_reading.md §5, §6, §11, §12) contrasts
every pixel of a batch of B images (N = B·n pixels, image-major: pixel b·n + p) with every other.
Its positives come from two similarity tests against reference pools (§5): with normalised
features f_a (task-agnostic) and their thresholds R_a_i = max_k f_a_i·Π_k (:func:`thresholds`),

    a_ij = [f_a_i·f_a_j > R_a_i  or  f_a_i·f_a_j > R_a_j],   j ≠ i,

b_ij the same on the normalised EMA codes f_s with R_s (task-specific), w_ij = a_ij + λ b_ij and
c_i = Σ_j w_ij. Anchor i is valid (i ∈ V_b, b its image) when Σ_j a_ij > 0; its denominator is
Den_i = {k ≠ i : a_ik or U[p(i), k]}, with U an (n, N) Bernoulli(ρ) draw shared by the anchors at
position p of every image (§6, §12.10; None: ρ = 1, every other pixel). For each code array
(HP: the projected code ẑ and the mixed code m̂, §7), s_ij = code_i·code_j / τ and

    log p_ij = s_ij − log Σ_{k∈Den_i} exp s_ik,
    L_b = −(τ/τ_0) Σ_{i∈V_b} Σ_j w_ij log p_ij / W_b,    W_b = Σ_{i∈V_b} c_i,
    loss = (1/B) Σ_b L_b,

τ_0 = 0.07 (SupConLoss's base temperature). This is HP's per-anchor mean μ_i = Σ_j w_ij log p_ij / c_i
reweighted by ν_i = c_i / mean_{V_b} c and averaged over V_b, collapsed (§6); HP's total is the
mean of the two terms' losses (loss.py's 1/(2B)). Differences from HP's code, on purpose
(docs/DECISIONS.md, "The HP base"): the arithmetic runs in the arrays' dtype (HP: float16
cosines and masks, λ rounded to float16, §5, §12.13); an anchor outside V_b contributes nothing and
never makes NaN (HP: NaN gradients from an empty denominator, §12.11); an image with empty V_b
gives L_b = 0, still counted in the 1/B (HP: NaN, §12.12). Comparisons are strict ``>`` as HP's.

Gradient (§6): on the cosine code_i·code_k, for i ∈ V_b,

    g_ik = −(1/τ_0)/W_b · (w_ik − c_i π_ik),    π_ik = softmax of s_i over Den_i (0 outside),

0 for rows outside V_b; then dcode_i += Σ_k g_ik code_k and dcode_k += Σ_i g_ik code_i.

Memory: the loop runs over the B anchor images; a block holds the anchor image's n rows against
all N columns. The masks (a, b, w, Den) are computed once per block and shared by every code array;
between forward and backward only O(N) per code array is kept (each anchor's log-sum-exp, c_i,
validity, W_b), and the backward recomputes its block's masks and logits. Peak working set per
block, for the arrays' itemsize s: while the masks are made, w, a similarity and three bool blocks
(a, a test, a comparison), n·N·(2s + 3) bytes; then w, the logits, their exponentials and Den,
n·N·(3s + 1) bytes: 13 bytes per entry in float32, 0.51 GB at HP's B = 64, n = 784 (the backward:
the masks' 2s + 3, then w, the gradient on the cosines and Den, 2s + 1). Nothing of size N x N
(tests/core/test_hp_ops.py measures it).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import get_array_module

BASE_TAU = 0.07        # HP loss.py SupConLoss(base_temperature=0.07), never changed (§6)
THRESHOLD_ROWS = 4096  # rows per block of thresholds(): a 4096 x P product at a time


class SupConCache(NamedTuple):
    codes: tuple       # the code arrays (references, not copies)
    fa: object
    Ra: object
    fs: object
    Rs: object
    lam: float
    U: object          # (n, N) bool or None
    n: int
    tau: float
    base_tau: float
    lse: tuple         # per code array, (N,): log Σ_{k∈Den_i} exp s_ik (finite everywhere)
    c: object          # (N,) Σ_j w_ij
    valid: object      # (N,) bool: Σ_j a_ij > 0
    W: object          # (B,) Σ_{i∈V_b} c_i


def thresholds(u, pool, rows=THRESHOLD_ROWS):
    """R_i = max_k u_i·pool_k, u (N, K) and pool (P, K) already L2-normalised -> (N,) in u's dtype;
    ``rows`` rows of u at a time (a rows x P product at most)."""
    if u.ndim != 2 or pool.ndim != 2 or u.shape[1] != pool.shape[1]:
        raise ValueError(f"thresholds: u must be (N, K) and pool (P, K), got {u.shape} and {pool.shape}")
    xp = get_array_module(u, pool)
    out = xp.empty(u.shape[0], dtype=u.dtype)
    pt = pool.T.astype(u.dtype, copy=False)
    for s in range(0, u.shape[0], rows):
        out[s:s + rows] = xp.max(u[s:s + rows] @ pt, axis=1)
    return out


def _scalar(x, dtype):
    """A loss weight or upstream gradient in ``dtype``: a Python number as a NumPy scalar (weak in
    arithmetic), a 0-d device array cast on the device (no host read)."""
    return x.astype(dtype) if hasattr(x, "dtype") else dtype.type(x)


def _check(codes, fa, Ra, fs, Rs, U, n):
    if not codes:
        raise ValueError("supcon: codes must be a non-empty list of (N, D) arrays")
    N = fa.shape[0]
    for k, c in enumerate(codes):
        if c.ndim != 2 or c.shape[0] != N:
            raise ValueError(f"supcon: codes[{k}] must be (N, D) with N = {N} rows, got {c.shape}")
    for name, x, nd in (("fa", fa, 2), ("fs", fs, 2), ("Ra", Ra, 1), ("Rs", Rs, 1)):
        if x.ndim != nd or x.shape[0] != N:
            raise ValueError(f"supcon: {name} must have {N} rows and {nd} axes, got shape {x.shape}")
    if not isinstance(n, (int, np.integer)) or n < 1 or N % n:
        raise ValueError(f"supcon: n (pixels per image) must divide N = {N}, got {n!r}")
    if U is not None and (U.shape != (n, N) or U.dtype.kind != "b"):
        raise ValueError(f"supcon: U must be a boolean ({n}, {N}) array or None, got {U.dtype} {U.shape}")


def _block(xp, b, n, fa, Ra, fs, Rs, lam, U, ar, dtype):
    """Anchor image b's masks: (w (n, N) dtype, Den (n, N) bool, valid (n,) bool). ``lam`` None
    skips the task-specific test (λ = 0, a host number: HP's warm-up)."""
    rows = slice(b * n, (b + 1) * n)
    self_cols = b * n + ar

    def positives(f, R):
        sim = f[rows] @ f.T                                          # n,N
        pos = sim > R[rows, None]                                    # the anchor's threshold
        pos |= sim > R[None, :]                                      # or the candidate's
        pos[ar, self_cols] = False
        return pos
    A = positives(fa, Ra)
    wgt = A.astype(dtype)
    if lam is not None:
        wgt += positives(fs, Rs) * lam
    if U is None:
        den = xp.ones(A.shape, dtype=bool)
    else:
        den = A | U
    den[ar, self_cols] = False
    return wgt, den, xp.any(A, axis=1)


def _logits(code, b, n, inv_tau):
    """s = code_i·code_j / τ for anchor image b's rows: (n, N)."""
    rows = slice(b * n, (b + 1) * n)
    s = code[rows] @ code.T
    s *= inv_tau
    return s


def _lam(lam, dtype):
    """λ in ``dtype``, or None for a host zero (the task-specific test is then skipped)."""
    if not hasattr(lam, "dtype") and lam == 0:
        return None
    return _scalar(lam, dtype)


def forward(codes, fa, Ra, fs, Rs, lam, U, n, tau, base_tau=BASE_TAU):
    """codes: list of (N, D') L2-normalised code arrays (one loss each); fa (N, C), fs (N, D) the
    normalised agnostic features and EMA codes, Ra, Rs (N,) their thresholds; lam (λ) a number; U
    an (n, N) bool array or None; n pixels per image; tau the SupCon temperature.
    -> (losses, cache), losses a list of 0-d arrays, one per code array."""
    codes = tuple(codes)
    _check(codes, fa, Ra, fs, Rs, U, n)
    xp = get_array_module(*codes, fa, fs)
    dt = codes[0].dtype
    N = fa.shape[0]
    B = N // n
    ar = xp.arange(n)
    lam_, inv_tau = _lam(lam, dt), dt.type(1.0 / tau)
    c = xp.empty(N, dtype=dt)
    valid = xp.empty(N, dtype=bool)
    lse = [xp.empty(N, dtype=dt) for _ in codes]
    num = [xp.empty(N, dtype=dt) for _ in codes]                      # Σ_j w_ij s_ij − c_i lse_i
    for b in range(B):
        rows = slice(b * n, (b + 1) * n)
        wgt, den, ok = _block(xp, b, n, fa, Ra, fs, Rs, lam_, U, ar, dt)
        cb = xp.sum(wgt, axis=1)
        c[rows], valid[rows] = cb, ok
        for k, code in enumerate(codes):
            s = _logits(code, b, n, inv_tau)
            # Shifted by the row's maximum over Den_i (HP shifts by the maximum over all N columns;
            # the shift cancels, §6), so a valid row's sum is ≥ 1 whatever τ; the columns outside
            # Den_i are clipped to 0 before the exp, so none overflows.
            mx = xp.max(xp.where(den, s, -xp.inf), axis=1, keepdims=True)
            mx = xp.where(xp.isfinite(mx), mx, 0)                    # an empty Den_i
            e = s - mx
            xp.minimum(e, 0, out=e)
            xp.exp(e, out=e)
            e *= den
            z = xp.sum(e, axis=1)                                    # 0 only for an empty Den_i
            del e
            lse_b = xp.log(xp.where(z > 0, z, 1)) + mx[:, 0]         # finite; such rows are not in V_b
            lse[k][rows] = lse_b
            num[k][rows] = xp.sum(wgt * s, axis=1) - cb * lse_b
            del s
        del wgt, den                                                 # before the next block's masks
    W = xp.sum(xp.where(valid, c, 0).reshape(B, n), axis=1)          # B
    Wsafe = xp.where(W > 0, W, 1)                                     # an image without V_b: L_b = 0
    kappa = dt.type(tau / base_tau)
    losses = [-kappa * xp.sum(xp.sum(xp.where(valid, t, 0).reshape(B, n), axis=1) / Wsafe) / dt.type(B)
              for t in num]
    cache = SupConCache(codes, fa, Ra, fs, Rs, lam, U, n, tau, base_tau, tuple(lse), c, valid, W)
    return losses, cache


def backward(dlosses, cache):
    """dlosses: one upstream gradient per code array (numbers or 0-d arrays).
    -> list of dcodes, one per code array, same shapes."""
    codes, fa, Ra, fs, Rs, lam, U, n, tau, base_tau, lse, c, valid, W = cache
    if len(dlosses) != len(codes):
        raise ValueError(f"supcon.backward: expected {len(codes)} upstream gradients, got {len(dlosses)}")
    xp = get_array_module(*codes)
    dt = codes[0].dtype
    N = fa.shape[0]
    B = N // n
    ar = xp.arange(n)
    lam_, inv_tau = _lam(lam, dt), dt.type(1.0 / tau)
    # per anchor: −(1/τ_0)/W_b · dloss/B on the rows of V_b, 0 elsewhere
    Wsafe = xp.where(W > 0, W, 1)
    rowcoef = xp.where(valid, xp.repeat(-1 / (Wsafe * dt.type(base_tau * B)), n), 0)
    coefs = [rowcoef * _scalar(dl, dt) for dl in dlosses]
    grads = [xp.zeros_like(code) for code in codes]
    for b in range(B):
        rows = slice(b * n, (b + 1) * n)
        wgt, den, _ = _block(xp, b, n, fa, Ra, fs, Rs, lam_, U, ar, dt)
        cb = c[rows, None]
        for k, code in enumerate(codes):
            g = _logits(code, b, n, inv_tau)
            g -= lse[k][rows, None]
            xp.minimum(g, 0, out=g)                                  # ≤ 0 on Den_i; no overflow outside
            xp.exp(g, out=g)
            g *= den                                                 # π_ik, 0 outside Den_i
            g *= -cb
            g += wgt
            g *= coefs[k][rows, None]                                # g_ik on the cosines
            grads[k][rows] += g @ code
            grads[k] += (code[rows].T @ g).T                         # no transposed copy of g
            del g
        del wgt, den                                                 # before the next block's masks
    return grads
