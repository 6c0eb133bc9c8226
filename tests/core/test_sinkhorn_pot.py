"""omh_ref.core.ops.sinkhorn cross-checked against POT, plus Sinkhorn's property tests.

* Plans at convergence against ``ot.sinkhorn(..., method="sinkhorn_log")`` (numpy backend), over
  several ε, odd non-square sizes, non-uniform marginals and a total mass other than 1; and the
  claim that our ε is POT's ``reg`` in ``<T, C> − reg·H(T)`` checked, not assumed.
* Gradients of a random linear functional ``<G, T>`` w.r.t. the cost and both marginals, unrolled
  and implicit, against torch autograd through POT's own iterations (float64 tensors).
* Hypothesis properties: T ≥ 0, exact column marginals, the reported row error, batching, finite
  plans and gradients for ε down to 1e-3 with marginal entries ~1e-30, float32 against float64.
* Clear ValueErrors for bad arguments.

What POT needs (measured with POT 0.9.7 on these problem sizes): its stopping test is the L2
column-marginal error, checked every 10th iteration. ``stopThr=1e-14`` brings its plan to ours
within ~2e-12 (10 iterations at ε = 1, up to 230 at 0.1, 870 at 0.05, 4770 at 0.01, so its
default ``numItermax=1000`` is too few at ε = 0.01). Its *gradient* converges more slowly than its
plan: with the defaults (``stopThr=1e-9``, 1000 iterations) the cost gradient through its loop is
off the implicit gradient by up to 1e-7 relative at ε = 0.1, 1e-5 at 0.05 and 2e-4 at 0.01 (100%
where 1000 iterations are too few); ``stopThr=1e-14`` still leaves up to ~1e-8 at ε = 0.01. So the
gradient comparisons run POT for a fixed number of iterations (``stopThr=0``): three times the
count our forward needs to bring the row marginal error under 1e-12, which leaves ≤ 2e-9.
"""
import re
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omh_ref.core.backend import to_host
from omh_ref.core.errors import NonFiniteError
from omh_ref.core.ops import sinkhorn as sk
from omh_ref.core.ops.sinkhorn import marginal_errors
from tests.strategies import arrays, seeds, simplex

try:
    import ot
except ImportError:  # POT is in the [test] extra; the property tests below run without it
    ot = None

needs_pot = pytest.mark.skipif(ot is None, reason="POT (pip install pot) is not installed")

PLAN_RTOL = 1e-8      # plans against POT (measured ≤ 2e-12)
GRAD_RTOL = 1e-6      # gradients against torch autograd through POT (measured ≤ 2e-9)
CONVERGED = 1e-12     # row-marginal L1 error, relative to the mass, that counts as converged
POT_STOP = 1e-14      # POT's stopThr for plans: L2 column error, checked every 10th iteration
POT_MAX_ITERS = 100_000
EPSILONS = (1.0, 0.1, 0.05, 0.01)

# The xp fixture is function-scoped but stateless (it returns a module), so it is safe to share
# between hypothesis examples; keep the profile's own suppressions (too_slow).
xp_settings = settings(suppress_health_check=list(settings.default.suppress_health_check)
                       + [HealthCheck.function_scoped_fixture])


