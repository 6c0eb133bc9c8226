"""The gradient-check suite behind ``omh-ref gradcheck``: every differentiable piece, random shapes.

Each case wraps one op, Sinkhorn mode, loss or the whole model as ``f(*args)`` and
``vjp(v, *args)`` and hands both to :func:`omh_ref.gradcheck.check_vjp` (plus a few full-Jacobian
checks on tiny inputs). Shapes are drawn from the seed, so a seed names one exact run.
"""
from __future__ import annotations

import numpy as np

from . import model
from .gradcheck import check_jacobian, check_vjp
from .losses import cluster, correlation, hierarchy
from .ops import cosine, dropout, grid_sample, kl, linear, log_softmax, normalize, relu, resize, softmax
from .sinkhorn import sinkhorn, sinkhorn_backward_all


def _op(fwd, bwd, n_out_grads=None):
    """f and vjp for an op ``fwd(*args) -> (out, cache)``, ``bwd(dout, cache) -> grads``."""
    def f(*args):
        return fwd(*args)[0]

    def vjp(v, *args):
        g = bwd(v, fwd(*args)[1])
        return g if isinstance(g, tuple) else (g,)
    return f, vjp


def _loss(fwd, bwd, grad_slots):
    """f and vjp for a scalar loss ``fwd(*args) -> (loss, cache)``, ``bwd(cache, dloss)``; the
    gradients land in the argument positions ``grad_slots``."""
    def f(*args):
        return fwd(*args)[0]

    def vjp(v, *args):
        g = bwd(fwd(*args)[1], float(v))
        out = [None] * len(args)
        for slot, gi in zip(grad_slots, g):
            out[slot] = gi
        return tuple(out)
    return f, vjp


def _simplex(rng, shape):
    x = rng.random(shape) + 0.05
    return x / x.sum(-1, keepdims=True)


def sinkhorn_case(rng, eps, n_iters, mode="unrolled", lead=(2,), spread=2.0):
    """f/vjp/args for the plan as a function of (cost, a, b); a and b perturbations are projected
    to zero total mass (Σa = Σb must hold), which the implicit gauge also requires. Costs are
    uniform in [0, spread]."""
    n, m = rng.integers(2, 7, size=2)
    cost = rng.random(lead + (n, m)) * spread
    a, b = _simplex(rng, (n,)), _simplex(rng, (m,))

    def f(cost, a, b):
        a = a - (a.sum() - 1) / a.size   # keep the masses equal under perturbation
        b = b - (b.sum() - 1) / b.size
        return sinkhorn(cost, a, b, eps, n_iters, backward=mode)[0]

    def vjp(v, cost, a, b):
        plan, cache = sinkhorn(cost, a, b, eps, n_iters, backward=mode)
        dc, da, db = sinkhorn_backward_all(v, cache)
        da = da.reshape(-1, a.size).sum(0)
        db = db.reshape(-1, b.size).sum(0)
        return dc, da - da.mean(), db - db.mean()   # the projection's transpose
    return f, vjp, (cost, a, b)


