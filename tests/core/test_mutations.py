"""The whole-model gradient check's power, measured rather than assumed.

Every backward the model's gradient runs through is perturbed in turn (one of its outputs
multiplied by ``1 + REL``, monkeypatched where the model looks it up), and the suite's
whole-model check (:func:`omh_ref.core.checks.model_check`, the check behind ``omh-ref
gradcheck`` and tests/core/test_model.py) must fail in every configuration whose gradient uses that
output. Perturbed, by module (output index or key in brackets):

* ``head.backward`` [W1, b1, W2, b2, W3, b3]; ``ops.linear.backward`` [dx, dW, db] and
  ``backward_params`` [dW, db]; ``ops.relu.backward``, ``ops.silu.backward`` (SmooSeg's head)
* ``ops.normalize.backward`` (inside cosine and the correlation loss); ``ops.cosine.backward``
  [dz, dM]; ``ops.log_softmax.backward``; ``ops.softmax.backward`` (SmooSeg's teacher
  probabilities); ``ops.grid_sample.backward``; ``ops.kl.backward``
  [dq, dlogp]; ``ops.sinkhorn.backward`` [dcost, da, db], unrolled and implicit
* ``losses.correlation.backward`` [dc1, dc2]; ``losses.cluster.backward`` [ds, dlogp] for each
  target type where the output is not identically 0; ``losses.hierarchy.backward`` [all four],
  with both marginals, in the scaling and the log domain
* the loss weights as ``model.backward`` applies them: each of λ_clu, λ_hier, λ_W and the three
  correlation weights dropped (taken as 1), and λ_clu/λ_hier and w_intra/w_inter swapped; the
  SmooSeg base's three pair weights likewise.

Not perturbed, because the model's gradient does not run through them: ``ops.dropout.backward``
(the dropped-out input is the frozen features) and ``ops.resize`` (evaluation only).

HP's pieces (``ops.neighbour_mix.backward``, ``ops.pairwise_distance.backward`` [da, db],
``losses.supcon.backward`` [each code array's gradient]) are perturbed the same way against their own
cases of the suite (``OP_BACKWARDS``): each of those cases must fail.
"""
import dataclasses

import pytest

from omh_ref.core import checks, fixtures, head, model
from omh_ref.core.checks import HIER_LOG_EPS, model_check
from omh_ref.core.gradcheck import TOLERANCES
from omh_ref.core.losses import cluster, correlation, hierarchy, supcon
from omh_ref.core.ops import cosine, grid_sample, kl, linear, log_softmax, normalize, relu, silu, sinkhorn, softmax
from omh_ref.core.ops import neighbour_mix, pairwise_distance

REL = 1e-3          # the perturbation: 0.1 %, 100 times the checker's rtol
SEED = 7

VARIANTS = {
    "relaxed": {},                                                # relaxed targets, usage marginals
    "uniform": {"marginals": "uniform"},
    "hard": {"cluster_target": "hard"},
    "implicit": {"sinkhorn_backward": "implicit", "sinkhorn_iters": 300},
    "stego": {"omh": False},                                      # the base alone: detached code, one hard level
    # the hierarchy's log domain (small_config's ε = 0.3 runs the scaling one), both marginals
    "relaxed log": {"eps": HIER_LOG_EPS},
    "uniform log": {"marginals": "uniform", "eps": HIER_LOG_EPS},
    # SmooSeg alone (its silu head, dense smoothness loss, student on the teacher's argmax) and OMH on it
    "smooseg": {"base": "smooseg", "omh": False, "head_activation": "silu", "zero_clamp": False},
    "omh smooseg": {"base": "smooseg", "head_activation": "silu"},
}
LOG = ("relaxed log", "uniform log")
OMH = ("relaxed", "uniform", "hard", "implicit")
STEGO = (*OMH, "stego")                 # the STEGO base (sampled correlations, relu head)
SMOOSEG = ("smooseg", "omh smooseg")
ALL = (*STEGO, *SMOOSEG)
UNROLLED = ("relaxed", "uniform", "hard")