@pytest.fixture
def rng(request):
    # one generator per test, seeded by the test's id (crc32: stable across processes) so
    # parametrised cases differ and every run draws the same numbers
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def rel_err(got, want):
    """max |got − want| / max |want|."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)


def assert_grad_close(got, want, scale, what):
    """max |got − want| ≤ GRAD_RTOL · max |want|, with max |want| floored at 1e-6 · ``scale``.

    ``scale`` is the size of the terms a gradient is a cancellation of (max |G ⊙ T| / ε for the
    cost). Where the true gradient is smaller than 1e-6 of that (a single row, or a nearly
    deterministic plan at ε = 0.01, where it is ~e^(−Δ/ε)), every method returns float64 rounding
    noise of size ~1e-15 · scale and only an absolute comparison means anything.
    """
    err = np.abs(np.asarray(got) - np.asarray(want)).max()
    denom = max(np.abs(want).max(), 1e-6 * scale)
    assert err <= GRAD_RTOL * denom, f"{what}: error {err:.3e}, max |want| {np.abs(want).max():.3e}"


def centred(x):
    """Projection onto zero-sum vectors: what every marginal perturbation with Σδ = 0 sees."""
    return x - x.mean(-1, keepdims=True)


def problem(rng, n, m, mass=1.0):
    """A random cost in [0, 1) and non-uniform marginals of the given total mass."""
    C = rng.uniform(0.0, 1.0, (n, m))
    a = rng.uniform(0.05, 1.0, n)
    b = rng.uniform(0.05, 1.0, m)
    return C, a * (mass / a.sum()), b * (mass / b.sum())


def converged_iters(C, a, b, eps):
    """The smallest count in 8, 16, 32, ... whose row marginal error is under CONVERGED."""
    n_iters = 8
    while True:
        # "implicit" stores no potentials, so the search costs forward passes only
        _, cache = sk.forward(C, a, b, eps, n_iters, backward="implicit")
        if cache.marginal_error <= CONVERGED * a.sum():
            return n_iters
        n_iters *= 2
        assert n_iters <= 2**15, f"no convergence for eps={eps}"


def pot_plan(C, a, b, reg):
    """POT's log-domain plan, run to its own stopping test at POT_STOP."""
    plan, log = ot.sinkhorn(a, b, C, reg, method="sinkhorn_log", numItermax=POT_MAX_ITERS,
                            stopThr=POT_STOP, warn=False, log=True)
    assert float(log["err"][-1]) < POT_STOP, "POT stopped at its iteration cap, not converged"
    return plan


# ---------------------------------------------------------------------------------------------
# 1. Plans against POT
# ---------------------------------------------------------------------------------------------

@needs_pot
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("n, m, mass", [(7, 5, 1.0), (5, 9, 1.0), (3, 11, 2.5)])
def test_plan_matches_pot(n, m, mass, eps, rng):
    C, a, b = problem(rng, n, m, mass)
    plan, cache = sk.forward(C, a, b, eps, converged_iters(C, a, b, eps))
    want = pot_plan(C, a, b, eps)
    assert rel_err(plan, want) <= PLAN_RTOL
    # the report says how far from POT's fixed point we can be: rows off by ≤ CONVERGED·mass
    assert cache.marginal_error <= CONVERGED * mass


@needs_pot
@pytest.mark.parametrize("eps", EPSILONS)
def test_eps_is_pots_reg(eps, rng):
    """Our ε is POT's reg, the weight of −H(T) in <T, C> − reg·H(T), H(T) = −Σ T (log T − 1).

    Checked three ways: (i) POT's plan at reg = ε is stationary for that objective over the
    transport polytope (the derivative along any direction D with zero row and column sums,
    <C + ε log T, D>, vanishes) and not for weight 2ε or ε/2; (ii) our plan equals it
    (also test_plan_matches_pot); (iii) for ε ≥ 0.05, POT at reg = 2ε or ε/2 gives a visibly
    different plan, so (ii) pins the scaling.
    """
    n, m = 5, 7
    C, a, b = problem(rng, n, m)
    ours, _ = sk.forward(C, a, b, eps, converged_iters(C, a, b, eps))
    pot = pot_plan(C, a, b, eps)
    assert rel_err(ours, pot) <= PLAN_RTOL

    Z = rng.standard_normal((n, m))
    D = Z - Z.mean(1, keepdims=True) - Z.mean(0, keepdims=True) + Z.mean()   # T + tD stays feasible
    assert np.abs(D.sum(0)).max() < 1e-12 and np.abs(D.sum(1)).max() < 1e-12

    def slope(weight):   # d/dt of <T + tD, C> − weight·H(T + tD) at t = 0
        return float(((C + weight * np.log(pot)) * D).sum())

    scale = float((np.abs(C) * np.abs(D)).sum())
    assert abs(slope(eps)) <= 1e-9 * scale
    for wrong in (2 * eps, eps / 2):
        # slope(w) = (1 − w/ε)·<C, D> at this plan, so this only needs <C, D> ≠ 0 (≥ 8e-4 · scale
        # over 200 seeds)
        assert abs(slope(wrong)) > 1e-5 * scale
        if eps >= 0.05:
            # at ε = 0.01 the plan is close to the unregularised vertex, and halving or doubling
            # reg can move it by as little as ~1e-9: no control there
            assert rel_err(ours, pot_plan(C, a, b, wrong)) > 1e-4


