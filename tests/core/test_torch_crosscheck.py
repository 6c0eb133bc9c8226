"""omh_ref's NumPy values and hand-written gradients against an independent torch rendering
(``omh_ref/core/torch_reference.py``, float64 autograd): every op, STEGO's correlation loss, Sinkhorn
(plan, and gradients w.r.t. cost and marginals), the cluster targets, the hierarchy loss and the
whole model. Agreement required: 1e-8 relative for values, 1e-6 relative for gradients.

Upstream gradients are random (never all ones); sizes are odd and distinct so transposes fail.
"""
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from omh_ref.core import bases, fixtures, head, model  # noqa: E402
from omh_ref.core.config import Config  # noqa: E402
from omh_ref.core.losses import cluster, correlation, hierarchy  # noqa: E402
from omh_ref.core.ops import (cosine, dropout, grid_sample, kl, linear, log_softmax,  # noqa: E402
                         normalize, relu, resize, softmax)
from omh_ref.core.ops import silu  # noqa: E402
from omh_ref.core.ops import sinkhorn as sk  # noqa: E402
from omh_ref.core import torch_reference as tr  # noqa: E402

VAL_RTOL = 1e-8    # forward values
GRAD_RTOL = 1e-6   # gradients


def rel_err(got, want):
    """max |got − want| / max |want| (0 when both are exactly zero)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    err = np.abs(got - want).max(initial=0.0)
    return err / max(np.abs(want).max(initial=0.0), 1e-300) if err > 0 else 0.0


def assert_close(got, want, rtol, what, scale=None):
    """rel_err(got, want) <= rtol; ``scale`` replaces max |want| as the denominator where the
    result is a cancellation of much larger terms (then only errors at that scale mean a bug)."""
    e = rel_err(got, want)
    if scale is not None:
        e = e * max(np.abs(np.asarray(want)).max(initial=0.0), 1e-300) / scale
    assert e <= rtol, f"{what}: relative error {e:.3e} > {rtol:.0e}"


def np_(t):
    return t.detach().numpy()


def torch_vjp(fn, args, dout, wrt):
    """torch output of fn(*args) and autograd gradients of <fn(*args), dout> w.r.t. args[wrt]."""
    targs = [tr.tensor(a, requires_grad=i in wrt) if isinstance(a, np.ndarray) else a
             for i, a in enumerate(args)]
    out = fn(*targs)
    g = torch.autograd.grad((out * tr.tensor(dout)).sum(), [targs[i] for i in wrt], allow_unused=True)
    return np_(out), [np.zeros_like(args[i]) if x is None else np_(x) for i, x in zip(wrt, g)]


@pytest.fixture
def rng(request):
    # one generator per test, seeded by the test's id (crc32: stable across processes, unlike
    # hash()) so parametrised cases differ and every run draws the same numbers
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


# ---------------------------------------------------------------- ops

@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (5, 3)])
def test_linear(rng, shape):
    D = 3 if shape[-1] != 3 else 2
    x, W, b = rng.standard_normal(shape), rng.standard_normal((D, shape[-1])), rng.standard_normal(D)
    y, cache = linear.forward(x, W, b)
    dy = rng.standard_normal(y.shape)
    ty, (dx, dW, db) = torch_vjp(tr.linear, (x, W, b), dy, [0, 1, 2])
    assert_close(y, ty, VAL_RTOL, "linear y")
    for got, want, name in zip(linear.backward(dy, cache), (dx, dW, db), ("dx", "dW", "db")):
        assert_close(got, want, GRAD_RTOL, f"linear {name}")
    for got, want, name in zip(linear.backward_params(dy, cache), (dW, db), ("dW", "db")):
        assert_close(got, want, GRAD_RTOL, f"linear backward_params {name}")


def test_relu(rng):
    x = rng.standard_normal((3, 5, 2, 7))
    x = x + np.where(x >= 0, 1e-3, -1e-3)   # off the kink, where torch and we agree by convention only
    y, cache = relu.forward(x)
    dy = rng.standard_normal(y.shape)
    ty, (dx,) = torch_vjp(tr.relu, (x,), dy, [0])
    assert_close(y, ty, VAL_RTOL, "relu y")
    assert_close(relu.backward(dy, cache), dx, GRAD_RTOL, "relu dx")


def test_silu(rng):
    x = 4 * rng.standard_normal((3, 5, 2, 7))
    x[0, 0, 0, :3] = [-80.0, 0.0, 80.0]          # far tails: no overflow, the limits 0 and x
    y, cache = silu.forward(x)
    dy = rng.standard_normal(y.shape)
    ty, (dx,) = torch_vjp(torch.nn.functional.silu, (x,), dy, [0])
    assert_close(y, ty, VAL_RTOL, "silu y")
    assert_close(silu.backward(dy, cache), dx, GRAD_RTOL, "silu dx")


@pytest.mark.parametrize("p", [0.1, 0.55])
def test_channel_dropout(rng, p):
    x = rng.standard_normal((3, 5, 2, 7))
    mask = ((rng.random((3, 1, 1, 7)) >= p) / (1 - p))
    y, cache = dropout.forward(x, p, mask=mask)
    dy = rng.standard_normal(y.shape)
    ty, (dx,) = torch_vjp(tr.channel_dropout, (x, mask), dy, [0])
    assert_close(y, ty, VAL_RTOL, "dropout y")
    assert_close(dropout.backward(dy, cache), dx, GRAD_RTOL, "dropout dx")


@pytest.mark.parametrize("eps", [1e-12, 1e-10])
def test_normalize(rng, eps):
    x = rng.standard_normal((3, 5, 7))
    x[0, 1] = 0.0            # the zero vector: y = 0, dx = dy / eps (the clamp passes no gradient)
    x[2, 3] *= 1e-3
    y, cache = normalize.forward(x, eps)
    dy = rng.standard_normal(y.shape)
    ty, (dx,) = torch_vjp(lambda t: tr.normalize(t, eps), (x,), dy, [0])
    assert_close(y, ty, VAL_RTOL, "normalize y")
    assert_close(normalize.backward(dy, cache), dx, GRAD_RTOL, "normalize dx")


@pytest.mark.parametrize("zshape", [(2, 3, 5), (7, 5)])
def test_cosine(rng, zshape):
    z, M = rng.standard_normal(zshape), rng.standard_normal((3, zshape[-1]))
    s, cache = cosine.forward(z, M)
    ds = rng.standard_normal(s.shape)
    ts, (dz, dM) = torch_vjp(tr.cosine, (z, M), ds, [0, 1])
    assert_close(s, ts, VAL_RTOL, "cosine s")
    got_dz, got_dM = cosine.backward(ds, cache)
    assert_close(got_dz, dz, GRAD_RTOL, "cosine dz")
    assert_close(got_dM, dM, GRAD_RTOL, "cosine dM")


@pytest.mark.parametrize("op,ref", [(softmax, tr.softmax), (log_softmax, tr.log_softmax)])
@pytest.mark.parametrize("tau", [1.0, 0.1, 0.37])
def test_softmax_family(rng, op, ref, tau):
    x = rng.standard_normal((3, 5, 7))
    y, cache = op.forward(x, tau)
    dy = rng.standard_normal(y.shape)
    ty, (dx,) = torch_vjp(lambda t: ref(t, tau), (x,), dy, [0])
    assert_close(y, ty, VAL_RTOL, f"{op.__name__} y")
    assert_close(op.backward(dy, cache), dx, GRAD_RTOL, f"{op.__name__} dx")


def test_kl(rng):
    q = rng.random((5, 7)) + 0.05
    q /= q.sum(-1, keepdims=True)
    logp = np.log(rng.random((5, 7)) + 0.05)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    k, cache = kl.forward(q, logp)
    dk = rng.standard_normal(k.shape)
    tk, (dq, dlogp) = torch_vjp(tr.kl_rows, (q, logp), dk, [0, 1])
    assert_close(k, tk, VAL_RTOL, "kl")
    got_dq, got_dlogp = kl.backward(dk, cache)
    assert_close(got_dq, dq, GRAD_RTOL, "kl dq")
    assert_close(got_dlogp, dlogp, GRAD_RTOL, "kl dlogp")


@pytest.mark.parametrize("xshape,S", [((2, 5, 3, 7), (3, 5)), ((3, 1, 4, 2), (5, 1)), ((1, 7, 5, 3), (2, 3))])
def test_grid_sample(rng, xshape, S):
    x = rng.standard_normal(xshape)
    coords = rng.uniform(-1.3, 1.3, size=(xshape[0],) + S + (2,))   # some outside: border padding
    coords[0, 0, 0] = (-1.0, 1.0)                                     # exact corners
    y, cache = grid_sample.forward(x, coords)
    dy = rng.standard_normal(y.shape)
    ty, (dx,) = torch_vjp(tr.grid_sample, (x, coords), dy, [0])
    assert_close(y, ty, VAL_RTOL, "grid_sample y")
    assert_close(grid_sample.backward(dy, cache), dx, GRAD_RTOL, "grid_sample dx")


@pytest.mark.parametrize("xshape,size", [((2, 3, 5, 7), (7, 11)), ((3, 7, 5, 2), (3, 2)),
                                         ((1, 5, 3, 3), (5, 3)), ((2, 5, 7, 3), (9, 2))])
def test_resize(rng, xshape, size):
    x = rng.standard_normal(xshape)
    y, cache = resize.forward(x, size)
    dy = rng.standard_normal(y.shape)
    ty, (dx,) = torch_vjp(lambda t: tr.resize(t, size), (x,), dy, [0])
    assert_close(y, ty, VAL_RTOL, "resize y")
    assert_close(resize.backward(dy, cache), dx, GRAD_RTOL, "resize dx")


# ---------------------------------------------------------------- STEGO correlation

@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("zero_clamp", [True, False])
@pytest.mark.parametrize("shift", [0.08, 0.66, -0.3])
def test_correlation(rng, pointwise, zero_clamp, shift):
    N, C, D = 2, 7, 5
    f1, f2 = rng.standard_normal((N, 3, 5, C)), rng.standard_normal((N, 5, 1, C)) + 0.3
    c1, c2 = rng.standard_normal((N, 3, 5, D)), rng.standard_normal((N, 5, 1, D))
    loss, cache = correlation.forward(f1, f2, c1, c2, shift, pointwise, zero_clamp)
    dloss = rng.uniform(0.5, 2.0)
    tl, (dc1, dc2) = torch_vjp(lambda *a: tr.correlation(*a, shift, pointwise, zero_clamp),
                               (f1, f2, c1, c2), dloss, [2, 3])
    assert_close(loss, tl, VAL_RTOL, "correlation loss")
    got1, got2 = correlation.backward(dloss, cache)
    assert_close(got1, dc1, GRAD_RTOL, "correlation dc1")
    assert_close(got2, dc2, GRAD_RTOL, "correlation dc2")


@pytest.mark.parametrize("pointwise", [True, False])
def test_correlation_self_pair(rng, pointwise):
    """The intra pair passes one array twice: its gradient is the sum of both slots'."""
    f, c = rng.standard_normal((3, 5, 3, 7)), rng.standard_normal((3, 5, 3, 2))
    loss, cache = correlation.forward(f, f, c, c, 0.08, pointwise, True)
    tl, (dc,) = torch_vjp(lambda f, c: tr.correlation(f, f, c, c, 0.08, pointwise, True), (f, c), 1.7, [1])
    assert_close(loss, tl, VAL_RTOL, "correlation self loss")
    g1, g2 = correlation.backward(1.7, cache)
    assert_close(g1 + g2, dc, GRAD_RTOL, "correlation self dc")


