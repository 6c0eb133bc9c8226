"""Per-level cluster loss, trained jointly with the projection.

Inputs are one level's cosine logits s (P, K) and log-assignments ``log p = log_softmax(s/τ)``
(computed once by the caller, who also owns the softmax backward). Targets:

* ``relaxed`` (default): ``Q = P · plan`` of an entropic OT between the batch's pixels (1/P each)
  and the level's clusters on the cost 1 − s, whose cluster marginal 1/K is a KL penalty of
  weight ``rho_q`` instead of a constraint (:func:`relaxed_targets`); each row sums to 1; no
  gradient through Q (the SwAV recipe); ``L = −mean_pixels Σ_k Q_k log p_k``. A batch of 8 images
  rarely holds every class in equal shares, and strict equipartition split classes by image style
  on the demo data (docs/ablations.md).
* ``balanced``: the same with the cluster marginal a constraint (every cluster receives P/K:
  strict equipartition, :func:`balanced_targets`); ``rho_q`` plays no part.
* ``hard``: ``L = −mean_pixels max_k s_k`` (STEGO's cluster probe: one-hot k-means).
* ``teacher``: ``Q`` the one-hot argmax of the teacher centres' logits (SmooSeg's student, its base
  alone: :mod:`omh_ref.core.bases.smooseg`); ``L = −mean_pixels Σ_k Q_k log p_k``. The targets come
  from the caller (the teacher is not the level's own centroids).
"""
import math
from typing import NamedTuple

from ..backend import get_array_module
from ..ops.sinkhorn import log_iterations, scaling_iterations, scaling_safe

TARGETS = ("relaxed", "balanced", "hard", "teacher")
PLAN_TARGETS = ("relaxed", "balanced")    # targets from an OT plan
LOGP_TARGETS = (*PLAN_TARGETS, "teacher")  # the loss is −Σ Q log p (hard's is −Σ Q s)


class ClusterCache(NamedTuple):
    target: str       # which targets (TARGETS)
    Q: object         # (P, K) the no-gradient targets
    s: object         # (P, K) the cosine logits


def balanced_targets(s, eps_q, n_iters, span_bound=None):
    """Q (P, K): equipartitioned soft targets from an entropic OT plan, rows rescaled to sum to 1:
    the iterations of :func:`omh_ref.core.ops.sinkhorn.forward` (row then column update, ending on the
    columns, so every cluster receives exactly P/K), written for one 2-D problem with matrix-vector
    products. Also returns the plan's row-marginal error (the convergence report, a 0-d array on
    the device: reading it waits for the device, so the model leaves that to whoever logs it).
    ``span_bound``: see :func:`_semi_relaxed`."""
    P = s.shape[0]
    Q = _semi_relaxed(s, eps_q, n_iters, 1.0, end_on_rows=False, span_bound=span_bound)
    return Q, abs(Q.sum(1) - 1).sum() / s.dtype.type(P)


def relaxed_targets(s, eps_q, n_iters, rho, span_bound=None):
    """Like :func:`balanced_targets`, but the cluster marginal is only softly imposed: a KL
    penalty of weight ρ on the columns (unbalanced entropic OT, semi-relaxed; Chizat et al.), so
    the v-update is damped by ρ/(ρ+ε). ρ -> inf approaches the balanced plan (ρ = inf is
    :func:`balanced_targets`, which ends on the columns instead), ρ -> 0 plain softmax
    assignments. Rows are exact (the last update is a row update). -> (Q, 0.0)."""
    if not 0 < rho < math.inf:
        raise ValueError(f"rho must be a positive finite number (inf: balanced_targets), got {rho!r}")
    return _semi_relaxed(s, eps_q, n_iters, rho / (rho + eps_q), end_on_rows=True, span_bound=span_bound), 0.0


