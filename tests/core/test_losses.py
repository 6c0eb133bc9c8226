"""Property tests of the three losses: gradients (float64), invariants, finiteness at extremes."""
import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from omh_ref.core.checks import hierarchy_from_logits
from omh_ref.core.gradcheck import check_vjp
from omh_ref.core.losses import cluster, correlation, hierarchy
from omh_ref.core.ops import log_softmax
from tests.strategies import dims, seeds, small

try:
    import ot
except ImportError:  # POT is in the [test] extra; only the comparisons with it need it
    ot = None

needs_pot = pytest.mark.skipif(ot is None, reason="POT (pip install pot) is not installed")


def _rand(seed):
    rng = np.random.default_rng(seed)
    return rng, (lambda *s: rng.standard_normal(s))


@given(N=small, S=dims, D=dims, shift=st.floats(-0.5, 0.7), pointwise=st.booleans(),
       zero_clamp=st.booleans(), seed=seeds)
def test_correlation_grad(N, S, D, shift, pointwise, zero_clamp, seed):
    rng, r = _rand(seed)
    f1, f2 = r(N, S, 3, 7), r(N, 2, S, 7)

    def fwd(c1, c2):
        return correlation.forward(f1, f2, c1, c2, shift, pointwise, zero_clamp)
    assert check_vjp(fwd, correlation.backward, (r(N, S, 3, D), r(N, 2, S, D)), seed=seed).passed


def _correlation_by_hand(f1, f2, c1, c2, shift, pointwise, zero_clamp):
    """STEGO's loss written out with einsum over (image, point, point'), for the values below."""
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    flat = lambda x: unit(x.reshape(x.shape[0], -1, x.shape[-1]))   # noqa: E731
    F = np.einsum("npc,nqc->npq", flat(f1), flat(f2))
    if pointwise:
        F = F - F.mean(axis=2, keepdims=True) + F.mean()   # the mean of a centred F is 0
    Sc = np.einsum("npd,nqd->npq", flat(c1), flat(c2))
    if zero_clamp:
        Sc = np.maximum(Sc, 0)
    return -np.mean(Sc * (F - shift)), Sc


def test_correlation_pointwise_centring_and_clamp():
    rng, r = _rand(0)
    f1, f2, c1, c2 = r(2, 3, 3, 5), r(2, 3, 3, 5), r(2, 3, 3, 4), r(2, 3, 3, 4)
    _, (Fs, mask, *_) = correlation.forward(f1, f2, c1, c2, 0.0, pointwise=True)
    # each row's mean is the batch mean: F − mean_row F + mean F
    np.testing.assert_allclose(Fs.mean(axis=2), np.broadcast_to(Fs.mean(), Fs.shape[:2]), atol=1e-12)
    _, Sc = _correlation_by_hand(f1, f2, -c1, c2, 0.3, True, False)
    assert (Sc < -0.1).sum() >= 10          # the clamp has negative correlations to remove here
    for pointwise in (True, False):
        for zero_clamp in (True, False):
            got, _ = correlation.forward(f1, f2, -c1, c2, 0.3, pointwise, zero_clamp)
            want, _ = _correlation_by_hand(f1, f2, -c1, c2, 0.3, pointwise, zero_clamp)
            np.testing.assert_allclose(got, want, rtol=1e-12, err_msg=f"{pointwise=} {zero_clamp=}")


def test_correlation_zero_codes_finite():
    rng, r = _rand(1)
    f = r(2, 3, 3, 5)
    loss, cache = correlation.forward(f, f, np.zeros((2, 3, 3, 4)), np.zeros((2, 3, 3, 4)), 0.1)
    dc1, dc2 = correlation.backward(1.0, cache)
    assert np.isfinite(loss) and np.all(np.isfinite(dc1)) and np.all(np.isfinite(dc2))


@pytest.mark.parametrize("target", cluster.TARGETS)
@given(P=st.integers(3, 20), K=dims, tau=st.sampled_from([0.1, 0.5]), seed=seeds)
def test_cluster_grad(target, P, K, tau, seed):
    rng, r = _rand(seed)
    s = np.tanh(r(P, K))
    Q = {"relaxed": cluster.relaxed_targets(s, 0.1, 10, 0.5)[0], "balanced": cluster.balanced_targets(s, 0.1, 10)[0],
         "hard": cluster.hard_targets(s), "teacher": cluster.hard_targets(np.tanh(r(P, K)))}[target]

    def fwd(s, logp):
        return cluster.forward(s, logp, target, Q=Q)
    assert check_vjp(fwd, cluster.backward, (s, log_softmax.forward(s, tau)[0]), seed=seed).passed