# ---------------------------------------------------------------- Sinkhorn

def _simplex(rng, shape):
    x = rng.random(shape) + 0.05
    return x / x.sum(-1, keepdims=True)


def _cost(rng, lead, n, m, spread, offset):
    """Costs uniform in [0, spread], plus (offset > 0) a row offset uniform in [0, offset] and
    column offsets evenly spaced over [0, offset] in random order. The offsets do not change the
    plan (the potentials absorb them) but make every row's span at least offset − spread."""
    cost = rng.random(lead + (n, m)) * spread
    if offset:
        cols = rng.permuted(np.broadcast_to(np.linspace(0.0, offset, m), lead + (1, m)), axis=-1)
        cost = cost + offset * rng.random(lead + (n, 1)) + cols
    return cost


@pytest.mark.parametrize("lead", [(), (2,)])
@pytest.mark.parametrize("eps,n_iters,spread,offset,domain", [
    (0.5, 1, 2.0, 0.0, "scaling"), (0.3, 7, 2.0, 0.0, "scaling"), (0.05, 50, 2.0, 0.0, "scaling"),
    (0.05, 50, 1.0, 8.0, "log"), (1e-3, 13, 0.02, 0.0, "scaling"), (1e-3, 13, 0.02, 2.0, "log"),
    (1e-3, 50, 0.02, 2.0, "log")])
