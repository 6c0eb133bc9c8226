"""The gradient-check suite behind ``omh-ref gradcheck``: every differentiable piece, random shapes.

Each case hands an op's, a Sinkhorn mode's, a loss's or the whole model's ``forward`` and
``backward`` to :func:`omh_ref.core.gradcheck.check_vjp` (plus a few full-Jacobian checks on tiny
inputs); constant arguments (a sampling grid, a temperature) are bound with a lambda. Shapes are
drawn from the seed, so a seed names one exact run.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np

from . import bases, fixtures, head, model
from .backend import get_array_module, to_device
from .config import Config
from .gradcheck import TOLERANCES, Report, _shapes, check_jacobian, check_vjp
from .losses import cluster, correlation, hierarchy, supcon
from .ops import (cosine, dropout, grid_sample, kl, linear, log_softmax, normalize, relu, resize, silu, sinkhorn,
                  softmax)
from .ops import neighbour_mix, pairwise_distance


def _simplex(rng, shape):
    x = rng.random(shape) + 0.05
    return x / x.sum(-1, keepdims=True)


def sinkhorn_case(rng, eps, n_iters, mode="unrolled", lead=(2,), spread=2.0, offset=0.0, dev=lambda x: x):
    """(forward, backward, args) for the plan as a function of (cost, a, b); a and b perturbations
    are projected to zero total mass (Σa = Σb must hold), which the implicit gauge also requires.

    Costs are uniform in [0, spread] plus a row offset uniform in [0, offset] and column offsets
    evenly spaced over [0, offset] in random order. The offsets leave the plan unchanged (the
    potentials absorb them) but widen every row's span to at least offset − spread: with that
    ≫ 40·ε the kernel could underflow, so the log domain runs with potentials ~offset/ε, while the
    plan stays as far from a vertex as ``spread`` makes it."""
    n, m = rng.integers(2, 7, size=2)
    cost = rng.random(lead + (n, m)) * spread
    if offset:
        cols = rng.permuted(np.broadcast_to(np.linspace(0.0, offset, m), lead + (1, m)), axis=-1)
        cost = cost + offset * rng.random(lead + (n, 1)) + cols
    a, b = _simplex(rng, (n,)), _simplex(rng, (m,))

    def forward(cost, a, b):
        a = a - (a.sum() - 1) / a.size   # keep the masses equal under perturbation
        b = b - (b.sum() - 1) / b.size
        return sinkhorn.forward(cost, a, b, eps, n_iters, backward=mode)

    def backward(dplan, cache):
        dc, da, db = sinkhorn.backward(dplan, cache)
        da = da.reshape(-1, da.shape[-1]).sum(0)
        db = db.reshape(-1, db.shape[-1]).sum(0)
        return dc, da - da.mean(), db - db.mean()   # the projection's transpose
    return forward, backward, (dev(cost), dev(a), dev(b))


def check_in_domain(case, domain, name, **fd):
    """check_vjp of a :func:`sinkhorn_case`, failing (with the domain in the row) when the forward
    ran the other domain: a case named for a path must exercise that path."""
    forward, backward, args = case
    ran = "log" if forward(*args)[1].E is None else "scaling"
    if ran != domain:
        return Report(f"{name} (ran the {ran} domain)", _shapes(args), float("inf"),
                      TOLERANCES["float64"]["rtol"], False)
    return check_vjp(forward, backward, args, name=name, **fd)


def window_weights_like(rng, B, h, w):
    """(B, h, w, 9) non-negative window weights as ``attn.npy`` holds them (about half of them 0, as
    HP's below-the-mean cut leaves them; 0 for the cells outside the grid)."""
    om = rng.random((B, h, w, 9)) * (rng.random((B, h, w, 9)) < 0.6) * 3.0
    for o, (dy, dx) in enumerate(neighbour_mix.OFFSETS):
        om[:, : max(0, -dy), :, o] = 0
        om[:, h - max(0, dy):, :, o] = 0
        om[:, :, : max(0, -dx), o] = 0
        om[:, :, w - max(0, dx):, o] = 0
    return om


def supcon_inputs(rng, B=3, n=4, C=4, Ds=3, D=5, lam=0.3, rho=0.4, n_codes=2, P=4, dtype=np.float64):
    """A small HP SupCon problem: (codes, fa, Ra, fs, Rs, lam, U, n) as host arrays. The agnostic
    features are three noisy clusters, so that thresholds against a random pool of P vectors give
    some anchors positives and leave others without; the EMA codes likewise, on their own clusters.
    ``rho`` None gives U = None."""
    def nrm(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def clustered(dim):
        centres = nrm(rng.standard_normal((3, dim)))
        return nrm(centres[rng.integers(0, 3, B * n)] + 0.6 * rng.standard_normal((B * n, dim)))
    fa, fs = clustered(C), clustered(Ds)
    Ra = supcon.thresholds(fa, nrm(rng.standard_normal((P, C))))
    Rs = supcon.thresholds(fs, nrm(rng.standard_normal((P, Ds))))
    U = None if rho is None else rng.random((n, B * n)) < rho
    codes = [nrm(rng.standard_normal((B * n, D))).astype(dtype) for _ in range(n_codes)]
    return codes, fa.astype(dtype), Ra.astype(dtype), fs.astype(dtype), Rs.astype(dtype), lam, U, n


def supcon_case(rng, tau=0.5, dev=lambda x: x, **kw):
    """(forward, backward, args) for HP's SupCon losses, stacked into one vector, as a function of
    the code arrays (the masks' features and thresholds, λ and U held fixed); ``kw`` for
    :func:`supcon_inputs`."""
    codes, fa, Ra, fs, Rs, lam, U, n = supcon_inputs(rng, **kw)
    fa, Ra, fs, Rs = (dev(x) for x in (fa, Ra, fs, Rs))
    U = None if U is None else dev(U)

    def forward(*codes):
        losses, cache = supcon.forward(list(codes), fa, Ra, fs, Rs, lam, U, n, tau)
        xp = get_array_module(codes[0])
        return xp.stack(losses), cache

    def backward(dout, cache):
        return tuple(supcon.backward([dout[k] for k in range(len(cache.codes))], cache))
    return forward, backward, tuple(dev(c) for c in codes)


def cases(seed=0, device="cpu"):
    """Yield (name, callable -> Report) for the whole suite; ``device="gpu"`` runs every check on
    CuPy arrays (the same draws, moved to the device). The groups draw from one generator in a
    fixed order, so a seed names one exact run."""
    rng = np.random.default_rng(seed)
    dev = (lambda x: to_device(x, "gpu")) if device == "gpu" else (lambda x: x)
    r = lambda *shape: dev(rng.standard_normal(shape))  # noqa: E731
    dims = lambda: tuple(int(k) for k in rng.integers(2, 6, size=3))  # noqa: E731
    N, H, W = dims()
    C, D, K = (int(k) for k in rng.integers(2, 7, size=3))
    d = SimpleNamespace(rng=rng, dev=dev, r=r, N=N, H=H, W=W, C=C, D=D, K=K, device=device)
    for group in (_op_cases, _sinkhorn_cases, _loss_cases, _model_cases):
        yield from group(d)


def _op_cases(d):
    """Every op, and full Jacobians of two of them."""
    rng, dev, r, N, H, W, C, D, K = d.rng, d.dev, d.r, d.N, d.H, d.W, d.C, d.D, d.K
    yield "linear", lambda: check_vjp(linear.forward, linear.backward, (r(N, H, C), r(D, C), r(D)), name="linear")
    yield "relu", lambda: check_vjp(relu.forward, relu.backward, (r(N, H, C),), name="relu")
    yield "silu", lambda: check_vjp(silu.forward, silu.backward, (3 * r(N, H, C),), name="silu")
    mask = dropout.channel_mask((N, H, W, C), 0.3, rng, r(1))
    yield "dropout", lambda: check_vjp(lambda x: dropout.forward(x, 0.3, mask=mask), dropout.backward,
                                        (r(N, H, W, C),), name="dropout")
    # (At an exact zero vector the map jumps, so finite differences cannot judge it there; the
    # tests check that its output and gradient stay finite instead.)
    yield "normalize", lambda: check_vjp(normalize.forward, normalize.backward, (r(N, H, C),), name="normalize")
    yield "cosine", lambda: check_vjp(cosine.forward, cosine.backward, (r(N, H, D), r(K, D)), name="cosine")
    yield "softmax(tau=0.1)", lambda: check_vjp(lambda x: softmax.forward(x, 0.1), softmax.backward,
                                                 (r(N, H, K),), name="softmax(tau=0.1)")
    yield "log_softmax(tau=0.1)", lambda: check_vjp(lambda x: log_softmax.forward(x, 0.1), log_softmax.backward,
                                                     (r(N, H, K),), name="log_softmax(tau=0.1)")
    q = dev(_simplex(rng, (N, K)))
    logp = dev(np.log(_simplex(rng, (N, K))))
    yield "kl", lambda: check_vjp(kl.forward, kl.backward, (q, logp), name="kl")
    coords = dev(rng.uniform(-1.1, 1.1, size=(N, 3, 4, 2)))   # a few points beyond the border
    yield "grid_sample", lambda: check_vjp(lambda x: grid_sample.forward(x, coords), grid_sample.backward,
                                            (r(N, H, W, C),), name="grid_sample")
    yield "resize", lambda: check_vjp(lambda x: resize.forward(x, (H + 3, W * 2)), resize.backward,
                                       (r(N, H, W, C),), name="resize")
    yield "jacobian:cosine", lambda: check_jacobian(cosine.forward, cosine.backward, (r(2, 3), r(2, 3)),
                                                    name="jacobian:cosine")
    yield "jacobian:grid_sample", lambda: check_jacobian(
        lambda x: grid_sample.forward(x, coords[:1, :2, :2]), grid_sample.backward, (r(1, 3, 2, 2),),
        name="jacobian:grid_sample")
    # HP's pieces: the window weights are non-negative, 0 outside the grid as attn.npy stores them
    omega = dev(window_weights_like(rng, N, H + 1, W))
    yield "neighbour_mix", lambda: check_vjp(lambda z: neighbour_mix.forward(z, omega), neighbour_mix.backward,
                                              (r(N, H + 1, W, C),), name="neighbour_mix")
    yield "jacobian:neighbour_mix", lambda: check_jacobian(
        lambda z: neighbour_mix.forward(z, omega[:1, :3, :2]), neighbour_mix.backward, (r(1, 3, 2, 2),),
        name="jacobian:neighbour_mix")
    yield "pairwise_distance", lambda: check_vjp(pairwise_distance.forward, pairwise_distance.backward,
                                                  (r(N, H, D), r(N, H, D)), name="pairwise_distance")


def _sinkhorn_cases(d):
    """Sinkhorn, unrolled in each domain and implicit."""
    rng, dev = d.rng, d.dev
    # Each unrolled case names the domain it must run (check_in_domain fails it otherwise). The
    # interaction part of the cost spreads over at most 20·ε, which keeps the plan away from a
    # vertex, where every cost gradient vanishes and the check would prove nothing; the log cases
    # add row and column offsets (every row's span/ε ≥ 140 at ε = 0.05 and ≥ 1980 at ε = 1e-3, far
    # above the scaling domain's 40).
    # The step scales with ε because the plan's curvature grows like 1/ε (central-difference error
    # ~ h²/ε³); at ε = 1e-3 with potentials ~1/ε the 4-point stencil at h = 1e-5 has a worst
    # relative error of 4e-6 over 200 random cases (2-point at 1e-8: 4e-5, rounding).
    for eps, it, domain in ((1.0, 10, "scaling"), (0.05, 30, "scaling"), (0.05, 30, "log"),
                            (1e-3, 50, "scaling"), (1e-3, 50, "log")):
        name = f"sinkhorn unrolled eps={eps:g} {domain}"
        fd = dict(stencil=4, eps=1e-5) if (eps < 0.01 and domain == "log") else dict(eps=1e-6 * min(1.0, eps * 10))
        c = sinkhorn_case(rng, eps, it, spread=min(2.0, 20 * eps), offset=max(2.0, 160 * eps) if domain == "log" else 0.0,
                          dev=dev)
        yield name, (lambda c=c, d=domain, nm=name, fd=fd: check_in_domain(c, d, nm, **fd))
    yield "sinkhorn implicit eps=0.1", (lambda c=sinkhorn_case(rng, 0.1, 2000, "implicit", dev=dev):
                                        check_vjp(*c, name="sinkhorn implicit eps=0.1"))
    yield "jacobian:sinkhorn", (lambda c=sinkhorn_case(rng, 0.2, 15, lead=(), dev=dev):
                                check_jacobian(*c, name="jacobian:sinkhorn"))


def _loss_cases(d):
    """STEGO's correlation, each cluster target, the hierarchy in both domains, HP's SupCon."""
    r, N, H, C, D, K = d.r, d.N, d.H, d.C, d.D, d.K
    S, S2 = 3, 4
    fa, fb = r(N, S, S, C), r(N, S2, S, C)
    for pw, zc in ((True, True), (False, False)):
        name = f"correlation pointwise={pw} clamp={zc}"
        fwd = (lambda c1, c2, pw=pw, zc=zc: correlation.forward(fa, fb, c1, c2, 0.1, pw, zc))
        yield name, (lambda fwd=fwd, nm=name: check_vjp(fwd, correlation.backward,
                                                        (r(N, S, S, D), r(N, S2, S, D)), name=nm))

    P = N * H
    for target in cluster.TARGETS:
        s = np.tanh(r(P, K))
        Q = {"relaxed": cluster.relaxed_targets(s, 0.2, 10, 0.1)[0], "balanced": cluster.balanced_targets(s, 0.2, 10)[0],
             "hard": cluster.hard_targets(s), "teacher": cluster.hard_targets(np.tanh(r(P, K)))}[target]
        name = f"cluster {target}"
        fwd = (lambda s, lp, Q=Q, t=target: cluster.forward(s, lp, t, Q=Q))
        yield name, (lambda fwd=fwd, s=s, nm=name: check_vjp(
            fwd, cluster.backward, (s, log_softmax.forward(s, 0.3)[0]), name=nm))

    Kc, Kp = K + 2, K
    for marg, mode, eps, it in (("uniform", "unrolled", 0.05, 30), ("uniform", "unrolled", 1e-3, 40),
                                ("usage", "unrolled", 0.3, 20), ("usage", "implicit", 0.2, 1000)):
        name = f"hierarchy {marg} {mode} eps={eps:g}"
        # Small eps: potentials ~C/eps make the 4-point stencil necessary (tests/core/test_losses.py).
        fd = dict(stencil=4, eps=3e-5) if eps < 0.01 else {}
        # Checked from logits through log_softmax, the domain the model uses: assignments stay
        # normalised, so usage marginals keep Σa = Σb = 1 under perturbation.
        yield name, (lambda nm=name, kw=dict(eps=eps, n_iters=it, marginals=marg, backward_mode=mode), fd=fd:
                     check_vjp(*hierarchy_from_logits(**kw), (r(P, Kc), r(P, Kp), r(Kc, D), r(Kp, D)),
                               name=nm, **fd))

    # Both marginals in both Sinkhorn domains: ε = 0.3 runs the scaling domain, ε = 0.02 the log
    # domain (the cost's span bound 2 over ε exceeds the scaling domain's 40); each case fails when
    # its plan ran the other domain.
    for marg in hierarchy.MARGINALS:
        for eps, it, domain in ((0.3, 20, "scaling"), (HIER_LOG_EPS, 40, "log")):
            name = f"hierarchy {marg} eps={eps:g} {domain}"
            kw = dict(eps=eps, n_iters=it, marginals=marg, lam_w=0.7)
            yield name, (lambda nm=name, kw=kw, d=domain: check_hierarchy_in_domain(
                hierarchy_from_logits(**kw), (r(P, Kc), r(P, Kp), r(Kc, D), r(Kp, D)), d, nm))

    # HP's SupCon on two code arrays: a sampled denominator with λ > 0, and every pixel (U None) at λ = 0
    for lam, rho in ((0.3, 0.4), (0.0, None)):
        name = f"supcon lam={lam:g} rho={1 if rho is None else rho:g}"
        yield name, (lambda c=supcon_case(d.rng, lam=lam, rho=rho, dev=d.dev), nm=name: check_vjp(*c, name=nm))
    yield "jacobian:supcon", (lambda c=supcon_case(d.rng, B=2, n=3, D=2, dev=d.dev):
                              check_jacobian(*c, name="jacobian:supcon"))


def _model_cases(d):
    """The whole model in each variant and at the shipped defaults, and the head as one piece."""
    rng, dev, r, N, H, C, D = d.rng, d.dev, d.r, d.N, d.H, d.C, d.D
    device = d.device
    variants = {"model omh relaxed": {}, "model omh balanced+uniform": dict(cluster_target="balanced",
                                                                             marginals="uniform"),
                "model omh hard+implicit": dict(cluster_target="hard", sinkhorn_backward="implicit",
                                                sinkhorn_iters=300),
                "model stego (no omh)": dict(omh=False),
                "model smooseg (no omh)": dict(base="smooseg", omh=False, head_activation="silu", zero_clamp=False),
                "model omh on smooseg": dict(base="smooseg", head_activation="silu"),
                # the hierarchy's log domain (small_config's ε = 0.3 runs the scaling one)
                "model omh relaxed log": dict(eps=HIER_LOG_EPS),
                "model omh uniform log": dict(marginals="uniform", eps=HIER_LOG_EPS)}
    for name, over in variants.items():
        yield name, (lambda over=over, nm=name, s=int(rng.integers(1 << 30)): model_check(s, nm, device=device, **over))
    # The real defaults (every Config field as shipped: τ = 0.1, ε = 0.2, levels 108/54/27, C = 384,
    # D = 70, 11 x 11 samples, 5 negatives), float64, on the small batch. Step 1e-8: at this size
    # ~300k clamped code correlations and ~46k ReLUs put a few kinks within a 1e-6 step of the
    # point, each worth ~1e-5 of the quotient (16 seeds: worst 8e-5, 3 over rtol; zero_clamp off:
    # median 15x lower); at 1e-8 almost none is crossed and rounding stays ~7e-7 (worst 1e-6).
    yield "model omh defaults", (lambda s=int(rng.integers(1 << 30)): model_check(
        s, "model omh defaults", cfg=Config(), step=DEFAULTS_STEP, device=device))

    # The projection head as one piece (weights only: its input, the backbone's features, is frozen).
    hp, x_head = tuple(dev(v) for v in head.init(C, D, rng, np.float64).values()), r(N, H, C)
    for act in head.ACTIVATIONS:
        yield f"head {act}", (lambda act=act: check_vjp(
            lambda *w: head.forward(dict(zip(head.KEYS, w)), x_head, act),
            lambda dz, cache: tuple(head.backward(dz, cache).values()), hp, name=f"head {act}"))

    # The HP base alone and with OMH on top: project_head, both SupCon terms at λ > 0 with a
    # sampled denominator, the consistency term (HP_CHECK).
    for name, over in (("model hp (no omh)", dict(omh=False)), ("model omh on hp", {})):
        yield name, (lambda over=over, nm=name, s=int(rng.integers(1 << 30)): model_check(
            s, nm, device=device, **HP_CHECK, **over))


DEFAULTS_STEP = 1e-8   # finite-difference step of the whole-model check at the shipped defaults
# The HP base's small check: a pool of 6 patches, λ > 0 (warmup 1, step 4 of 6: λ = 0.6), a sampled
# denominator (share 0.4), the consistency term on, distinct weights and temperature.
HP_CHECK = dict(base="hp", pool_size=6, warmup=1, supcon_tau=0.5, consistency_weight=0.3,
                denominator_share=0.4, ema_alpha=0.9)
HP_PROGRESS = (4, 6)
HIER_LOG_EPS = 0.02    # a hierarchy ε whose plan runs the log domain (2 / ε > SCALING_MAX_SPAN)


def check_hierarchy_in_domain(fb, args, domain, name, **fd):
    """check_vjp of a :func:`hierarchy_from_logits` case, failing (with the domain in the row) when
    its plan ran the other Sinkhorn domain."""
    forward, backward = fb
    ran = "log" if forward(*args)[1][0].sinkhorn.E is None else "scaling"
    if ran != domain:
        return Report(f"{name} (ran the {ran} domain)", _shapes(args), float("inf"),
                      TOLERANCES["float64"]["rtol"], False)
    return check_vjp(forward, backward, args, name=name, **fd)


def hierarchy_from_logits(tau=0.5, lam_w=0.1, **kw):
    """(forward, backward) of the hierarchy loss as a function of (child logits, parent logits,
    M_child, M_parent), through log_softmax: the domain the model uses, where assignments stay
    normalised (so usage marginals keep Σa = Σb = 1 under perturbation). ``kw``: eps, n_iters,
    marginals, backward_mode."""
    def forward(xc, xp_, mc, mp):
        (lc, cc), (lp, cp) = log_softmax.forward(xc, tau), log_softmax.forward(xp_, tau)
        loss, hc = hierarchy.forward(lc, lp, mc, mp, lam_w=lam_w, **kw)
        return loss, (hc, cc, cp)

    def backward(dloss, cache):
        hc, cc, cp = cache
        dlc, dlp, dmc, dmp = hierarchy.backward(dloss, hc)
        return log_softmax.backward(dlc, cc), log_softmax.backward(dlp, cp), dmc, dmp
    return forward, backward


def model_check(seed, name="model", cfg=None, step=None, device="cpu", **overrides):
    """Gradient check of the whole objective w.r.t. every parameter, randomness and the
    no-gradient cluster targets held fixed, in float64 on a small batch (3 images, 5 x 4 grid).
    ``cfg`` (default :func:`omh_ref.core.fixtures.small_config`) with ``overrides`` applied; ``step``
    the finite-difference step (default the checker's)."""
    cfg = fixtures.small_config(**overrides) if cfg is None else dataclasses.replace(cfg, **overrides)
    rng = np.random.default_rng(seed)
    params = to_device(model.init_params(cfg, rng, dtype=np.float64), device)
    batch = to_device(fixtures.random_batch(cfg, rng), device)
    batch, state, draws = base_inputs(cfg, rng, batch, params, seed, device)
    base = bases.get(cfg.base)
    fixed = {k: params[k] for k in bases.teacher_keys(base)}   # no gradient: held as it is
    keys = [k for k in params if k not in fixed]
    targets = model.forward(params, batch, cfg, np.random.default_rng(seed), draws=draws, state=state)[2]["targets"]

    # A base alone (omh = false) detaches the code from its cluster probe, so its head gradient is
    # the base loss's gradient alone; check that part against the base's part.
    head_idx = [i for i, k in enumerate(keys) if k in head.KEYS]

    def objective(part):
        def forward(*vals):
            loss, parts, cache = model.forward({**dict(zip(keys, vals)), **fixed}, batch, cfg,
                                               np.random.default_rng(seed), targets, draws, state)
            return (loss if part == "loss" else parts[part]), cache
        return forward

    def backward(dloss, cache):
        grads = model.backward(dloss, cache)
        return tuple(grads[k] for k in keys)
    vals = tuple(params[k] for k in keys)
    if not cfg.detach_clusters:
        return check_vjp(objective("loss"), backward, vals, name=name, n_dirs=1, eps=step)
    full = check_vjp(objective("loss"), backward, vals, name=name, n_dirs=1, eps=step,
                     wrt=[i for i in range(len(keys)) if i not in head_idx])
    corr = check_vjp(objective(base.LOSS_PART), backward, vals, name=name, n_dirs=1, eps=step, wrt=head_idx)
    return max(full, corr, key=lambda rep: (not rep.passed, rep.max_rel_err))


def base_inputs(cfg, rng, batch, params, seed, device="cpu", progress=HP_PROGRESS):
    """(batch, state, draws) of a base's model check: for a base with inputs and a state (HP) the
    batch with its window weights (``attn``, :func:`window_weights_like`) and, where the
    consistency term is on, augmented features (the features plus noise), the state its
    ``start_state`` makes from the patches of 4 other random crops (the pools), and the step's draws at
    ``progress`` (λ > 0), all drawn from ``rng`` after the batch; for any other base the batch
    unchanged, None, None (nothing drawn)."""
    base = bases.get(cfg.base)
    if not bases.takes_extra(base):
        return batch, None, None
    dev = (lambda x: to_device(x, "gpu")) if device == "gpu" else (lambda x: x)
    f = to_device(batch["feats"], "cpu")
    B, h, w, C = f.shape
    extra = {"attn": window_weights_like(rng, B, h, w)}
    if "feats_aug" in bases.inputs(base, cfg):
        extra["feats_aug"] = f + 0.5 * rng.standard_normal(f.shape)
    batch = {**batch, **{k: dev(v) for k, v in extra.items()}}
    other = rng.standard_normal((4, h, w, C))     # the pools' crops: others than the batch's (no exact ties)
    state = model.start_state(cfg, params, lambda rows, cells: other[rows, cells // w, cells % w], 4, h * w, rng)
    draws = model.draw(cfg, B, C, np.random.default_rng(seed), progress=progress)
    return batch, state, draws


def run(seed=0, only=None):
    """Run the suite; ``only`` filters case names by substring. -> list of Reports."""
    return [check() for name, check in cases(seed) if only is None or only in name]