def test_teacher_targets_come_from_the_caller():
    s = np.tanh(np.random.default_rng(0).standard_normal((4, 3)))
    with pytest.raises(ValueError, match="the caller gives the targets"):
        cluster.forward(s, log_softmax.forward(s, 1.0)[0], "teacher")
    Q = cluster.hard_targets(s[::-1].copy())
    loss, _ = cluster.forward(s, log_softmax.forward(s, 1.0)[0], "teacher", Q=Q)
    assert np.isclose(float(loss), -(Q * log_softmax.forward(s, 1.0)[0]).sum() / 4)


def test_hard_targets_break_ties_to_the_lowest_index():
    """Tied maxima give one 1 at the first of them (torch.argmax, STEGO's one_hot(argmax)), so a
    tied row's hard loss is −max s, not −(number of ties)·max s."""
    s = np.array([[0.5, 0.5, 0.1],       # tie at the front
                  [-0.2, 0.3, 0.3],      # tie at the back
                  [0.7, 0.7, 0.7],       # all tied
                  [0.1, -0.4, 0.9]])     # no tie
    Q = cluster.hard_targets(s)
    np.testing.assert_array_equal(Q, [[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    assert Q.dtype == s.dtype
    loss, _ = cluster.forward(s, log_softmax.forward(s, 0.1)[0], "hard")
    assert loss == pytest.approx(-(0.5 + 0.3 + 0.7 + 0.9) / 4, rel=1e-15)


@given(P=st.integers(5, 40), K=dims, eps=st.sampled_from([1.0, 0.05, 1e-3]), seed=seeds)
def test_balanced_targets_are_balanced(P, K, eps, seed):
    """At any ε: non-negative, finite, every cluster exactly P/K (the last update is the column
    one), and the reported row error is the measured one. Rows are not claimed to sum to 1 here:
    at ε = 1e-3, 200 iterations leave them off by up to 0.2 (see the next test for convergence)."""
    rng, r = _rand(seed)
    s = np.clip(r(P, K), -1, 1)
    Q, err = cluster.balanced_targets(s, eps, 200)
    assert np.all(Q >= 0) and np.all(np.isfinite(Q))
    np.testing.assert_allclose(Q.sum(0), P / K, rtol=1e-9)      # columns exact after the v-update
    np.testing.assert_allclose(err, np.abs(Q.sum(1) - 1).mean(), rtol=1e-12, atol=1e-15)


def _pot_plan(C, a, b, eps):
    """POT's log-domain plan run to its own stopping test (L2 column error 1e-14)."""
    plan, log = ot.sinkhorn(a, b, C, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-14,
                            warn=False, log=True)
    assert float(log["err"][-1]) < 1e-14, "POT did not converge"
    return plan


@needs_pot
@pytest.mark.parametrize("eps,iters", [(1.0, 30), (0.2, 300)])
@given(P=st.integers(5, 40), K=dims, seed=seeds)
def test_balanced_targets_converge_to_pots_plan(eps, iters, P, K, seed):
    """P times POT's converged plan, and so rows that sum to 1, to a tolerance set from outside
    (measured: ≤ 3.3e-14 over 100 random problems at these counts). Distinct logits (tanh, not a
    clip that ties many at ±1): tied costs make a degenerate problem Sinkhorn converges to slowly."""
    rng, r = _rand(seed)
    s = np.tanh(r(P, K))
    Q, _ = cluster.balanced_targets(s, eps, iters)
    np.testing.assert_allclose(Q, P * _pot_plan(1 - s, np.full(P, 1 / P), np.full(K, 1 / K), eps), atol=1e-12)
    np.testing.assert_allclose(Q.sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("marginals,mode,eps,iters", [
    ("uniform", "unrolled", 0.05, 30), ("uniform", "unrolled", 1e-3, 40),
    ("usage", "unrolled", 0.3, 15), ("usage", "implicit", 0.2, 800), ("uniform", "implicit", 0.1, 1500)])
@given(P=st.integers(2, 12), Kp=st.integers(1, 4), extra=st.integers(1, 3), D=dims, seed=seeds)
def test_hierarchy_grad(marginals, mode, eps, iters, P, Kp, extra, D, seed):
    rng, r = _rand(seed)
    Kc = Kp + extra
    args = (r(P, Kc), r(P, Kp), r(Kc, D), r(Kp, D))
    kw = dict(eps=eps, n_iters=iters, marginals=marginals, backward_mode=mode)
    if mode == "implicit":  # exact only at the fixed point: judge converged problems only
        lc, lp = log_softmax.forward(args[0], 0.5)[0], log_softmax.forward(args[1], 0.5)[0]
        err = hierarchy.forward(lc, lp, args[2], args[3], **kw)[1].diag["marginal_error"]
        assume(float(err) < 1e-12)
    # At eps=1e-3 the potentials are ~C/eps: the 4-point stencil (measured over 600 random cases:
    # max error 8e-7 at step 3e-5, against 2e-5 for the 2-point one at any step).
    fd = dict(stencil=4, eps=3e-5) if eps < 0.01 else {}
    assert check_vjp(*hierarchy_from_logits(**kw), args, seed=seed, **fd).passed


@given(seed=seeds, eps=st.sampled_from([1.0, 0.05, 1e-3]))
def test_hierarchy_plan_invariants(seed, eps):
    """At any ε: T ≥ 0, columns exact, A = diag(1/a) T, the reported row error and sparsity are
    the measured ones, gradients finite (convergence of the rows: the next test)."""
    rng, r = _rand(seed)
    lc, _ = log_softmax.forward(r(9, 5), 0.1)
    lp, _ = log_softmax.forward(r(9, 3), 0.1)
    loss, cache = hierarchy.forward(lc, lp, r(5, 4), r(3, 4), eps=eps, n_iters=50)
    diag = cache.diag
    T, A = diag["plan"], cache.A
    assert np.isfinite(loss) and np.all(T >= 0)
    np.testing.assert_allclose(T.sum(0), 1 / 3, rtol=1e-9)
    np.testing.assert_allclose(A, 5 * T, rtol=1e-15)                     # uniform a = 1/5
    np.testing.assert_allclose(float(diag["marginal_error"]), np.abs(T.sum(1) - 0.2).sum(), rtol=1e-12, atol=1e-16)
    np.testing.assert_allclose(float(diag["plan_sparsity"]), A.max(1).mean(), rtol=1e-15)
    assert 1 / 3 - 1e-9 <= float(diag["plan_sparsity"]) <= 1 + 1e-9
    grads = hierarchy.backward(1.0, cache)
    assert all(np.all(np.isfinite(g)) for g in grads)


@needs_pot
@pytest.mark.parametrize("eps,iters", [(1.0, 50), (0.2, 300), (0.05, 300)])
@given(seed=seeds)
def test_hierarchy_plan_converges_to_pots_plan(eps, iters, seed):
    """The hierarchy's plan is POT's converged plan on the centroids' cost 1 − cos, and A's rows
    sum to 1, to a tolerance set from outside (measured ≤ 7e-15 over 100 problems)."""
    from omh_ref.core.ops import cosine

    rng, r = _rand(seed)
    lc, _ = log_softmax.forward(r(9, 5), 0.1)
    lp, _ = log_softmax.forward(r(9, 3), 0.1)
    Mc, Mp = r(5, 4), r(3, 4)
    _, cache = hierarchy.forward(lc, lp, Mc, Mp, eps=eps, n_iters=iters)
    want = _pot_plan(1 - cosine.forward(Mc, Mp)[0], np.full(5, 0.2), np.full(3, 1 / 3), eps)
    np.testing.assert_allclose(cache.diag["plan"], want, atol=1e-13)
    np.testing.assert_allclose(cache.A.sum(1), 1.0, atol=1e-12)


def test_hierarchy_small_eps_is_nearly_sparse():
    rng, r = _rand(3)
    Mp = r(3, 6)
    Mc = np.repeat(Mp, 2, axis=0) + 0.05 * r(6, 6)   # two children near each parent
    lc, _ = log_softmax.forward(r(20, 6), 0.1)
    lp, _ = log_softmax.forward(r(20, 3), 0.1)
    sparsity = {}
    for eps in (1.0, 0.01):
        _, cache = hierarchy.forward(lc, lp, Mc, Mp, eps=eps, n_iters=300)
        sparsity[eps] = float(cache.diag["plan_sparsity"])
    assert sparsity[0.01] > 0.99 > sparsity[1.0]


def test_hierarchy_extreme_logits_finite():
    # Saturated assignments (tau small, large logits) and eps=1e-3: nothing overflows or turns NaN.
    rng, r = _rand(4)
    lc, _ = log_softmax.forward(300 * r(7, 6), 0.01)
    lp, _ = log_softmax.forward(300 * r(7, 3), 0.01)
    for marginals in hierarchy.MARGINALS:
        loss, cache = hierarchy.forward(lc, lp, r(6, 4), r(3, 4), eps=1e-3, n_iters=50, marginals=marginals)
        grads = hierarchy.backward(1.0, cache)
        assert np.isfinite(loss) and all(np.all(np.isfinite(g)) for g in grads)


def test_unknown_choices_are_named():
    s = np.zeros((3, 2))
    with pytest.raises(ValueError, match="cluster_target"):
        cluster.forward(s, s, "fuzzy")
    with pytest.raises(ValueError, match="marginals"):
        hierarchy.forward(s, s, np.ones((2, 3)), np.ones((2, 3)), marginals="mass")


@given(P=st.integers(5, 30), K=dims, seed=seeds)
def test_relaxed_targets_interpolate_between_softmax_and_balanced(P, K, seed):
    rng, r = _rand(seed)
    s = np.clip(r(P, K), -1, 1)
    eps = 0.1
    if ot is not None:
        # rho -> inf: P times the balanced plan, POT's, converged (at ε = 0.2, where 300
        # iterations converge; ρ = 1e9 leaves ~5e-10, measured over 100 problems). Distinct
        # logits: ties at a clip's ±1 make a degenerate problem that converges slowly.
        t = np.tanh(r(P, K))
        Qbig, _ = cluster.relaxed_targets(t, 0.2, 300, 1e9)
        np.testing.assert_allclose(Qbig, P * _pot_plan(1 - t, np.full(P, 1 / P), np.full(K, 1 / K), 0.2), atol=1e-8)
    Qsmall, _ = cluster.relaxed_targets(s, eps, 50, 1e-9)
    soft = np.exp(s / eps - np.log(np.exp(s / eps).sum(1, keepdims=True)))
    np.testing.assert_allclose(Qsmall, soft, atol=1e-6)       # rho -> 0: each pixel's softmax
    Q, _ = cluster.relaxed_targets(s, eps, 50, 0.3)
    assert np.all(Q >= 0)
    np.testing.assert_allclose(Q.sum(1), 1.0, rtol=1e-12)     # rows exact
    # the column masses lie between the softmax's and the balanced ones (in spread)
    assert Q.sum(0).std() <= soft.sum(0).std() + 1e-9


@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_balanced_targets_float32_match_the_generic_plan(eps):
    """The paper-scale dtype: float32 targets (scaling domain, BLAS products) agree with P x the
    generic sinkhorn plan to float32 rounding, and bad arguments are ValueErrors."""
    from omh_ref.core.ops import sinkhorn as sk

    rng = np.random.default_rng(0)
    s = np.clip(rng.uniform(-1, 1, (300, 27)), -1, 1).astype(np.float32)
    Q, err = cluster.balanced_targets(s, eps, 20)
    plan, cache = sk.forward(1 - s, np.full(300, 1 / 300, np.float32), np.full(27, 1 / 27, np.float32), eps, 20)
    assert Q.dtype == np.float32
    np.testing.assert_allclose(Q, 300 * plan, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(Q.sum(0), 300 / 27, rtol=1e-5)
    with pytest.raises(ValueError, match="n_iters must be a positive integer"):
        cluster.balanced_targets(s, eps, 0)
    with pytest.raises(ValueError, match=r"rho must be a positive finite number \(inf: balanced_targets\)"):
        cluster.relaxed_targets(s, eps, 20, math.inf)


@given(P=st.integers(3, 40), K=dims, eps=st.sampled_from([0.05, 0.1, 1.0]),
       rho=st.sampled_from([0.05, 1.0, 50.0, math.inf]), seed=seeds)
def test_targets_scaling_domain_equals_log_domain(P, K, eps, rho, seed):
    """Relaxed (finite rho) and balanced (rho = inf) targets: the scaling-domain loop equals the
    log-domain one, and the balanced targets are P times the generic ``sinkhorn`` plan."""
    rng, r = _rand(seed)
    s = np.clip(3 * r(P, K), -1, 1)
    from omh_ref.core.ops import sinkhorn as sk

    def targets():
        if math.isinf(rho):
            return cluster.balanced_targets(s, eps, 15)
        return cluster.relaxed_targets(s, eps, 15, rho)

    assert sk.scaling_safe(1 - s, np.ones(P), np.ones(K), eps)  # span <= 2/0.05: scaling domain
    fast, ferr = targets()
    old = sk.SCALING_MAX_SPAN
    try:
        sk.SCALING_MAX_SPAN = -1.0                              # force the log domain
        slow, serr = targets()
        if math.isinf(rho):
            plan, cache = sk.forward(1 - s, np.full(P, 1 / P), np.full(K, 1 / K), eps, 15)
            np.testing.assert_allclose(slow, P * plan, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(serr, float(cache.marginal_error), rtol=1e-6, atol=1e-15)
    finally:
        sk.SCALING_MAX_SPAN = old
    np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ferr, serr, rtol=1e-6, atol=1e-12)