def test_sinkhorn_unrolled(rng, lead, eps, n_iters, spread, offset, domain):
    """Each case runs the domain it names (asserted). The interaction part of the cost spreads over
    at most 40·ε, so the plan is not yet a vertex and its gradient is not pure rounding (see
    test_sinkhorn_vertex_regime); the log cases' offsets put every row's span/ε at 140 (ε = 0.05)
    and ~2000 (ε = 1e-3), far above the scaling domain's limit of 40, with potentials ~offset/ε.
    Same tolerances as every other op (measured worst over 100 seeds at ε = 1e-3, log: 1e-11)."""
    n, m = 5, 3
    cost = _cost(rng, lead, n, m, spread, offset)
    a, b = _simplex(rng, lead + (n,)), _simplex(rng, lead + (m,))
    plan, cache = sk.forward(cost, a, b, eps, n_iters)
    assert (cache.E is None) == (domain == "log"), f"expected the {domain} domain to run"
    dplan = rng.standard_normal(plan.shape)
    tplan, (dC, da, db) = torch_vjp(lambda C, a, b: tr.sinkhorn(C, a, b, eps, n_iters),
                                    (cost, a, b), dplan, [0, 1, 2])
    assert_close(plan, tplan, VAL_RTOL, "sinkhorn plan")
    assert_close(cache.marginal_error, np.abs(tplan.sum(-1) - a).sum(-1), 1e-6, "marginal_error")
    got_dC, got_da, got_db = sk.backward(dplan, cache)
    assert_close(got_dC, dC, GRAD_RTOL, "sinkhorn dcost")
    assert_close(got_da, da, GRAD_RTOL, "sinkhorn da")
    assert_close(got_db, db, GRAD_RTOL, "sinkhorn db")