@needs_pot
def test_pot_docstring_example():
    # regression values from POT's own ot.sinkhorn docstring (a = b = [.5, .5],
    # M = [[0, 1], [1, 0]], reg = 1); this symmetric case converges after one iteration
    plan, _ = sk.forward(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([0.5, 0.5]),
                       np.array([0.5, 0.5]), 1.0, 3)
    want = np.array([[0.36552929, 0.13447071], [0.13447071, 0.36552929]])
    np.testing.assert_allclose(plan, want, atol=1e-8)


# ---------------------------------------------------------------------------------------------
# 2. Gradients against torch autograd through POT's iterations
# ---------------------------------------------------------------------------------------------

@needs_pot
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("n, m, mass", [(7, 5, 1.0), (5, 9, 1.0), (3, 11, 2.5)])
def test_gradients_match_pot_autograd(n, m, mass, eps, rng):
    torch = pytest.importorskip("torch")
    C, a, b = problem(rng, n, m, mass)
    G = rng.standard_normal((n, m))              # upstream gradient of the loss <G, T>
    # three times the forward's convergence count: gradients converge more slowly than plans
    n_iters = 3 * converged_iters(C, a, b, eps)

    Ct, at, bt = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (C, a, b))
    # stopThr=0 never triggers, so POT runs exactly n_iters iterations (its loop updates v then
    # u, ours u then v; both reach the same fixed point)
    Tt = ot.sinkhorn(at, bt, Ct, eps, method="sinkhorn_log", numItermax=n_iters, stopThr=0.0,
                     warn=False)
    (Tt * torch.tensor(G)).sum().backward()
    want_C, want_a, want_b = (x.grad.numpy() for x in (Ct, at, bt))

    da_dir = rng.standard_normal(n)
    db_dir = rng.standard_normal(m)
    # a balanced perturbation: Σδa = Σδb (≠ 0, so the total mass moves too)
    db_dir += (da_dir.sum() - db_dir.sum()) / m
    want_dir = want_a @ da_dir + want_b @ db_dir
    dir_scale = np.abs(want_a) @ np.abs(da_dir) + np.abs(want_b) @ np.abs(db_dir)

    for mode in ("unrolled", "implicit"):
        plan, cache = sk.forward(C, a, b, eps, n_iters, backward=mode)
        assert rel_err(plan, Tt.detach().numpy()) <= PLAN_RTOL, mode
        dC, da, db = sk.backward(G, cache)
        GT = np.abs(G * plan).max()
        assert_grad_close(dC, want_C, GT / eps, f"{mode}: dcost")
        # marginal gradients are compared only where they are defined: zero-sum directions
        # (implicit mode fixes its own gauge, (da + k, db − k))
        assert_grad_close(centred(da), centred(want_a), np.abs(G).max(), f"{mode}: da")
        assert_grad_close(centred(db), centred(want_b), np.abs(G).max(), f"{mode}: db")
        got_dir = da @ da_dir + db @ db_dir
        assert abs(got_dir - want_dir) <= GRAD_RTOL * dir_scale, f"{mode}: <(da, db), δ>"


# ---------------------------------------------------------------------------------------------
# 3. Properties
# ---------------------------------------------------------------------------------------------

@st.composite
def problems(draw, eps_choices=(1.0, 0.1, 0.05, 1e-2), cost_hi=2.0):
    """(C, a, b, eps, n_iters): a cost in [0, cost_hi], positive marginals of a drawn mass."""
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 7).filter(lambda k: k != n))
    mass = draw(st.sampled_from([1.0, 0.3, 4.0]))
    C = draw(arrays((n, m), 0.0, cost_hi))
    a = draw(simplex(n)) * mass
    b = draw(simplex(m)) * mass
    return C, a, b, draw(st.sampled_from(eps_choices)), draw(st.sampled_from([1, 2, 7, 30]))


@given(prob=problems())
@xp_settings
def test_plan_invariants(prob, xp):
    """T ≥ 0; columns exact after the last (column) update; the reported row error is measured."""
    C, a, b, eps, n_iters = prob
    plan, cache = sk.forward(xp.asarray(C), xp.asarray(a), xp.asarray(b), eps, n_iters)
    plan, err = to_host(plan), to_host(cache.marginal_error)
    assert np.all(plan >= 0)
    # elementwise, relative to each b_j; holds for |C|/ε ≤ 200 (rounding in the log domain grows
    # with |C|/ε, which is why ε = 1e-3 is left to the stability test)
    assert np.all(np.abs(plan.sum(0) - b) <= 1e-12 * b)
    measured = np.abs(plan.sum(1) - a).sum()
    assert err.shape == ()
    np.testing.assert_allclose(err, measured, rtol=1e-12, atol=1e-15 * a.sum())
    row_err, col_err = (to_host(e) for e in marginal_errors(*(xp.asarray(x) for x in (plan, a, b))))
    np.testing.assert_allclose(row_err, measured, rtol=1e-12, atol=1e-15 * a.sum())
    assert col_err <= 1e-12 * b.sum()