# (module, function name, output (None: the single output), variants whose gradient uses it)
BACKWARDS = [
    *[(head, "backward", k, ALL) for k in head.KEYS],
    *[(linear, "backward", i, ALL) for i in range(3)],
    *[(linear, "backward_params", i, ALL) for i in range(2)],
    (relu, "backward", None, STEGO),
    (silu, "backward", None, SMOOSEG),
    (normalize, "backward", None, ALL),
    (cosine, "backward", 0, (*OMH, *SMOOSEG)),   # stego detaches the code: its dz is dropped by design
    (cosine, "backward", 1, ALL),
    (softmax, "backward", None, SMOOSEG),        # the teacher probabilities the smoothness loss compares
    (log_softmax, "backward", None, (*OMH, *SMOOSEG)),   # stego's hard k-means loss has no log p term
    (grid_sample, "backward", None, STEGO),      # SmooSeg's loss is dense: no sampling
    (kl, "backward", 0, (*OMH, *LOG, "omh smooseg")),
    (kl, "backward", 1, (*OMH, *LOG, "omh smooseg")),
    (sinkhorn, "backward", 0, (*UNROLLED, *LOG, "omh smooseg")),
    # da, db: only usage marginals depend on the parameters (uniform ones are constants)
    *[(sinkhorn, "backward", i, ("relaxed", "hard", "relaxed log", "omh smooseg")) for i in (1, 2)],
    *[(sinkhorn, "backward", i, ("implicit",)) for i in range(3)],
    (correlation, "backward", 0, ALL),
    (correlation, "backward", 1, ALL),
    # OT targets and the teacher's: ds is 0, dlogp carries it
    (cluster, "backward", 1, ("relaxed", "uniform", "implicit", *SMOOSEG)),
    (cluster, "backward", 0, ("hard", "stego")),                     # hard: dlogp is 0, ds carries it
    *[(hierarchy, "backward", i, (*OMH, *LOG, "omh smooseg")) for i in range(4)],
]


def _scaled(fn, which, calls):
    """fn with output ``which`` multiplied by 1 + REL; counts the calls that changed something."""
    def perturbed(*args, **kwargs):
        out = fn(*args, **kwargs)
        if which is None:
            calls.append(1)
            return out * (1 + REL)
        out = dict(out) if isinstance(out, dict) else list(out)
        if not hasattr(out[which], "shape"):
            return out if isinstance(out, dict) else tuple(out)   # an identically-0 output: unused
        calls.append(1)
        out[which] = out[which] * (1 + REL)
        return out if isinstance(out, dict) else tuple(out)
    return perturbed


def _id(case):
    mod, fn, which, variants = case
    return f"{mod.__name__.rsplit('.', 1)[-1]}.{fn}[{which}]-{'+'.join(variants)}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unperturbed_model_passes(variant):
    rep = model_check(SEED, variant, **VARIANTS[variant])
    assert rep.passed, rep.row()


@pytest.mark.parametrize("case", BACKWARDS, ids=_id)
def test_each_perturbed_backward_fails_the_model_check(case, monkeypatch):
    mod, fn, which, variants = case
    calls = []
    monkeypatch.setattr(mod, fn, _scaled(getattr(mod, fn), which, calls))
    for variant in variants:
        calls.clear()
        rep = model_check(SEED, variant, **VARIANTS[variant])
        assert calls, f"{variant}: the model never ran the perturbed {mod.__name__}.{fn}"
        assert not rep.passed, f"{variant}: a {REL:g} relative error went unseen: {rep.row()}"
        assert rep.max_rel_err > 10 * TOLERANCES["float64"]["rtol"], rep.row()


SUPCON_CASES = ("supcon lam=0.3 rho=0.4", "supcon lam=0 rho=1", "jacobian:supcon")
# (module, function name, output (None: the single output), the suite's cases that must then fail)
OP_BACKWARDS = [
    (neighbour_mix, "backward", None, ("neighbour_mix", "jacobian:neighbour_mix")),
    (pairwise_distance, "backward", 0, ("pairwise_distance",)),
    (pairwise_distance, "backward", 1, ("pairwise_distance",)),
    (supcon, "backward", 0, SUPCON_CASES),
    (supcon, "backward", 1, SUPCON_CASES),
]


@pytest.mark.parametrize("case", OP_BACKWARDS, ids=_id)
def test_each_perturbed_hp_backward_fails_its_gradient_checks(case, monkeypatch):
    mod, fn, which, names = case
    calls = []
    monkeypatch.setattr(mod, fn, _scaled(getattr(mod, fn), which, calls))
    ran = set()
    for name, check in checks.cases(SEED):
        if name in names:
            calls.clear()
            rep = check()
            ran.add(name)
            assert calls, f"{name}: the check never ran the perturbed {mod.__name__}.{fn}"
            assert not rep.passed, f"{name}: a {REL:g} relative error went unseen: {rep.row()}"
            assert rep.max_rel_err > 10 * TOLERANCES["float64"]["rtol"], rep.row()
    assert ran == set(names), f"the suite has no case {sorted(set(names) - ran)}"


