"""The correctness oracle: vector-Jacobian products checked against central finite differences.

It takes any pair in omh-ref's one convention, ``forward(*args) -> (out, cache)`` and
``backward(dout, cache) -> gradients in argument order`` (ops, losses, Sinkhorn alike; a single
gradient for a single argument; ``None`` or ``0`` where an argument has no gradient), with no
adapter. ``check_vjp`` compares, for a random upstream gradient v and a random tangent u per
argument,

    <v, (f(x + h·u) − f(x − h·u)) / 2h>   with   <vjp(v)_i, u>,

two forward calls whatever the size (as JAX's ``check_vjp`` and torch's ``gradcheck``). Each
argument is perturbed on its own so that one argument's correct gradient cannot mask another's bug.
``check_jacobian`` builds both full Jacobians for tiny inputs and compares them entry by entry.
Both run in float64; tolerances live in :data:`TOLERANCES`, keyed by dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_array_module, random_normal, to_host

# One place for tolerances. float64 gradient checks: step 1e-6, rtol 1e-5;
# float32 / CuPy forward values against float64: ~1e-4.
TOLERANCES = {
    "float64": {"step": 1e-6, "rtol": 1e-5, "atol": 1e-10},
    "float32": {"rtol": 1e-4, "atol": 1e-5},
}


@dataclass
class Report:
    """One check's outcome: a row of ``omh-ref gradcheck``'s table."""

    name: str
    shapes: str
    max_rel_err: float
    tol: float
    passed: bool
    mode: str = "vjp"

    def row(self):
        mark = "ok" if self.passed else "FAIL"
        return f"{self.name:<40} {self.shapes:<34} {self.max_rel_err:10.2e} {self.tol:8.0e}  {mark}"


def _shapes(args):
    return " ".join("x".join(map(str, a.shape)) or "()" for a in args if hasattr(a, "shape"))


def _as_array(y):
    return y if hasattr(y, "shape") else np.asarray(y, dtype=np.float64)


def _is_float(a):
    return hasattr(a, "dtype") and a.dtype.kind == "f"


# Finite-difference stencils: offsets (in steps) and weights of f, the sum divided by the step.
STENCILS = {2: ((1, -1), (0.5, -0.5)),
            4: ((-2, -1, 1, 2), (1 / 12, -8 / 12, 8 / 12, -1 / 12))}


def _roundoff(xp, v, y, h):
    """The noise floor of a central difference <v, f(x+hu) − f(x−hu)>/2h: each evaluation of f
    carries rounding errors of a few ulps of |f|, divided by 2h. Below this, finite differences
    cannot tell a right gradient from a wrong one (e.g. a weight gradient scaled by inputs ~1e-10),
    so such differences are not counted as failures. Scaled by the stencil's Σ|weights|."""
    return 8 * float(np.finfo(np.float64).eps) * float(xp.sum(xp.abs(v) * xp.abs(y))) / h


def _rel(err, scale, rtol, atol):
    """Relative error with the denominator floored at atol/rtol, so that a check passes exactly
    when this number is at most about rtol (values near zero are judged by atol)."""
    return err / max(scale, atol / rtol)


def _default_wrt(args, grads):
    return [i for i, a in enumerate(args) if _is_float(a) and i < len(grads) and grads[i] is not None]


def _grads(backward, dout, cache, args):
    """backward's gradients as a tuple aligned with ``args`` (0 -> zeros, missing -> None)."""
    g = backward(float(dout) if getattr(dout, "ndim", 1) == 0 else dout, cache)
    g = list(g) if isinstance(g, (tuple, list)) else [g]
    g += [None] * (len(args) - len(g))
    out = []
    for a, gi in zip(args, g):
        if gi is not None and not hasattr(gi, "shape") and _is_float(a):
            gi = get_array_module(a).zeros_like(a) + gi     # a term that does not depend on it
        out.append(gi)
    return tuple(out)


def _value(forward):
    return lambda *args: _as_array(forward(*args)[0])