@st.composite
def batched_problems(draw):
    """(C (B1, B2, n, m), a, b, eps, n_iters); a and b shared, (n,) / (m,), or per problem."""
    n = draw(st.integers(1, 5))
    m = draw(st.integers(1, 5).filter(lambda k: k != n))
    lead = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    C = draw(arrays(lead + (n, m), 0.0, 2.0))

    def marginal(k):
        if draw(st.booleans()):
            return draw(simplex(k))
        x = draw(arrays(lead + (k,), 1e-3, 1.0))
        return x / x.sum(-1, keepdims=True)

    eps = draw(st.sampled_from([1.0, 0.3, 0.1, 0.01]))
    return C, marginal(n), marginal(m), eps, draw(st.sampled_from([1, 3, 20]))


@given(prob=batched_problems(), mode=st.sampled_from(["unrolled", "implicit"]), seed=seeds)
@xp_settings
def test_batched_equals_loop(prob, mode, seed, xp):
    C, a, b, eps, n_iters = prob
    lead = C.shape[:-2]
    dplan = np.random.default_rng(seed).standard_normal(C.shape)
    plan, cache = sk.forward(xp.asarray(C), xp.asarray(a), xp.asarray(b), eps, n_iters, backward=mode)
    grads = [to_host(g) for g in sk.backward(xp.asarray(dplan), cache)]
    plan, err = to_host(plan), to_host(cache.marginal_error)
    assert plan.shape == C.shape and err.shape == lead
    assert grads[1].shape == lead + a.shape[-1:] and grads[2].shape == lead + b.shape[-1:]
    for idx in np.ndindex(*lead):
        ai = a[idx] if a.ndim > 1 else a
        bi = b[idx] if b.ndim > 1 else b
        p1, c1 = sk.forward(xp.asarray(C[idx]), xp.asarray(ai), xp.asarray(bi), eps, n_iters,
                            backward=mode)
        # The domain (scaling or log) is chosen for the whole batch: one problem whose kernel could
        # underflow sends every problem of the batch to the log domain, while solved alone the
        # others run on scalings. Then the two agree to rounding (as the domains do everywhere,
        # tests/core/test_losses.py), not bit for bit.
        same = (cache.E is None) == (c1.E is None)
        np.testing.assert_allclose(plan[idx], to_host(p1), rtol=1e-12, atol=1e-300 if same else 1e-15)
        np.testing.assert_allclose(err[idx], to_host(c1.marginal_error), rtol=1e-10, atol=1e-15 if same else 1e-13)
        g1 = sk.backward(xp.asarray(dplan[idx]), c1)
        # Relative to max |want|, floored at 1e-6 of the size of the terms each gradient is a
        # cancellation of (as assert_grad_close): a one-row problem's plan is b whatever the cost,
        # so its true dcost is 0 and each domain returns its own rounding (-0 vs 5e-15, found by
        # hypothesis), which only an absolute comparison at that scale can judge.
        scales = (np.abs(dplan[idx] * plan[idx]).max() / eps, np.abs(dplan[idx]).max(), np.abs(dplan[idx]).max())
        for name, got, want, scale in zip(("dcost", "da", "db"), grads, g1, scales):
            want = to_host(want)
            diff = np.abs(got[idx] - want).max()
            assert diff <= (1e-10 if same else 1e-9) * max(np.abs(want).max(), 1e-6 * scale), name


@st.composite
def tiny_marginals(draw, k):
    """A probability vector whose entries are partly ~1e-30 (positive), renormalised."""
    x = draw(simplex(k))
    tiny = np.array(draw(st.lists(st.booleans(), min_size=k, max_size=k)))
    tiny[draw(st.integers(0, k - 1))] = False                   # some real mass somewhere
    x = np.where(tiny, 1e-30 * draw(st.sampled_from([0.5, 1.0, 3.0])), x)
    return x / x.sum()