def _weights_in_backward(change):
    """model.backward with the loss weights it applies changed by ``change(cache)``."""
    real = model.backward

    def backward(dloss, cache):
        cache = dict(cache)
        change(cache)
        return real(dloss, cache)
    return backward


def _cfg(**kw):
    return lambda cache: cache.update(cfg=dataclasses.replace(cache["cfg"], **kw))


def _corr(name, to):
    """The STEGO base's cache (B, g1, pairs) with one pair type's weight changed."""
    def change(cache):
        B, g1, corr = cache["base"]
        cache["base"] = (B, g1, [(n, to(cache["cfg"], wt) if n == name else wt, cc, r) for n, wt, cc, r in corr])
    return change


def _smooth(name, to):
    """The SmooSeg base's cache (B, probability caches, pairs, shape) with one pair kind's weight
    changed."""
    def change(cache):
        B, pc, pairs, shape = cache["base"]
        cache["base"] = (B, pc, [(n, to(cache["cfg"], wt) if n == name else wt, cc, r) for n, wt, cc, r in pairs],
                         shape)
    return change


def _lam_w(to):
    def change(cache):
        cache["hier"] = [hc._replace(lam_w=to) for hc in cache["hier"]]
    return change


WEIGHT_BUGS = {
    "lam_clu dropped": (_cfg(lam_clu=1.0), ALL),
    "lam_hier dropped": (_cfg(lam_hier=1.0), (*OMH, "omh smooseg")),
    "lam_clu and lam_hier swapped": (lambda c: _cfg(lam_clu=c["cfg"].lam_hier, lam_hier=c["cfg"].lam_clu)(c),
                                     (*OMH, "omh smooseg")),
    "lam_w dropped": (_lam_w(1.0), (*OMH, "omh smooseg")),
    "weight_intra dropped": (_corr("intra", lambda cfg, wt: 1.0), STEGO),
    "weight_inter dropped": (_corr("inter", lambda cfg, wt: 1.0), STEGO),
    "weight_neg dropped": (_corr("neg", lambda cfg, wt: 1.0 / cfg.neg_samples), STEGO),
    "weight_intra and weight_inter swapped": (
        lambda c: (_corr("intra", lambda cfg, wt: cfg.weight_inter)(c), _corr("inter", lambda cfg, wt: cfg.weight_intra)(c)),
        STEGO),
    "smooseg self weight dropped": (_smooth("self", lambda cfg, wt: 1.0), SMOOSEG),
    "smooseg knn weight dropped": (_smooth("knn", lambda cfg, wt: 1.0), ("omh smooseg",)),
    "smooseg neg weight dropped": (_smooth("neg", lambda cfg, wt: 1.0 / cfg.neg_samples), SMOOSEG),
}


@pytest.mark.parametrize("bug", sorted(WEIGHT_BUGS))
def test_each_wrong_weight_in_the_backward_fails_the_model_check(bug, monkeypatch):
    change, variants = WEIGHT_BUGS[bug]
    monkeypatch.setattr(model, "backward", _weights_in_backward(change))
    for variant in variants:
        rep = model_check(SEED, variant, **VARIANTS[variant])
        assert not rep.passed, f"{variant}: {bug} went unseen: {rep.row()}"


def test_unit_weights_hide_a_swapped_lambda(monkeypatch):
    """Why small_config's weights are distinct and not 1: at λ_clu = λ_hier = 1 (the shipped
    defaults) the same swap passes the check."""
    monkeypatch.setattr(model, "backward", _weights_in_backward(
        lambda c: _cfg(lam_clu=c["cfg"].lam_hier, lam_hier=c["cfg"].lam_clu)(c)))
    assert model_check(SEED, "unit", lam_clu=1.0, lam_hier=1.0).passed
    assert not model_check(SEED, "distinct").passed


@pytest.mark.parametrize("variant", [*LOG, "relaxed"])
def test_the_log_variants_run_the_log_domain(variant):
    """The log variants' hierarchy plans run the log domain, the others the scaling one: each
    domain's backward is what the perturbations above reach."""
    import numpy as np

    cfg = fixtures.small_config(**VARIANTS[variant])
    rng = np.random.default_rng(SEED)
    params = model.init_params(cfg, rng, dtype=np.float64)
    hier = model.forward(params, fixtures.random_batch(cfg, rng), cfg, rng)[2]["hier"]
    assert hier and all((hc.sinkhorn.E is None) == (variant in LOG) for hc in hier)
