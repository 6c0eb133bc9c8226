"""The oracle itself must be able to fail: wrong gradients are caught, right ones pass."""
import numpy as np
import pytest

from omh_ref.core.gradcheck import check_jacobian, check_vjp
from omh_ref.core.ops import linear


def _linear_fns(bug=None):
    """linear's forward and a backward with an optional planted bug."""
    def backward(v, cache):
        dx, dW, db = linear.backward(v, cache)
        _, W, xshape = cache
        if bug == "scale":
            dW = dW * 1.001
        elif bug == "transpose":
            dx = (v.reshape(-1, W.shape[0]) @ W[::-1]).reshape(xshape)
        elif bug == "bias":
            db = db[::-1].copy()
        return dx, dW, db
    return linear.forward, backward


def _args(rng):
    return rng.standard_normal((3, 5, 4)), rng.standard_normal((2, 4)), rng.standard_normal(2)


def test_correct_gradient_passes():
    rng = np.random.default_rng(0)
    assert check_vjp(*_linear_fns(), _args(rng)).passed
    assert check_jacobian(*_linear_fns(), _args(rng)).passed


@pytest.mark.parametrize("bug", ["scale", "transpose", "bias"])
def test_wrong_gradient_fails(bug):
    rng = np.random.default_rng(1)
    rep = check_vjp(*_linear_fns(bug), _args(rng))
    assert not rep.passed and rep.max_rel_err > 1e-5
    assert not check_jacobian(*_linear_fns(bug), _args(rng)).passed


def test_only_checked_arguments_are_judged():
    rng = np.random.default_rng(2)
    assert check_vjp(*_linear_fns("bias"), _args(rng), wrt=[0, 1]).passed


def test_float32_is_refused():
    rng = np.random.default_rng(3)
    args = tuple(a.astype(np.float32) for a in _args(rng))
    with pytest.raises(ValueError, match="float64"):
        check_vjp(*_linear_fns(), args)


def test_kink_within_one_step_is_judged_at_a_finer_step():
    # relu with an entry 3e-7 from its kink: the 1e-6 step straddles it, the 1e-8 step does not.
    from omh_ref.core.ops import relu

    x = np.random.default_rng(4).standard_normal((4, 5))
    x[1, 2] = 3e-7
    assert check_vjp(relu.forward, relu.backward, (x,), n_dirs=5).passed

    def wrong(v, cache):
        return relu.backward(v, cache) * 1.01
    assert not check_vjp(relu.forward, wrong, (x,), n_dirs=5).passed


def test_a_sinkhorn_case_fails_when_it_runs_another_domain():
    # the suite's Sinkhorn cases name their domain; one that ran the other path must not pass
    from omh_ref.core.checks import check_in_domain, sinkhorn_case

    rng = np.random.default_rng(5)
    scaling = sinkhorn_case(rng, 1e-3, 20, spread=0.02)                # span/ε ≤ 20
    log = sinkhorn_case(rng, 1e-3, 20, spread=0.02, offset=2.0)        # span/ε ≥ 1980
    assert check_in_domain(scaling, "scaling", "s", eps=1e-8).passed
    assert check_in_domain(log, "log", "l", stencil=4, eps=1e-5).passed
    rep = check_in_domain(scaling, "log", "s")
    assert not rep.passed and "ran the scaling domain" in rep.name
    assert not check_in_domain(log, "scaling", "l").passed


def test_the_hierarchy_is_checked_in_both_domains_and_a_wrong_domain_fails():
    """``omh-ref gradcheck`` checks the hierarchy with each marginal at a scaling-domain and a
    log-domain ε, and the whole model in the log domain too; a hierarchy case whose plan ran the
    other domain does not pass."""
    from omh_ref.core import checks
    from omh_ref.core.losses.hierarchy import MARGINALS

    names = [n for n, _ in checks.cases(0)]
    for marg in MARGINALS:
        for domain in ("scaling", "log"):
            assert any(n.startswith(f"hierarchy {marg} ") and n.endswith(f" {domain}") for n in names), (marg, domain)
    assert {"model omh relaxed log", "model omh uniform log"} <= set(names)
    rng = np.random.default_rng(3)
    args = tuple(rng.standard_normal(s) for s in ((12, 5), (12, 3), (5, 4), (3, 4)))
    log = checks.hierarchy_from_logits(eps=checks.HIER_LOG_EPS, n_iters=40, marginals="usage")
    assert checks.check_hierarchy_in_domain(log, args, "log", "l").passed
    rep = checks.check_hierarchy_in_domain(log, args, "scaling", "l")
    assert not rep.passed and "ran the log domain" in rep.name
    scaling = checks.hierarchy_from_logits(eps=0.3, n_iters=20)
    assert not checks.check_hierarchy_in_domain(scaling, args, "log", "s").passed