# Rounding of a vertex plan's cost gradient, relative to |dplan ⊙ plan|/ε (the size of the terms
# it cancels): measured ≤ 6.5e-14 over 400 random problems.
VERTEX_ROUNDING = 1e-12


def test_sinkhorn_vertex_regime(rng):
    """ε = 1e-3 with costs in [0, 2] (log domain, C/ε up to 2000): the plan is an OT vertex, whose
    true cost gradient is ~e^(−gap/ε), between 1e-11 and 1e-100 in 400 random problems, while both
    sides compute it as a cancellation of terms of size |dplan ⊙ plan|/ε ~ 1e2..1e3 and so carry
    rounding of ~1e-14 of that. A relative comparison cannot hold there (it is rounding over a
    number far below it); the cost gradient is compared at the rounding scale instead, the plan
    and the marginal gradients (which stay O(1)) at the usual tolerances."""
    cost = rng.random((5, 3)) * 2.0
    a, b = _simplex(rng, (5,)), _simplex(rng, (3,))
    plan, cache = sk.forward(cost, a, b, 1e-3, 13)
    assert cache.E is None
    dplan = rng.standard_normal(plan.shape)
    tplan, (dC, da, db) = torch_vjp(lambda C, a, b: tr.sinkhorn(C, a, b, 1e-3, 13), (cost, a, b), dplan, [0, 1, 2])
    assert_close(plan, tplan, VAL_RTOL, "plan")
    got_dC, got_da, got_db = sk.backward(dplan, cache)
    assert all(np.isfinite(g).all() for g in (got_dC, got_da, got_db))
    scale = np.abs(dplan * plan).max() / 1e-3
    assert np.abs(got_dC - dC).max() <= VERTEX_ROUNDING * scale, "dcost beyond rounding"
    assert_close(got_da, da, GRAD_RTOL, "da")
    assert_close(got_db, db, GRAD_RTOL, "db")


def test_sinkhorn_broadcast_marginals(rng):
    """Shared marginals (n,), (m,) over a batch of costs: da, db come back per problem."""
    cost = rng.random((3, 5, 7))
    a, b = _simplex(rng, (5,)), _simplex(rng, (7,))
    plan, cache = sk.forward(cost, a, b, 0.2, 9)
    dplan = rng.standard_normal(plan.shape)
    tplan, (dC, da, db) = torch_vjp(lambda C, a, b: tr.sinkhorn(C, a, b, 0.2, 9), (cost, a, b), dplan, [0, 1, 2])
    assert_close(plan, tplan, VAL_RTOL, "plan")
    got_dC, got_da, got_db = sk.backward(dplan, cache)
    assert_close(got_dC, dC, GRAD_RTOL, "dcost")
    assert_close(got_da.sum(0), da, GRAD_RTOL, "da summed over the broadcast axis")
    assert_close(got_db.sum(0), db, GRAD_RTOL, "db summed over the broadcast axis")