def cases(seed=0):
    """Yield (name, callable -> Report) for the whole suite."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: rng.standard_normal(shape)  # noqa: E731
    dims = lambda: tuple(int(k) for k in rng.integers(2, 6, size=3))  # noqa: E731

    N, H, W = dims()
    C, D, K = (int(k) for k in rng.integers(2, 7, size=3))
    yield "linear", lambda: check_vjp(*_op(linear.forward, linear.backward), (r(N, H, C), r(D, C), r(D)), name="linear")
    yield "relu", lambda: check_vjp(*_op(relu.forward, relu.backward), (r(N, H, C),), name="relu")
    mask = dropout.channel_mask((N, H, W, C), 0.3, rng, r(1))
    yield "dropout", lambda: check_vjp(*_op(lambda x: dropout.forward(x, 0.3, mask=mask), dropout.backward),
                                        (r(N, H, W, C),), name="dropout")
    # (At an exact zero vector the map jumps, so finite differences cannot judge it there; the
    # tests check that its output and gradient stay finite instead.)
    yield "normalize", lambda: check_vjp(*_op(normalize.forward, normalize.backward), (r(N, H, C),),
                                         name="normalize")
    yield "cosine", lambda: check_vjp(*_op(cosine.forward, cosine.backward), (r(N, H, D), r(K, D)), name="cosine")
    yield "softmax(tau=0.1)", lambda: check_vjp(*_op(lambda x: softmax.forward(x, 0.1), softmax.backward),
                                                 (r(N, H, K),), name="softmax(tau=0.1)")
    yield "log_softmax(tau=0.1)", lambda: check_vjp(
        *_op(lambda x: log_softmax.forward(x, 0.1), log_softmax.backward), (r(N, H, K),),
        name="log_softmax(tau=0.1)")
    q = _simplex(rng, (N, K))
    logp = np.log(_simplex(rng, (N, K)))
    yield "kl", lambda: check_vjp(*_op(kl.forward, kl.backward), (q, logp), name="kl")
    coords = rng.uniform(-1.1, 1.1, size=(N, 3, 4, 2))   # a few points beyond the border
    yield "grid_sample", lambda: check_vjp(
        *_op(lambda x: grid_sample.forward(x, coords), grid_sample.backward), (r(N, H, W, C),),
        name="grid_sample")
    yield "resize", lambda: check_vjp(*_op(lambda x: resize.forward(x, (H + 3, W * 2)), resize.backward),
                                       (r(N, H, W, C),), name="resize")
    yield "jacobian:cosine", lambda: check_jacobian(*_op(cosine.forward, cosine.backward), (r(2, 3), r(2, 3)),
                                                    name="jacobian:cosine")
    yield "jacobian:grid_sample", lambda: check_jacobian(
        *_op(lambda x: grid_sample.forward(x, coords[:1, :2, :2]), grid_sample.backward),
        (r(1, 3, 2, 2),), name="jacobian:grid_sample")

    for eps, it in ((1.0, 10), (0.05, 30), (1e-3, 50)):
        name = f"sinkhorn unrolled eps={eps:g}"
        # Costs spread over 20·eps keep the plan away from a vertex, where every gradient would
        # vanish and the check would prove nothing; the step scales with eps because the plan's
        # curvature grows like 1/eps (central-difference error ~ h²/eps³).
        step = 1e-6 * min(1.0, eps * 10)
        yield name, (lambda c=sinkhorn_case(rng, eps, it, spread=min(2.0, 20 * eps)), nm=name, h=step:
                     check_vjp(*c, eps=h, name=nm))
    yield "sinkhorn implicit eps=0.1", (lambda c=sinkhorn_case(rng, 0.1, 2000, "implicit"):
                                        check_vjp(*c, name="sinkhorn implicit eps=0.1"))
    yield "jacobian:sinkhorn", (lambda c=sinkhorn_case(rng, 0.2, 15, lead=()):
                                check_jacobian(*c, name="jacobian:sinkhorn"))

    S, S2 = 3, 4
    fa, fb = r(N, S, S, C), r(N, S2, S, C)
    for pw, zc in ((True, True), (False, False)):
        name = f"correlation pointwise={pw} clamp={zc}"
        fwd = (lambda c1, c2, pw=pw, zc=zc: correlation.forward(fa, fb, c1, c2, 0.1, pw, zc))
        yield name, (lambda fwd=fwd, nm=name: check_vjp(*_loss(fwd, correlation.backward, (0, 1)),
                                                        (r(N, S, S, D), r(N, S2, S, D)), name=nm))

    P = N * H
    for target in cluster.TARGETS:
        s = np.tanh(r(P, K))
        Q = {"balanced": cluster.balanced_targets(s, 0.2, 10)[0], "hard": cluster.hard_targets(s),
             "soft": None}[target]
        name = f"cluster {target}"
        fwd = (lambda s, lp, Q=Q, t=target: cluster.forward(s, lp, t, Q=Q))
        yield name, (lambda fwd=fwd, s=s, nm=name: check_vjp(
            *_loss(fwd, cluster.backward, (0, 1)), (s, log_softmax.forward(s, 0.3)[0]), name=nm))

    Kc, Kp = K + 2, K
    for marg, mode, eps, it in (("uniform", "unrolled", 0.05, 30), ("uniform", "unrolled", 1e-3, 40),
                                ("usage", "unrolled", 0.3, 20), ("usage", "implicit", 0.2, 1000)):
        name = f"hierarchy {marg} {mode} eps={eps:g}"
        # Small eps: potentials ~C/eps make the 4-point stencil necessary (tests/test_losses.py).
        fd = dict(stencil=4, eps=3e-5) if eps < 0.01 else {}
        # Checked from logits through log_softmax, the domain the model uses: assignments stay
        # normalised, so usage marginals keep Σa = Σb = 1 under perturbation.
        yield name, (lambda nm=name, kw=dict(eps=eps, n_iters=it, marginals=marg, backward_mode=mode), fd=fd:
                     check_vjp(*_hierarchy_from_logits(kw), (r(P, Kc), r(P, Kp), r(Kc, D), r(Kp, D)),
                               name=nm, **fd))

    variants = {"model omh balanced": {}, "model omh soft+usage": dict(cluster_target="soft", marginals="usage"),
                "model omh hard+implicit": dict(cluster_target="hard", sinkhorn_backward="implicit",
                                                sinkhorn_iters=300),
                "model stego baseline": dict(baseline="stego")}
    for name, over in variants.items():
        yield name, (lambda over=over, nm=name, s=int(rng.integers(1 << 30)): model_check(s, nm, **over))


def _hierarchy_from_logits(kw, tau=0.5):
    def fwd(xc, xp_, mc, mp):
        (lc, cc), (lp, cp) = log_softmax.forward(xc, tau), log_softmax.forward(xp_, tau)
        loss, hc = hierarchy.forward(lc, lp, mc, mp, lam_w=0.1, **kw)
        return loss, (hc, cc, cp)

    def f(*args):
        return fwd(*args)[0]

    def vjp(v, *args):
        hc, cc, cp = fwd(*args)[1]
        dlc, dlp, dmc, dmp = hierarchy.backward(hc, float(v))
        return log_softmax.backward(dlc, cc), log_softmax.backward(dlp, cp), dmc, dmp
    return f, vjp


def model_check(seed, name="model", **overrides):
    """Gradient check of the whole objective w.r.t. every parameter, randomness and the
    no-gradient cluster targets held fixed."""
    cfg = model.small_config(**overrides)
    rng = np.random.default_rng(seed)
    params = model.init_params(cfg, rng, dtype=np.float64)
    batch = model.random_batch(cfg, rng)
    keys = list(params)
    targets = model.forward(params, batch, cfg, np.random.default_rng(seed))[2]["targets"]

    # The STEGO baseline detaches the code from its cluster head, so its head gradient is the
    # correlation loss's gradient alone; check that part against the correlation part.
    part = "corr" if cfg.detach_clusters else "loss"
    head = [i for i, k in enumerate(keys) if k in model.HEAD_KEYS]

    def f(*vals):
        return model.forward(dict(zip(keys, vals)), batch, cfg, np.random.default_rng(seed), targets)[1]

    def vjp(v, *vals):
        _, _, grads = model.loss_and_grads(dict(zip(keys, vals)), batch, cfg, np.random.default_rng(seed), targets)
        return tuple(grads[k] * float(v) for k in keys)
    vals = tuple(params.values())
    full = check_vjp(lambda *a: f(*a)["loss"], vjp, vals, name=name, n_dirs=1,
                     wrt=None if part == "loss" else [i for i in range(len(keys)) if i not in head])
    if part == "loss":
        return full
    corr = check_vjp(lambda *a: f(*a)["corr"], vjp, vals, name=name, n_dirs=1, wrt=head)
    return max(full, corr, key=lambda rep: (not rep.passed, rep.max_rel_err))


def run(seed=0, only=None):
    """Run the suite; ``only`` filters case names by substring. -> list of Reports."""
    return [check() for name, check in cases(seed) if only is None or only in name]