def _semi_relaxed(s, eps_q, n_iters, lam, end_on_rows, span_bound=None):
    """P · plan of the (semi-relaxed, damping ``lam``; 1 = balanced) entropic OT between the P
    pixels (mass 1/P each) and the K clusters (1/K each) with cost 1 − s.

    It runs Sinkhorn's own iteration kernel (:mod:`omh_ref.core.ops.sinkhorn`): on scalings with
    two BLAS matrix-vector products an iteration when :func:`~omh_ref.core.ops.sinkhorn.scaling_safe`
    says nothing can underflow, in the log domain otherwise or when the scalings are not finite.
    ``span_bound``: a bound on every row's span of the cost known without looking at the data (the
    model's logits are cosines, so 1 − s spans at most 2): the domain is then chosen from it alone
    and no check reads the device (the data-driven choice and the finiteness fallback each wait
    for it; the bound makes the scalings provably finite for finite logits).
    NaN logits give NaN targets on purpose: the training loop reports a non-finite loss as
    divergence and keeps the state before the step."""
    xp = get_array_module(s)
    if not (n_iters >= 1 and int(n_iters) == n_iters):
        raise ValueError(f"n_iters must be a positive integer, got {n_iters!r}")
    if not eps_q > 0:
        raise ValueError(f"eps_q must be a positive number, got {eps_q!r}")
    P, Kc = s.shape
    dt = s.dtype.type
    ones_p, ones_k = xp.ones(P, dtype=s.dtype), xp.ones(Kc, dtype=s.dtype)
    static = span_bound is not None
    if scaling_safe(1 - s, ones_p, ones_k, eps_q, span_bound=span_bound, ratio_bound=1.0 if static else None):
        # P,K; the row shift is absorbed by u
        E = xp.exp((s - s.max(axis=1, keepdims=True)) / dt(eps_q))
        u, v, _, _ = scaling_iterations(E, dt(1.0 / P), dt(1.0 / Kc), int(n_iters), lam, end_on_rows, blas=True)
        Q = (u * dt(P))[:, None] * E * v
        if static or bool(xp.all(xp.isfinite(Q))):
            return Q
    K = (s - 1) / dt(eps_q)                                            # −C/ε
    u, v, _, _ = log_iterations(K, -math.log(P), -math.log(Kc), int(n_iters), lam, end_on_rows)
    return xp.exp(K + u[:, None] + v) * dt(P)


def hard_targets(s):
    """One-hot argmax of s (P, K): exactly one 1 per row, ties to the lowest index (as
    ``torch.argmax``; a ``s == max`` mask would give tied rows several ones and double their loss)."""
    xp = get_array_module(s)
    Q = xp.zeros_like(s)
    Q[xp.arange(s.shape[0]), s.argmax(axis=-1)] = 1
    return Q


def forward(s, logp, target="relaxed", eps_q=0.05, n_iters_q=20, Q=None, rho_q=0.1):
    """s, logp (P, K). Q fixes the targets (relaxed/balanced/hard) instead of computing them,
    which is how gradient checks hold the no-gradient target constant. -> (loss, cache); cache.Q
    (also cache[1]) is Q."""
    if target not in TARGETS:
        raise ValueError(f"cluster_target must be one of {TARGETS}, got {target!r}")
    if Q is None and target == "teacher":
        raise ValueError("cluster_target 'teacher': the caller gives the targets (the teacher's argmax)")
    P = s.shape[0]
    if Q is None and target == "relaxed":
        Q = relaxed_targets(s, eps_q, n_iters_q, rho_q)[0]
    elif Q is None:
        Q = balanced_targets(s, eps_q, n_iters_q)[0] if target == "balanced" else hard_targets(s)
    src = logp if target in LOGP_TARGETS else s
    return -(Q * src).sum() / P, ClusterCache(target, Q, s)


def backward(dloss, cache):
    """-> (ds, dlogp); a term that does not depend on one of them gives 0 for it."""
    target, Q, s = cache
    scale = s.dtype.type(-dloss / s.shape[0])
    if target in LOGP_TARGETS:
        return 0, Q * scale
    return Q * scale, 0
