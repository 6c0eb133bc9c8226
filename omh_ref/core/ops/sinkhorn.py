"""Entropic optimal transport (Sinkhorn) with an exact backward pass: ``forward(cost, a, b, eps,
n_iters) -> (plan, cache)``, ``backward(dplan, cache) -> (dcost, da, db)``, like every op.

Problem, batched over leading axes: ``T = argmin_T <T, C> − ε H(T)`` s.t. ``T 1 = a``, ``Tᵀ 1 = b``.

Forward, with ``K = −C/ε`` and log-scalings u (rows) and v (columns), v₀ = 0::

    u_t = log a − LSE_j(K_ij + v_{t−1,j})
    v_t = log b − LSE_i(K_ij + u_t,i)        t = 1..n_iters
    log T = K + u_T ⊕ v_T

Every log-sum-exp is max-shifted, so nothing overflows for ε down to 1e-3 and marginals down to the
dtype's tiny numbers; after the last column update the column marginals are exact and the row
marginal error (``cache.marginal_error``, the L1 norm of ``T1 − a`` per problem) is the convergence
report. The same iterations run on scalings instead of log-scalings (no exponentials, see
:func:`scaling_safe`) whenever nothing can underflow; :func:`log_iterations` and
:func:`scaling_iterations` are the one iteration kernel, shared with the cluster targets
(``losses/cluster.py``).

Backward, two modes:

* ``"unrolled"`` (default): the exact gradient of the n_iters-step computation, a reverse pass over
  the stored potentials. With ``S^v = exp(K + u_t ⊕ v_t − log b)`` (the column softmax used by the
  v-update) and ``S^u = exp(K + u_t ⊕ v_{t−1} − log a)``::

      dK += −dv_t ⊙ S^v,   du_t += −S^v dv_t,   dlog b += dv_t
      dK += −du_t ⊙ S^u,   dv_{t−1} = −S^uᵀ du_t, dlog a += du_t

  starting from ``dlog T = dT ⊙ T`` (which feeds dK, du_T, dv_T) and ending with dC = −dK/ε. The
  full-size S matrices are recomputed, not stored: the cache holds only the potentials.
* ``"implicit"``: differentiates the optimality conditions at the returned plan (exact only at
  convergence). With ``G = dT ⊙ T``, r = T1, c = Tᵀ1, solve the (singular, symmetric) system
  ``[[diag r, T], [Tᵀ, diag c]] [x; y] = [G1; Gᵀ1]`` by its Schur complement in y with the gauge
  ``y_last = 0``; then ``dC = (T ⊙ (x ⊕ y) − G)/ε``, ``da = x``, ``db = y``. The marginal gradients
  are defined up to ``(x + k, y − k)``, which changes nothing for perturbations that keep
  ``Σa = Σb``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import get_array_module, logsumexp
from ..errors import NonFiniteError

BACKWARD_MODES = ("unrolled", "implicit")


class SinkhornCache(NamedTuple):
    K: object            # (..., n, m) −C/ε
    la: object           # (..., n) log a
    lb: object           # (..., m) log b
    us: list             # u_t, t = 1..n_iters (unrolled mode only; else [])
    vs: list             # v_t, t = 1..n_iters (unrolled mode only; else [])
    plan: object         # (..., n, m)
    eps: float
    a: object            # (..., n)
    b: object            # (..., m)
    mode: str
    marginal_error: object  # (...,) L1 error of the row marginals; columns are exact
    E: object = None     # row-shifted kernel when the scaling domain ran (us, vs are then scalings)


def _check(cost, a, b, eps, n_iters, mode, values=True):
    xp = get_array_module(cost, a, b)
    if cost.ndim < 2:
        raise ValueError(f"sinkhorn: cost must have shape (..., n, m), got {cost.shape}")
    if not (eps > 0 and float(eps) < float("inf")):
        raise ValueError(f"sinkhorn: eps must be a positive finite number, got {eps}")
    if int(n_iters) != n_iters or n_iters < 1:
        raise ValueError(f"sinkhorn: n_iters must be a positive integer, got {n_iters}")
    if mode not in BACKWARD_MODES:
        raise ValueError(f"sinkhorn: backward must be one of {BACKWARD_MODES}, got {mode!r}")
    n, m = cost.shape[-2:]
    if a.shape[-1:] != (n,) or b.shape[-1:] != (m,):
        raise ValueError(
            f"sinkhorn: marginals must end in n={n} and m={m} for cost {cost.shape}, "
            f"got a {a.shape}, b {b.shape}"
        )
    lead = cost.shape[:-2]
    for name, x in (("a", a), ("b", b)):
        try:
            ok = np.broadcast_shapes(x.shape[:-1], lead) == lead
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"sinkhorn: marginal {name} of shape {x.shape} does not broadcast over the "
                             f"cost's leading axes {lead}")
    if not values:
        return
    if not bool(xp.all(xp.isfinite(cost))):
        raise NonFiniteError("sinkhorn: cost contains NaN or inf")
    if not (bool(xp.all(xp.isfinite(a))) and bool(xp.all(xp.isfinite(b)))):
        raise NonFiniteError("sinkhorn: marginals a and b contain NaN or inf")
    if not bool(xp.all(a > 0)) or not bool(xp.all(b > 0)):
        raise ValueError("sinkhorn: marginals a and b must be strictly positive (use tiny masses, not zeros)")
    sa, sb = a.sum(-1), b.sum(-1)
    if not bool(xp.all(xp.abs(sa - sb) <= 1e-4 * xp.maximum(sa, sb))):
        raise ValueError("sinkhorn: marginals must have equal total mass (sum a == sum b)")


def forward(cost, a, b, eps, n_iters, backward="unrolled", check=True, bounds=None):
    """Entropic OT plan by Sinkhorn (scaling or log domain, see below).

    cost (..., n, m); a (..., n) and b (..., m) positive marginals with equal mass (broadcast over
    the leading axes); eps > 0; n_iters ≥ 1; backward 'unrolled' or 'implicit'.
    -> (plan (..., n, m), cache). ``cache.marginal_error`` holds the convergence report.

    ``check=False`` skips the checks of the values (finite, positive, equal masses), which read the
    device: for callers whose inputs hold them by construction (the hierarchy's). Shapes and
    arguments are always checked. ``bounds=(span, ratio)``: bounds on the cost's row span and on the
    marginals' min/max ratios known without the data; the domain is then chosen from them alone
    (no read), and the bounds rule out the scalings' overflow, so no finiteness fallback runs.
    """
    xp = get_array_module(cost, a, b)
    a = xp.asarray(a, dtype=cost.dtype)
    b = xp.asarray(b, dtype=cost.dtype)
    _check(cost, a, b, eps, n_iters, backward, values=check)
    lead = cost.shape[:-2]
    a = xp.broadcast_to(a, lead + a.shape[-1:])
    b = xp.broadcast_to(b, lead + b.shape[-1:])
    la, lb = xp.log(a), xp.log(b)
    K = cost * cost.dtype.type(-1.0 / eps)                             # ...,n,m
    keep = backward == "unrolled"
    plan = None
    span_bound, ratio_bound = bounds if bounds is not None else (None, None)
    if scaling_safe(cost, a, b, eps, span_bound, ratio_bound):
        E = xp.exp(K - K.max(-1, keepdims=True))                       # ...,n,m in [e^-span, 1]
        U, V, us, vs = scaling_iterations(E, a, b, int(n_iters), keep=keep)
        plan = E * U[..., :, None] * V[..., None, :]
        if bounds is None and not bool(xp.all(xp.isfinite(plan))):
            plan = None
    if plan is None:
        E = None
        u, v, us, vs = log_iterations(K, la, lb, int(n_iters), keep=keep)
        plan = xp.exp(K + u[..., :, None] + v[..., None, :])
    err = xp.abs(plan.sum(-1) - a).sum(-1)
    return plan, SinkhornCache(K, la, lb, us, vs, plan, float(eps), a, b, backward, err, E)


# The scaling domain (u = a / (E v), v = b / (Eᵀ u) with E the row-shifted kernel) costs two
# multiply-and-sum passes an iteration instead of two log-sum-exp passes (no exponentials). It runs the same
# iterations, and is safe while nothing can underflow or overflow: the kernel's smallest entry
# exp(−span) must stay far above float32's tiny (span ≤ 40: exp(−40) = 4e-18), and the marginals
# must not be so uneven that a scaling leaves the float range. Otherwise, and whenever the result
# is not finite, the log domain runs.
SCALING_MAX_SPAN = 40.0
SCALING_MIN_MASS_RATIO = 1e-8


def scaling_safe(cost, a, b, eps, span_bound=None, ratio_bound=None):
    """True when the scaling domain cannot underflow or overflow for this problem (see above).

    With ``span_bound`` (a bound on every row's span of the cost) and ``ratio_bound`` (on
    min a / max a and min b / max b) known without the data, the answer comes from them alone and
    reads nothing from the device; otherwise the data are measured (two reads)."""
    if span_bound is not None and ratio_bound is not None:
        return span_bound / eps <= SCALING_MAX_SPAN and ratio_bound >= SCALING_MIN_MASS_RATIO
    xp = get_array_module(cost)
    span = float(xp.max(cost.max(-1) - cost.min(-1))) / eps
    ratio = min(float(xp.min(a / a.max(-1, keepdims=True))), float(xp.min(b / b.max(-1, keepdims=True))))
    return span <= SCALING_MAX_SPAN and ratio >= SCALING_MIN_MASS_RATIO


def log_iterations(K, la, lb, n_iters, lam=1.0, end_on_rows=False, keep=False):
    """The Sinkhorn iterations in the log domain, the one kernel behind every plan omh-ref solves
    (the hierarchy's and the cluster targets'). K = −C/ε (..., n, m); la, lb the log-marginals
    (arrays or scalars); v₀ = 0::

        u_t = la − LSE_j(K_ij + v_{t−1,j}),   v_t = λ (lb − LSE_i(K_ij + u_t,i))

    λ = ``lam`` < 1 damps the column update: the semi-relaxed problem whose column marginal is a
    KL penalty of weight ρ, λ = ρ/(ρ+ε) (λ = 1: balanced). ``end_on_rows`` adds a last row update
    (rows exact instead of columns). ``keep`` stores every u_t, v_t for the unrolled backward.
    -> (u, v, us, vs)."""
    xp = get_array_module(K)
    dt = K.dtype.type
    v = xp.zeros(K.shape[:-2] + K.shape[-1:], dtype=K.dtype)
    us, vs = [], []
    for _ in range(n_iters):
        u = la - logsumexp(K + v[..., None, :], axis=-1)                # ...,n
        v = lb - logsumexp(K + u[..., :, None], axis=-2)                # ...,m
        if lam != 1:
            v = v * dt(lam)
        if keep:
            us.append(u)
            vs.append(v)
    if end_on_rows:
        u = la - logsumexp(K + v[..., None, :], axis=-1)
    return u, v, us, vs


def scaling_iterations(E, a, b, n_iters, lam=1.0, end_on_rows=False, keep=False, blas=False):
    """The same iterations on scalings U = exp(u + max_j K_ij), V = exp(v) of the row-shifted
    kernel E = exp(K − max_j K) (the row shift is absorbed by U)::

        U_t = a / (E V_{t−1}),   V_t = (b / (Eᵀ U_t))^λ

    ``blas``: matrix-vector products (one 2-D problem: two BLAS calls an iteration); otherwise
    products and sums over the axis, so that a batch gives each problem exactly what solving it
    alone gives (a batched matmul may add in another order than a single one). -> (U, V, Us, Vs)."""
    xp = get_array_module(E)
    dt = E.dtype.type
    V = xp.ones(E.shape[:-2] + E.shape[-1:], dtype=E.dtype)
    if blas:
        rows, cols = (lambda V: E @ V), (lambda U: E.T @ U)
    else:
        rows = lambda V: (E * V[..., None, :]).sum(-1)                  # noqa: E731
        cols = lambda U: (E * U[..., :, None]).sum(-2)                  # noqa: E731
    us, vs = [], []
    for _ in range(n_iters):
        U = a / rows(V)                                                 # ...,n
        V = b / cols(U)                                                 # ...,m
        if lam != 1:
            V = V ** dt(lam)
        if keep:
            us.append(U)
            vs.append(V)
    if end_on_rows:
        U = a / rows(V)
    return U, V, us, vs


def backward(dplan, cache):
    """-> (dcost, da, db): gradients w.r.t. the cost and both marginals (for learned marginals).

    da and db have the broadcast shapes (..., n) and (..., m); sum them over axes that were
    broadcast in the forward call.
    """
    if cache.mode == "implicit":
        return _implicit_backward(dplan, cache)
    return _unrolled_backward(dplan, cache)


def _unrolled_backward(dplan, cache):
    K, la, lb, us, vs, plan, eps, a, b = cache[:9]
    xp = get_array_module(dplan)
    dlogp = dplan * plan                                               # ...,n,m
    dK = dlogp.copy()
    du = dlogp.sum(-1)                                                 # from log T = K + u_T ⊕ v_T
    dv = dlogp.sum(-2)
    dla = xp.zeros_like(la)
    dlb = xp.zeros_like(lb)
    E = cache.E
    for t in range(len(us) - 1, -1, -1):
        u = us[t]
        # v_t = lb − LSE_i(K + u_t): recompute its column softmax S^v (in the scaling domain
        # the same matrix is E ⊙ U_t ⊗ V_t / b: products instead of exponentials).
        if E is None:
            Sv = xp.exp(K + u[..., :, None] + (vs[t] - lb)[..., None, :])   # ...,n,m
        else:
            Sv = E * u[..., :, None] * (vs[t] / b)[..., None, :]
        dlb += dv
        dvS = Sv * dv[..., None, :]
        dK -= dvS
        du = du - dvS.sum(-1)
        # u_t = la − LSE_j(K + v_{t−1}), v_0 = 0: recompute its row softmax S^u.
        if E is None:
            vprev = vs[t - 1] if t > 0 else xp.zeros_like(lb)
            Su = xp.exp(K + vprev[..., None, :] + (u - la)[..., :, None])   # ...,n,m
        else:
            Vprev = vs[t - 1] if t > 0 else xp.ones_like(lb)
            Su = E * (u / a)[..., :, None] * Vprev[..., None, :]
        dla += du
        duS = Su * du[..., :, None]
        dK -= duS
        dv = -duS.sum(-2)                                              # gradient of v_{t−1}
        du = xp.zeros_like(du)                                         # u_{t−1} feeds only v_{t−1}
    dcost = dK * dK.dtype.type(-1.0 / eps)
    return dcost, dla / a, dlb / b


def _implicit_backward(dplan, cache):
    plan, eps = cache.plan, cache.eps
    xp = get_array_module(dplan)
    G = dplan * plan                                                   # ...,n,m
    r, c = plan.sum(-1), plan.sum(-2)                                  # ...,n / ...,m
    g1, g2 = G.sum(-1), G.sum(-2)
    m = plan.shape[-1]
    y = xp.zeros_like(c)
    if m > 1:
        Pr = plan / r[..., :, None]                                    # diag(1/r) T
        schur = -xp.matmul(xp.swapaxes(plan, -1, -2), Pr)              # ...,m,m: −Tᵀ diag(1/r) T
        # The diagonal c_j − Σ_i T_ij²/r_i cancels to exactly 0 when rows put nearly all their
        # mass on one column; Σ_i T_ij (Σ_{k≠j} T_ik)/r_i is the same number without cancellation
        # (the row sums without entry j come from exclusive prefix and suffix sums).
        zero = xp.zeros_like(plan[..., :1])
        left = xp.concatenate([zero, xp.cumsum(plan[..., :-1], axis=-1)], axis=-1)
        right = xp.concatenate([xp.cumsum(plan[..., :0:-1], axis=-1)[..., ::-1], zero], axis=-1)
        idx = xp.arange(m)
        schur[..., idx, idx] = (Pr * (left + right)).sum(-2)
        rhs = g2 - xp.matmul(xp.swapaxes(Pr, -1, -2), g1[..., None])[..., 0]
        # Gauge y_last = 0 removes the null direction (x + k, y − k) of the symmetric system. A
        # plan whose support splits into blocks has one more near-null direction per block; it
        # cancels in dC (only x_i + y_j within a block matters there), and a ridge of 1e-12·max c
        # keeps the solve from failing on it without moving well-posed solutions measurably.
        A = schur[..., :-1, :-1]
        A[..., idx[:-1], idx[:-1]] += 1e-12 * c.max(-1, keepdims=True)
        y[..., :-1] = xp.linalg.solve(A, rhs[..., :-1, None])[..., 0]
    x = (g1 - xp.matmul(plan, y[..., None])[..., 0]) / r
    dcost = (plan * (x[..., :, None] + y[..., None, :]) - G) / plan.dtype.type(eps)
    return dcost, x, y


def marginal_errors(plan, a, b):
    """(row L1 error, column L1 error) of a plan against its marginals, per problem."""
    xp = get_array_module(plan, a, b)
    return xp.abs(plan.sum(-1) - a).sum(-1), xp.abs(plan.sum(-2) - b).sum(-1)