class _Quotients:
    """Central difference quotients of ``f`` along a tangent, and the judgement of one
    direction's analytic value against them (check_vjp's core)."""

    def __init__(self, f, args, v, y0, xp, stencil, rtol, atol, eps):
        self.f, self.args, self.v, self.y0, self.xp = f, args, v, y0, xp
        self.offsets, self.weights = stencil
        self.rtol, self.eps = rtol, eps
        self.atol = atol + _roundoff(xp, v, y0, eps) * sum(abs(w) for w in self.weights)

    def quotient(self, i, u, h):
        """<v, stencil difference of f along u at step h> / h."""
        diff = 0
        for k, w in zip(self.offsets, self.weights):
            shifted = list(self.args)
            shifted[i] = self.args[i] + (k * h) * u
            diff = diff + w * _as_array(self.f(*shifted))
        return float(self.xp.sum(self.v * diff)) / h

    def _judge(self, numeric, analytic, floor):
        err, scale = abs(numeric - analytic), max(abs(numeric), abs(analytic))
        return err <= floor + self.rtol * scale, _rel(err, scale, self.rtol, floor)

    def judge_direction(self, i, u, analytic):
        """-> (passed, relative error) of ``analytic`` = <grad_i, u>."""
        eps, atol = self.eps, self.atol
        numeric = self.quotient(i, u, eps)
        passed, rel = self._judge(numeric, analytic, atol)
        if not passed:
            # Rounding noise larger than the ulp estimate (f computed through cancelling
            # intermediates, e.g. Sinkhorn potentials of size C/eps): the same quotient at a
            # step 0.1% larger has the same truncation error but fresh rounding, so their
            # difference measures the noise. A wrong gradient misses by far more than that.
            noise = abs(numeric - self.quotient(i, u, eps * 1.001))
            passed, rel = self._judge(numeric, analytic, atol + 3 * noise)
        if not passed:
            # A kink (ReLU at 0, a clamp, an argmax tie) within one step of x makes the
            # difference quotient meaningless there. It shows as a quotient that changes when
            # the step shrinks 100x; a wrong gradient gives the same quotient at both steps.
            # Only then is the smaller step's quotient judged (with its own noise floor).
            h2 = eps / 100
            floor2 = atol + _roundoff(self.xp, self.v, self.y0, h2) * sum(abs(w) for w in self.weights)
            fine = self.quotient(i, u, h2)
            if not self._judge(numeric, fine, floor2)[0]:
                passed, rel = self._judge(fine, analytic, floor2)
        return passed, rel


def check_vjp(forward, backward, args, eps=None, rtol=None, atol=None, seed=0, wrt=None, n_dirs=2,
              name="vjp", stencil=2):
    """Check ``backward`` against central differences of ``forward``'s output.

    forward(*args) -> (out, cache); backward(dout, cache) -> gradients in argument order (see the
    module doc). A scalar output's upstream gradient reaches backward as a Python float.
    wrt: indices of the arguments to check (default: every float argument with a gradient).
    eps is the finite-difference step. -> :class:`Report`.
    """
    tol = TOLERANCES["float64"]
    eps = tol["step"] if eps is None else eps
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    for a in args:
        if _is_float(a) and a.dtype != np.float64:
            raise ValueError(f"check_vjp({name}): gradient checks run in float64, got {a.dtype}")
    rng = np.random.default_rng(seed)
    f = _value(forward)
    out, cache = forward(*args)
    y0 = _as_array(out)
    v = random_normal(rng, y0.shape, y0)                   # random upstream gradient, never ones
    grads = _grads(backward, v, cache, args)
    wrt = _default_wrt(args, grads) if wrt is None else wrt
    xp = get_array_module(y0)
    q = _Quotients(f, args, v, y0, xp, STENCILS[stencil], rtol, atol, eps)
    worst, ok = 0.0, True
    for i in wrt:
        for _ in range(n_dirs):
            u = random_normal(rng, args[i].shape, args[i])
            passed, rel = q.judge_direction(i, u, float(xp.sum(grads[i] * u)))
            ok &= passed
            worst = max(worst, rel)
    return Report(name, _shapes(args), worst, rtol, bool(ok), "vjp")


def check_jacobian(forward, backward, args, eps=None, rtol=None, atol=None, wrt=None, name="jacobian"):
    """Full-Jacobian check for tiny inputs: every input entry perturbed, every output entry's VJP
    (forward/backward as for :func:`check_vjp`).

    The error is max |J_num − J_vjp| relative to max |J_vjp| of that argument."""
    tol = TOLERANCES["float64"]
    eps = tol["step"] if eps is None else eps
    rtol = tol["rtol"] if rtol is None else rtol
    atol = tol["atol"] if atol is None else atol
    f = _value(forward)
    out, cache = forward(*args)
    y0 = _as_array(out)
    xp = get_array_module(y0)
    n_out = int(np.prod(y0.shape))
    rows = []
    for k in range(n_out):
        e = xp.zeros(n_out, dtype=y0.dtype)
        e[k] = 1
        rows.append(_grads(backward, e.reshape(y0.shape), cache, args))
    wrt = _default_wrt(args, rows[0]) if wrt is None else wrt
    worst, ok = 0.0, True
    for i in wrt:
        Ja = np.stack([to_host(r[i]).ravel() for r in rows])             # n_out, n_in
        Jn = np.zeros_like(Ja)
        flat = args[i].reshape(-1)
        for j in range(flat.size):
            plus, minus = list(args), list(args)
            d = xp.zeros_like(flat)
            d[j] = eps
            plus[i] = (flat + d).reshape(args[i].shape)
            minus[i] = (flat - d).reshape(args[i].shape)
            Jn[:, j] = to_host((_as_array(f(*plus)) - _as_array(f(*minus))).ravel()) / (2 * eps)
        err = float(np.abs(Jn - Ja).max())
        scale = float(np.abs(Ja).max())
        ok &= err <= atol + rtol * scale
        worst = max(worst, _rel(err, scale, rtol, atol))
    return Report(name, _shapes(args), worst, rtol, bool(ok), "jacobian")