@st.composite
def hard_problems(draw):
    n = draw(st.integers(1, 7))
    m = draw(st.integers(1, 7).filter(lambda k: k != n))
    C = draw(arrays((n, m), 0.0, 2.0))
    return (C, draw(tiny_marginals(n)), draw(tiny_marginals(m)),
            draw(st.sampled_from([1.0, 0.1, 1e-2, 1e-3])), draw(st.sampled_from([1, 4, 50, 200])))


@given(prob=hard_problems(), seed=seeds)
@xp_settings
def test_stable_small_eps_tiny_marginals(prob, seed, xp):
    """ε down to 1e-3, costs in [0, 2], marginal entries ~1e-30: plan and gradients finite."""
    C, a, b, eps, n_iters = prob
    assert np.all(a > 0) and np.all(b > 0)
    plan, cache = sk.forward(xp.asarray(C), xp.asarray(a), xp.asarray(b), eps, n_iters)
    dplan = np.random.default_rng(seed).standard_normal(C.shape)
    dC, da, db = (to_host(g) for g in sk.backward(xp.asarray(dplan), cache))
    plan = to_host(plan)
    assert np.all(np.isfinite(plan)) and np.all(plan >= 0)
    assert np.isfinite(to_host(cache.marginal_error))
    np.testing.assert_allclose(plan.sum(), 1.0, rtol=1e-9)    # columns exact, so the mass is
    for name, g in (("dcost", dC), ("da", da), ("db", db)):
        assert np.all(np.isfinite(g)), name


@given(prob=problems(eps_choices=(0.05,)))
@xp_settings
def test_float32_matches_float64(prob, xp):
    C, a, b, eps, n_iters = prob
    p64, _ = sk.forward(xp.asarray(C), xp.asarray(a), xp.asarray(b), eps, n_iters)
    p32, _ = sk.forward(xp.asarray(C, dtype=xp.float32), xp.asarray(a, dtype=xp.float32),
                      xp.asarray(b, dtype=xp.float32), eps, n_iters)
    p32 = to_host(p32)
    assert p32.dtype == np.float32
    assert rel_err(p32, to_host(p64)) <= 1e-4


# ---------------------------------------------------------------------------------------------
# Implicit mode on nearly deterministic plans (found by these tests: the Schur complement's
# diagonal c_j − Σ_i T_ij²/r_i cancelled to exactly 0 and the solve raised LinAlgError)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("C, a, b, eps", [
    # converged in one iteration (symmetric); true dcost ≈ ±1.9e-17 · [[-1, 1], [1, -1]]
    ([[0.0, 2.0], [2.0, 0.0]], [0.5, 0.5], [0.5, 0.5], 0.05),
    # a converged plan with a 1e-30 column mass
    ([[0.2, 1.3], [0.9, 0.4]], [0.6, 0.4], [1.0 - 1e-30, 1e-30], 1.0),
], ids=["eps0.05-deterministic", "tiny-column-mass"])
def test_implicit_backward_nearly_deterministic(C, a, b, eps):
    C, a, b = np.array(C), np.array(a), np.array(b)
    dplan = np.array([[0.3, -1.2], [0.7, 0.1]])
    plan, cache = sk.forward(C, a, b, eps, 50, backward="implicit")
    assert cache.marginal_error < 1e-12
    dC, da, db = sk.backward(dplan, cache)
    assert all(np.all(np.isfinite(g)) for g in (dC, da, db))
    # both true gradients are ~1e-17: agree with the long unrolled run at the scale of |G|/eps
    ref = sk.backward(dplan, sk.forward(C, a, b, eps, 3000)[1])[0]
    scale = np.abs(dplan * plan).max() / eps
    assert np.abs(dC - ref).max() <= 1e-9 * scale


@given(n=st.integers(2, 6), m=st.integers(2, 6), eps=st.sampled_from([1e-2, 3e-3, 1e-3]),
       tiny=st.booleans(), seed=seeds)
def test_implicit_backward_finite_on_converged_small_eps(n, m, eps, tiny, seed):
    rng = np.random.default_rng(seed)
    C = rng.random((n, m)) * 2
    a, b = rng.random(n) + 0.05, rng.random(m) + 0.05
    if tiny:
        a[0] = 1e-30
    a, b = a / a.sum(), b / b.sum()
    _, cache = sk.forward(C, a, b, eps, 2000, backward="implicit")
    grads = sk.backward(rng.standard_normal((n, m)), cache)
    assert all(np.all(np.isfinite(g)) for g in grads)