@pytest.mark.parametrize("eps", [0.5, 0.2])
def test_sinkhorn_implicit_at_convergence(rng, eps):
    """At the fixed point, the implicit backward equals autograd through a converged unrolled loop.
    The marginal gradients are defined up to (x + k, y − k): compare them along zero-mass
    directions only (centred)."""
    n, m, iters = 5, 3, 400
    cost = rng.random((n, m))
    a, b = _simplex(rng, (n,)), _simplex(rng, (m,))
    plan, cache = sk.forward(cost, a, b, eps, iters, backward="implicit")
    assert cache.marginal_error < 1e-13
    dplan = rng.standard_normal(plan.shape)
    _, (dC, da, db) = torch_vjp(lambda C, a, b: tr.sinkhorn(C, a, b, eps, iters), (cost, a, b), dplan, [0, 1, 2])
    got_dC, got_da, got_db = sk.backward(dplan, cache)
    assert_close(got_dC, dC, GRAD_RTOL, "implicit dcost")
    # gauge: compare da + k and db − k with k chosen so both sides have the same db[-1]
    k = db[-1] - got_db[-1]
    assert_close(got_da - k, da, GRAD_RTOL, "implicit da (gauge-fixed)")
    assert_close(got_db + k, db, GRAD_RTOL, "implicit db (gauge-fixed)")


# ---------------------------------------------------------------- cluster and hierarchy losses

@pytest.mark.parametrize("P,K,eps_q,iters", [(15, 7, 0.05, 20), (21, 3, 0.3, 5)])
def test_balanced_targets(rng, P, K, eps_q, iters):
    s = np.tanh(rng.standard_normal((P, K)))
    Q, _ = cluster.balanced_targets(s, eps_q, iters)
    tQ = tr.balanced_targets(tr.tensor(s), eps_q, iters)
    assert_close(Q, np_(tQ), VAL_RTOL, "balanced targets")


@pytest.mark.parametrize("P,K,eps_q,iters,rho", [(15, 7, 0.05, 20, 0.1), (21, 3, 0.3, 5, 2.0)])
def test_relaxed_targets(rng, P, K, eps_q, iters, rho):
    s = np.tanh(rng.standard_normal((P, K)))
    Q, _ = cluster.relaxed_targets(s, eps_q, iters, rho)
    tQ = tr.relaxed_targets(tr.tensor(s), eps_q, iters, rho)
    assert_close(Q, np_(tQ), VAL_RTOL, "relaxed targets")


def test_hard_targets_ties(rng):
    """Tied logits (rounded to halves, so many rows hold tied maxima): the same one-hot rows as
    torch's argmax, which takes the first of tied maxima."""
    s = np.round(2 * np.tanh(rng.standard_normal((40, 5)))) / 2
    assert (np.sum(s == s.max(1, keepdims=True), axis=1) > 1).sum() >= 5
    np.testing.assert_array_equal(cluster.hard_targets(s), np_(tr.hard_targets(tr.tensor(s))))


@pytest.mark.parametrize("target", ["relaxed", "balanced", "hard"])
def test_cluster_loss(rng, target):
    P, K, tau = 15, 7, 0.37
    s = np.tanh(rng.standard_normal((P, K)))
    logp, lc = log_softmax.forward(s, tau)
    loss, kc = cluster.forward(s, logp, target, 0.3, 5)
    dloss = rng.uniform(0.5, 2.0)
    ts = tr.tensor(s, requires_grad=True)
    tl, tQ = tr.cluster_loss(ts, tr.log_softmax(ts, tau), target, None, 0.3, 5)
    (dts,) = torch.autograd.grad(tl * dloss, [ts])
    assert_close(loss, np_(tl), VAL_RTOL, f"cluster {target} loss")
    ds, dl = cluster.backward(dloss, kc)
    got = ds + log_softmax.backward(dl, lc) if not np.isscalar(dl) else ds
    assert_close(got, np_(dts), GRAD_RTOL, f"cluster {target} ds")


