"""The whole model: gradient checks, determinism, baseline semantics, float32, clear errors."""
import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from omh_ref.core import fixtures, head, model
from omh_ref.core.bases import stego
from omh_ref.core.backend import to_device, to_host
from omh_ref.core.checks import DEFAULTS_STEP, model_check
from omh_ref.core.config import Config
from omh_ref.core.gradcheck import TOLERANCES
from tests.strategies import seeds

VARIANTS = {
    "relaxed": {},
    "balanced": dict(cluster_target="balanced"),
    "hard": dict(cluster_target="hard"),
    "usage": dict(marginals="usage"),
    "implicit": dict(sinkhorn_backward="implicit", sinkhorn_iters=300),
    "two-levels-no-neg": dict(levels=(5, 2), weight_neg=0.0),
    "one-level": dict(levels=(4,)),
    "no-dropout-plain-corr": dict(dropout=0.0, pointwise=False, zero_clamp=False),
    "stego": dict(omh=False),
    "smooseg": dict(base="smooseg", omh=False, head_activation="silu", zero_clamp=False),
    "omh-on-smooseg": dict(base="smooseg", head_activation="silu"),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
@given(seed=seeds)
def test_model_gradients(name, seed):
    rep = model_check(seed, name, **VARIANTS[name])
    assert rep.passed, rep.row()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_gradients_at_the_shipped_defaults(seed):
    """Every Config default (τ = 0.1, ε = 0.2, levels 108/54/27, C = 384, D = 70, 11 x 11 samples,
    5 negatives, the shipped weights), float64, a small grid (checks.DEFAULTS_STEP says why its
    step is 1e-8)."""
    rep = model_check(seed, "defaults", cfg=Config(), step=DEFAULTS_STEP)
    assert rep.passed, rep.row()


def test_small_config_weights_are_distinct_and_not_one():
    # what makes a dropped or swapped weight visible to every check built on small_config
    cfg = fixtures.small_config()
    weights = [getattr(cfg, k) for k in fixtures.SMALL_WEIGHTS]
    assert sorted(fixtures.SMALL_WEIGHTS) == sorted(k for k in vars(cfg) if k.startswith(("lam_", "weight_")))
    assert len(set(weights)) == len(weights) and 1.0 not in weights and 0.0 not in weights
    assert all(getattr(cfg, k) != getattr(Config(), k) for k in fixtures.SMALL_WEIGHTS)


def _run(cfg, seed, dtype=np.float64, xp=np):
    rng = np.random.default_rng(seed)
    params = model.init_params(cfg, rng, dtype=dtype)
    batch = fixtures.random_batch(cfg, rng, dtype=dtype)
    if xp is not np:
        params, batch = to_device(params, "gpu"), to_device(batch, "gpu")
    return model.loss_and_grads(params, batch, cfg, np.random.default_rng(seed + 1))


def test_same_seed_same_result_other_seed_differs():
    cfg = fixtures.small_config()
    l1, p1, g1 = _run(cfg, 5)
    l2, p2, g2 = _run(cfg, 5)
    assert p1 == p2 and all(np.array_equal(g1[k], g2[k]) for k in g1)
    l3, _, _ = _run(cfg, 6)
    assert float(l3) != float(l1)


def test_randomness_comes_only_from_the_rng():
    # Same params and batch, different step generators: the draws (and so the loss) differ.
    cfg = fixtures.small_config()
    rng = np.random.default_rng(0)
    params, batch = model.init_params(cfg, rng, np.float64), fixtures.random_batch(cfg, rng)
    losses = {float(model.loss_and_grads(params, batch, cfg, np.random.default_rng(s))[0]) for s in (1, 1, 2)}
    assert len(losses) == 2


def test_parts_and_grads_keys():
    cfg = fixtures.small_config()
    loss, parts, grads = _run(cfg, 0)
    assert set(grads) == set(model.init_params(cfg, np.random.default_rng(0)))
    L = len(cfg.levels)
    for key in ["corr", "corr_intra", "corr_inter", "corr_neg", "loss",
                *(f"clu_{i}" for i in range(L)), *(f"hier_{i}" for i in range(L - 1)),
                *(f"sinkhorn_err_{i}" for i in range(L - 1)), *(f"plan_sparsity_{i}" for i in range(L - 1))]:
        assert key in parts and np.isfinite(parts[key]), key
    # the weights are distinct and not 1 (small_config), so each must sit on its own term
    corr = (cfg.weight_intra * parts["corr_intra"] + cfg.weight_inter * parts["corr_inter"]
            + cfg.weight_neg * parts["corr_neg"])
    np.testing.assert_allclose(parts["corr"], corr, rtol=1e-12)
    total = (parts["corr"] + cfg.lam_clu * sum(parts[f"clu_{i}"] for i in range(L))
             + cfg.lam_hier * sum(parts[f"hier_{i}"] for i in range(L - 1)))
    np.testing.assert_allclose(parts["loss"], total, rtol=1e-12)
    for i in range(L - 1):
        np.testing.assert_allclose(parts[f"hier_{i}"], parts[f"hier_kl_{i}"] + cfg.lam_w * parts[f"hier_w_{i}"],
                                   rtol=1e-12)


def test_the_base_alone_is_stegos_recipe():
    """omh = false on the STEGO base: one hard k-means probe of the eval level's size on a
    detached code, no hierarchy, resolved where the config is built."""
    cfg = fixtures.small_config(omh=False, levels=(6, 4, 3))
    assert cfg.levels == (3,) and cfg.cluster_target == "hard" and cfg.lam_hier == 0 and cfg.detach_clusters
    assert fixtures.small_config(omh=False, levels=(6, 4, 3), eval_level=1).levels == (4,)
    loss, parts, grads = _run(cfg, 1)
    assert set(k for k in grads if k.startswith("M")) == {"M0"}
    assert not any(k.startswith("hier") for k in parts)
    # Detached code: the head's gradient is the correlation loss's alone.
    no_clu = dataclasses.replace(cfg, lam_clu=0.0)
    _, _, g_corr = _run(no_clu, 1)
    for k in head.KEYS:
        np.testing.assert_allclose(grads[k], g_corr[k], rtol=1e-12, atol=1e-15)


def test_joint_training_sends_cluster_gradients_into_the_head():
    """The head's gradient is the correlation part's plus the clustering part's (each computed
    with the other's weights at 0), and the clustering part is a real share of it: the code is
    not detached as in the STEGO baseline."""
    cfg = fixtures.small_config()
    _, _, g = _run(cfg, 2)
    _, _, g_corr = _run(dataclasses.replace(cfg, lam_clu=0.0, lam_hier=0.0), 2)
    _, _, g_clu = _run(dataclasses.replace(cfg, weight_intra=0.0, weight_inter=0.0, weight_neg=0.0), 2)
    for k in head.KEYS:
        np.testing.assert_allclose(g[k], g_corr[k] + g_clu[k], rtol=1e-10, atol=1e-14, err_msg=k)
        assert np.linalg.norm(g_clu[k]) >= 0.05 * np.linalg.norm(g[k]), k


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_float32_matches_float64(xp, name):
    """Every variant in float32 stays float32 (the base alone's probe once sent float64 gradients
    to its centroids: a Python 0 summed as NumPy's int64) and agrees with float64."""
    cfg = fixtures.small_config(**VARIANTS[name])
    l64, p64, g64 = _run(cfg, 3)
    l32, p32, g32 = _run(cfg, 3, np.float32, xp)
    tol = TOLERANCES["float32"]
    assert to_host(l32).dtype == np.float32
    np.testing.assert_allclose(float(l32), float(l64), rtol=tol["rtol"])
    for k in g64:
        g = to_host(g32[k])
        assert g.dtype == np.float32, k
        scale = np.abs(g64[k]).max()
        assert np.abs(g - g64[k]).max() <= tol["rtol"] * scale + tol["atol"], k


@given(eps=st.sampled_from([1.0, 0.05, 1e-3]), tau=st.sampled_from([0.01, 0.1]), seed=seeds)
def test_finite_at_extreme_inputs(eps, tau, seed):
    cfg = fixtures.small_config(eps=eps, eps_q=eps, tau=tau, marginals="usage")
    rng = np.random.default_rng(seed)
    params = model.init_params(cfg, rng, np.float64)
    batch = fixtures.random_batch(cfg, rng)
    batch["feats"][0] = 0.0                  # an all-zero image
    batch["feats_pos"][1] *= 1e4             # a huge one
    loss, parts, grads = model.loss_and_grads(params, batch, cfg, rng)
    assert np.isfinite(float(loss)) and all(np.isfinite(v) for v in parts.values())
    assert all(np.all(np.isfinite(g)) for g in grads.values())


@pytest.mark.parametrize("field,value,match", [
    ("eps", -0.1, "'eps'"), ("eps", 0.0, "'eps'"), ("eps_q", float("nan"), "'eps_q'"),
    ("tau", 0, "'tau'"), ("levels", (6, 0), "'levels'"), ("levels", (), "'levels'"),
    ("levels", (3, 6), "'levels'"), ("dim", 0, "'dim'"), ("dropout", 1.0, "'dropout'"),
    ("lam_hier", -1.0, "'lam_hier'"), ("cluster_target", "fuzzy", "'cluster_target'"),
    ("marginals", "mass", "'marginals'"), ("base", "bogus", "'base'"),
    ("sinkhorn_iters", 0, "'sinkhorn_iters'"), ("eval_level", 3, "'eval_level'"),
    ("sinkhorn_backward", "adjoint", "'sinkhorn_backward'"),
])
def test_bad_config_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        fixtures.small_config(**{field: value})


def test_unknown_config_field():
    with pytest.raises(ValueError, match="unknown field.*lamda"):
        model.Config.from_dict({"lamda": 1.0})


def test_config_json_round_trip():
    cfg = fixtures.small_config(levels=(9, 5), marginals="usage")
    import json
    assert model.Config.from_dict(json.loads(cfg.to_json())) == cfg


def test_mismatched_batch_dims_are_clear():
    cfg = fixtures.small_config()
    rng = np.random.default_rng(0)
    params = model.init_params(cfg, rng, np.float64)
    batch = fixtures.random_batch(cfg, rng)
    with pytest.raises(ValueError, match=r"batch\['feats'\].*C=7"):
        model.loss_and_grads(params, {**batch, "feats": batch["feats"][..., :4]}, cfg, rng)
    with pytest.raises(ValueError, match=r"batch\['feats_pos'\]"):
        model.loss_and_grads(params, {**batch, "feats_pos": batch["feats_pos"][:2]}, cfg, rng)
    with pytest.raises(ValueError, match=r"batch\['feats'\]"):
        model.loss_and_grads(params, {"feats": batch["feats"][0]}, cfg, rng)
    with pytest.raises(ValueError, match="at least 2 images"):
        model.loss_and_grads(params, {k: v[:1] for k, v in batch.items()}, cfg, rng)


def test_derangement_has_no_fixed_points():
    rng = np.random.default_rng(0)
    for n in (2, 3, 7):
        for _ in range(20):
            perm = stego.derangement(n, rng)
            assert sorted(perm) == list(range(n)) and not np.any(perm == np.arange(n))