# ---------------------------------------------------------------------------------------------
# 4. Errors
# ---------------------------------------------------------------------------------------------

def _ok_args(xp):
    rng = np.random.default_rng(7)
    C, a, b = problem(rng, 3, 5)
    return xp.asarray(C), xp.asarray(a), xp.asarray(b)


@pytest.mark.parametrize("eps", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_eps(eps, xp):
    with pytest.raises(ValueError, match="eps"):
        sk.forward(*_ok_args(xp), eps, 5)


@pytest.mark.parametrize("n_iters", [0, -2, 2.5])
def test_bad_n_iters(n_iters, xp):
    with pytest.raises(ValueError, match="n_iters"):
        sk.forward(*_ok_args(xp), 0.1, n_iters)


def test_bad_backward_mode(xp):
    with pytest.raises(ValueError, match="backward"):
        sk.forward(*_ok_args(xp), 0.1, 5, backward="exact")


@pytest.mark.parametrize("which, value", [("a", 0.0), ("a", -0.2), ("b", 0.0), ("b", -0.1)])
def test_nonpositive_marginal(which, value, xp):
    C, a, b = (to_host(x).copy() for x in _ok_args(xp))
    x = a if which == "a" else b
    x[1] = value
    x[0] += -value                                   # keep the masses equal
    # the message names both marginals ("a and b"), not only the offending one
    with pytest.raises(ValueError, match=r"marginals a and b must be strictly positive") as e:
        sk.forward(xp.asarray(C), xp.asarray(a), xp.asarray(b), 0.1, 5)
    assert not isinstance(e.value, NonFiniteError)   # bad input, not a divergence


@pytest.mark.parametrize("which, value", [("a", float("nan")), ("b", float("inf")), ("cost", float("nan")),
                                          ("cost", -float("inf"))])
def test_non_finite_input_is_a_non_finite_error(which, value, xp):
    """NaN or inf (what diverging parameters produce) raise omh-ref's NonFiniteError, the one type
    training reports as a divergence."""
    C, a, b = (to_host(x).copy() for x in _ok_args(xp))
    {"a": a, "b": b, "cost": C}[which].flat[1] = value
    with pytest.raises(NonFiniteError, match="NaN or inf"):
        sk.forward(xp.asarray(C), xp.asarray(a), xp.asarray(b), 0.1, 5)


@pytest.mark.parametrize("case", ["a-length", "b-length", "swapped", "cost-1d"])
def test_mismatched_shapes(case, xp):
    C, a, b = _ok_args(xp)
    args, pattern = {
        "a-length": ((C, xp.ones(4) / 4, b), r"got a \(4,\), b \(5,\)"),
        "b-length": ((C, a, xp.ones(3) / 3), r"got a \(3,\), b \(3,\)"),
        "swapped": ((C, b, a), r"got a \(5,\), b \(3,\)"),
        "cost-1d": ((C[0], a, b), r"cost must have shape"),
    }[case]
    with pytest.raises(ValueError, match=pattern):
        sk.forward(*args, 0.1, 5)


@pytest.mark.parametrize("which, lead", [("a", (4,)), ("b", (4,)), ("a", (2, 2)), ("b", (3, 1))])
def test_mismatched_leading_axes(which, lead, xp):
    C, a, b = _ok_args(xp)
    C = xp.stack([C, C])                                            # 2, 3, 5
    if which == "a":
        a = xp.broadcast_to(a, lead + a.shape).copy()               # *lead, 3
        shape = lead + (3,)
    else:
        b = xp.broadcast_to(b, lead + b.shape).copy()               # *lead, 5
        shape = lead + (5,)
    with pytest.raises(ValueError, match=rf"marginal {which} of shape {re.escape(str(shape))}"):
        sk.forward(C, a, b, 0.1, 5)


@pytest.mark.parametrize("scale_b", [1.01, 0.5])
def test_unequal_masses(scale_b, xp):
    C, a, b = _ok_args(xp)
    with pytest.raises(ValueError, match=r"equal total mass \(sum a == sum b\)"):
        sk.forward(C, a, b * scale_b, 0.1, 5)


def test_nonfinite_cost(xp):
    C, a, b = _ok_args(xp)
    C = to_host(C).copy()
    C[1, 2] = np.inf
    with pytest.raises(NonFiniteError, match="cost contains NaN or inf"):
        sk.forward(xp.asarray(C), a, b, 0.1, 5)