@pytest.mark.parametrize("marginals", ["uniform", "usage"])
@pytest.mark.parametrize("eps,iters", [(0.3, 10), (0.05, 30)])
@pytest.mark.parametrize("lam_w", [0.1, 0.6])
def test_hierarchy(rng, marginals, eps, iters, lam_w):
    P, Kc, Kp, D, tau = 11, 7, 3, 5, 0.5
    zc = rng.standard_normal((P, D))
    Mc, Mp = rng.standard_normal((Kc, D)), rng.standard_normal((Kp, D))
    lc = log_softmax.forward(cosine.forward(zc, Mc)[0], tau)[0]
    sp = cosine.forward(zc, Mp)[0]
    lp = log_softmax.forward(sp, tau)[0]
    loss, hc = hierarchy.forward(lc, lp, Mc, Mp, eps=eps, n_iters=iters, lam_w=lam_w, marginals=marginals)
    dloss = rng.uniform(0.5, 2.0)
    tl, grads = torch_vjp(lambda *a: tr.hierarchy_loss(*a, eps, iters, lam_w, marginals),
                          (lc, lp, Mc, Mp), dloss, [0, 1, 2, 3])
    assert_close(loss, tl, VAL_RTOL, f"hierarchy {marginals} loss")
    for got, want, name in zip(hierarchy.backward(dloss, hc), grads, ("dlogp_c", "dlogp_p", "dM_c", "dM_p")):
        assert_close(got, want, GRAD_RTOL, f"hierarchy {marginals} {name}")


# ---------------------------------------------------------------- the whole model

MODEL_CASES = {
    "default-relaxed": {},
    "strict-balanced": {"cluster_target": "balanced"},
    "uniform": {"marginals": "uniform"},
    "hard": {"cluster_target": "hard"},
    "usage": {"marginals": "usage"},
    "stego": {"omh": False},
    "unrolled-eps-small": {"sinkhorn_backward": "unrolled", "eps": 0.05, "sinkhorn_iters": 30},
    "no-pointwise-no-clamp": {"pointwise": False, "zero_clamp": False},
    "no-dropout-two-levels": {"dropout": 0.0, "levels": (5, 3), "neg_samples": 3},
    "one-level-no-neg": {"levels": (7,), "weight_neg": 0.0},
    "implicit-converged": {"sinkhorn_backward": "implicit", "sinkhorn_iters": 400},
    "hard-uniform": {"cluster_target": "hard", "marginals": "uniform"},
    # SmooSeg alone (silu head, dense smoothness loss, student on the teacher's argmax) and OMH on it
    "smooseg": {"base": "smooseg", "omh": False, "head_activation": "silu", "zero_clamp": False,
                "teacher_tau": 0.2},
    "omh-on-smooseg": {"base": "smooseg", "head_activation": "silu", "neg_samples": 1},
    "shipped-defaults": None,   # Config(): τ 0.1, ε 0.2, levels 108/54/27, C 384, D 70, weights as shipped
}


def model_case_config(case):
    """small_config (distinct, non-unit loss weights) with the case's fields, or every default."""
    return Config() if MODEL_CASES[case] is None else fixtures.small_config(**MODEL_CASES[case])


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
@pytest.mark.parametrize("seed", [3, 11])
def test_model(case, seed):
    cfg = model_case_config(case)
    rng = np.random.default_rng(seed)
    params = model.init_params(cfg, rng, dtype=np.float64)
    batch = fixtures.random_batch(cfg, rng)
    B, _, _, C = batch["feats"].shape
    step_seed = seed + 1000

    loss, parts, grads = model.loss_and_grads(params, batch, cfg, np.random.default_rng(step_seed))
    ours_targets = model.forward(params, batch, cfg, np.random.default_rng(step_seed))[2]["targets"]
    draws = model.draw(cfg, B, C, np.random.default_rng(step_seed))

    tparams = {k: tr.tensor(v, requires_grad=True) for k, v in params.items()}
    tl, tparts, tQ = tr.model_loss(tparams, batch, cfg, draws)
    tgrads = torch.autograd.grad(tl, list(tparams.values()), allow_unused=True)

    assert_close(loss, np_(tl), VAL_RTOL, f"{case} loss")
    for k, v in tparts.items():
        assert_close(parts[k], np_(v), VAL_RTOL, f"{case} part {k}")
    for i, (ours, theirs) in enumerate(zip(ours_targets, tQ)):
        if theirs is None:
            assert ours is None
        else:
            assert_close(ours, np_(theirs), VAL_RTOL, f"{case} targets level {i}")
    teacher = bases.get(cfg.base).TEACHER
    assert set(grads) == set(params) - {teacher}       # the teacher centres take no gradient
    for (k, p), g in zip(tparams.items(), tgrads):
        if k == teacher:
            assert g is None, f"{case}: torch sent a gradient to the teacher"
            continue
        want = np.zeros_like(params[k]) if g is None else np_(g)
        assert_close(grads[k], want, GRAD_RTOL, f"{case} grad {k}")
    if not cfg.omh:
        # the detached code: the cluster head sends nothing into the projection head
        assert [k for k in params if k != teacher] == [*head.KEYS, "M0"]
