"""The SmooSeg base (omh_ref/core/bases/smooseg.py): its defaults, its teacher centres (init,
moving average, no gradient, predictions), its smoothness loss against the formula written out,
and a run of it trained, resumed, diverged and evaluated."""
import dataclasses

import numpy as np
import pytest

from omh_ref.core import bases, fixtures, model
from omh_ref.core.bases import smooseg
from omh_ref.core.config import Config, with_base_defaults
from omh_ref.evaluate import predict
from omh_ref.train import checkpoint
from omh_ref.train.loop import TrainOptions, train
from tests import builders

C = 11


def small(**kw):
    return fixtures.small_config(in_dim=C, base="smooseg", head_activation="silu", **kw)


def test_a_new_smooseg_config_takes_smoosegs_values_unless_given():
    cfg = Config(**with_base_defaults({"base": "smooseg", "dim": 32}))
    assert (cfg.dim, cfg.dropout, cfg.head_activation, cfg.shift_intra, cfg.shift_neg) == (32, 0.2, "silu", -0.02, 0.5)
    assert (cfg.weight_inter, cfg.neg_samples, cfg.zero_clamp, cfg.teacher_tau, cfg.ema_alpha) == (0.0, 1, False, 0.1, 0.998)
    assert with_base_defaults({}) == {} and with_base_defaults({"base": "stego"}) == {"base": "stego"}


def test_the_base_alone_is_smoosegs_student_and_teacher():
    cfg = Config(**with_base_defaults({"base": "smooseg", "omh": False, "levels": (54, 27), "tau": 0.1}))
    assert (cfg.levels, cfg.cluster_target, cfg.tau, cfg.lam_hier) == ((27,), "teacher", 1.0, 0.0)
    assert model.predictor(cfg, 0) == "G" and model.param_shapes(cfg)["G"] == (27, 64)
    assert dataclasses.replace(cfg) == cfg                                   # resolving twice changes nothing
    with pytest.raises(ValueError, match="'teacher' is SmooSeg's student"):
        Config(base="smooseg", cluster_target="teacher")                     # not with OMH on top
    with pytest.raises(ValueError, match="'teacher' is SmooSeg's student"):
        Config(base="stego", omh=False, cluster_target="teacher", levels=(4,)).validate()


def test_centres_start_as_unit_rows_and_the_teacher_as_a_copy_of_the_eval_levels():
    for over in ({"omh": False}, {"eval_level": 1}):
        cfg = small(**over)
        params = model.init_params(cfg, np.random.default_rng(0))
        for k in (k for k in params if k.startswith("M")):
            np.testing.assert_allclose(np.linalg.norm(params[k], axis=1), 1.0, rtol=1e-6)
        M = params[f"M{cfg.eval_index}"]
        assert np.array_equal(params["G"], M) and not np.shares_memory(params["G"], M)
    assert "G" not in model.init_params(fixtures.small_config(in_dim=C), np.random.default_rng(0))


@pytest.mark.parametrize("pointwise", [True, False])
def test_the_smoothness_loss_is_the_formula(pointwise):
    rng = np.random.default_rng(1)
    cfg = small(omh=False, pointwise=pointwise, weight_inter=0.0, neg_samples=1, teacher_tau=0.3)
    B, h, w = 3, 4, 5
    f = rng.standard_normal((B, h, w, C))
    z = rng.standard_normal((B, h, w, cfg.dim))
    G = rng.standard_normal((4, cfg.dim))
    perm = np.array([2, 0, 1])
    loss, parts, _ = smooseg.forward(cfg, f, f, z, {"perms": [perm]}, B, {"G": G})
    P, _ = smooseg.teacher_probabilities(z, G, cfg.teacher_tau)
    want = {}
    fn = f / np.linalg.norm(f, axis=-1, keepdims=True)
    Pn = P / np.linalg.norm(P, axis=-1, keepdims=True)
    for name, pm, shift in (("self", None, cfg.shift_intra), ("neg", perm, cfg.shift_neg)):
        Fraw = np.einsum("nhwc,nijc->nhwij", fn, fn if pm is None else fn[pm])   # every pair of positions
        if pointwise:     # STEGO's pointwise centring: each row over the partner's positions, batch mean kept
            Fraw = Fraw - Fraw.mean(axis=(3, 4), keepdims=True) + Fraw.mean()
        cos = np.einsum("nhwk,nijk->nhwij", Pn, Pn if pm is None else Pn[pm])
        want[name] = ((Fraw - shift) * (1 - cos)).mean()
    np.testing.assert_allclose(float(parts["smooth_self"]), want["self"], rtol=1e-10)
    np.testing.assert_allclose(float(parts["smooth_neg"]), want["neg"], rtol=1e-10)
    np.testing.assert_allclose(float(loss), cfg.weight_intra * want["self"] + cfg.weight_neg * want["neg"], rtol=1e-10)


def test_the_step_moves_the_teacher_from_the_centres_before_adam_and_adam_never_touches_it(tmp_path):
    """G₁ = α G₀ + (1 − α) M₀ with M₀ the step's own (pre-step) centres; M moves by Adam."""
    feats = builders.write_feats(tmp_path / "f" / "feats.npy", 16, 4, 5, C, np.float32)
    cfg = small(omh=False, ema_alpha=0.9)
    first = checkpoint.load(_run(cfg, feats, tmp_path / "one", steps=1))["params"]
    init = model.init_params(cfg, np.random.default_rng(0))
    a = np.float32(0.9)
    assert np.array_equal(first["G"], init["G"] * a + init["M0"] * np.float32(1 - 0.9))
    assert not np.array_equal(first["M0"], init["M0"])
    moments = checkpoint.load(tmp_path / "one" / "ckpt.npz")["opt_state"]
    assert not np.any(moments["m"]["G"]) and not np.any(moments["v"]["G"]) and np.any(moments["m"]["M0"])


def _run(cfg, feats, out, **kw):
    base = dict(features=str(feats), out=str(out), steps=6, batch_size=4, ckpt_every=3, log_every=3, progress=False)
    base.update(kw)
    return train(cfg, TrainOptions(**base), say=lambda *a: None)["checkpoint"]


@pytest.mark.parametrize("omh", [False, True])
def test_resume_is_bit_exact_teacher_included(tmp_path, omh):
    feats = builders.write_feats(tmp_path / "f" / "feats.npy", 16, 4, 5, C, np.float32)
    cfg = small(omh=omh)
    _run(cfg, feats, tmp_path / "straight")
    _run(cfg, feats, tmp_path / "split", steps=3)
    _run(cfg, feats, tmp_path / "split", resume=str(tmp_path / "split" / "ckpt.npz"))
    a, b = (checkpoint.load(tmp_path / d / "ckpt.npz") for d in ("straight", "split"))
    assert "G" in a["params"]
    for k in a["params"]:
        assert np.array_equal(a["params"][k], b["params"][k]), k


def test_a_divergence_keeps_the_teacher_of_the_step_before(tmp_path, monkeypatch):
    """A NaN gradient at step 3 (looked at step 4): diverged.npz holds step 2's state, G included:
    the moving average is held back by the same flag as Adam."""
    from omh_ref.core.errors import InputError

    feats = builders.write_feats(tmp_path / "f" / "feats.npy", 16, 4, 5, C, np.float32)
    cfg = small(omh=False)
    _run(cfg, feats, tmp_path / "ref", steps=2, ckpt_every=2)
    real, calls = model.loss_and_grads, []

    def flaky(*a, **k):
        loss, parts, grads = real(*a, **k)
        calls.append(1)
        if len(calls) == 3:
            grads = dict(grads, W3=grads["W3"] * np.nan)
        return loss, parts, grads

    monkeypatch.setattr(model, "loss_and_grads", flaky)
    with pytest.raises(InputError, match="diverged at step 3"):
        _run(cfg, feats, tmp_path / "bad", steps=8, log_every=4, ckpt_every=8)
    want = checkpoint.load(tmp_path / "ref" / "ckpt.npz")["params"]
    got = checkpoint.load(tmp_path / "bad" / "diverged.npz")["params"]
    for k in want:
        assert np.array_equal(got[k], want[k]), k


def test_a_base_without_knn_pairs_reads_no_partner_features(tmp_path, monkeypatch):
    feats = builders.write_feats(tmp_path / "f" / "feats.npy", 16, 4, 5, C, np.float32)
    real, seen = model.loss_and_grads, []

    def spy(params, batch, *a, **k):
        seen.append(sorted(batch))
        return real(params, batch, *a, **k)

    monkeypatch.setattr(model, "loss_and_grads", spy)
    _run(small(omh=False, weight_inter=0.0), feats, tmp_path / "a", steps=2)
    _run(small(omh=False, weight_inter=0.5), feats, tmp_path / "b", steps=2)
    assert seen == [["feats"]] * 2 + [["feats", "feats_pos"]] * 2


def test_the_base_alone_predicts_with_its_teacher(tmp_path):
    store, protos = builders.known_world(tmp_path, N=4, h=4, C=5, K=3)
    cfg = Config(**with_base_defaults({"base": "smooseg", "omh": False, "in_dim": 5, "dim": 5, "levels": (3,)}))
    params = builders.identity_params(Config(in_dim=5, dim=5, levels=(3,)), protos, np.arange(3))
    params["G"] = params["M0"]
    params["M0"] = np.random.default_rng(0).standard_normal(params["M0"].shape)    # a student far from it
    z = predict.code(params, store.read(np.arange(4)).astype(np.float64), cfg)
    got = predict.cluster_logits(params, cfg, z, (4, 4)).argmax(-1)
    stego_cfg = dataclasses.replace(cfg, base="stego", cluster_target="hard", tau=0.1)
    assert np.array_equal(got, predict.cluster_logits({**params, "M0": params["G"]}, stego_cfg, z, (4, 4)).argmax(-1))
    res, _ = predict.cluster_eval(params, cfg, store, 3)
    assert res["miou"] == pytest.approx(100.0)
    with pytest.raises(KeyError):
        predict.cluster_logits({k: v for k, v in params.items() if k != "G"}, cfg, z, (4, 4))
    assert bases.get("smooseg").TEACHER == "G"


def test_a_step_with_no_random_draws_at_all_runs(tmp_path):
    """SmooSeg alone without dropout and without negatives draws nothing random in a step: the
    (empty) draws still reach the device, and the step trains."""
    feats = builders.write_feats(tmp_path / "f" / "feats.npy", 16, 4, 5, C, np.float32)
    cfg = small(omh=False, dropout=0.0, weight_neg=0.0, weight_inter=0.0)
    ck = checkpoint.load(_run(cfg, feats, tmp_path / "r", steps=2))
    assert ck["step"] == 2 and np.isfinite(ck["params"]["W1"]).all()


def test_an_unknown_base_is_one_line_naming_the_file(tmp_path):
    from omh_ref.core.errors import InputError
    from omh_ref.train.loop import model_config
    from omh_ref.features.store import FeatureStore

    feats = builders.write_feats(tmp_path / "f" / "feats.npy", 4, 4, 5, C, np.float32)
    assert with_base_defaults({"base": "bogus", "dim": 3}) == {"base": "bogus", "dim": 3}
    with pytest.raises(InputError, match=r"^cfg.toml: config field 'base': expected one of \('stego', 'smooseg', "
                                         r"'hp'\), got 'bogus'$"):
        model_config(FeatureStore(feats), {"base": "bogus"}, {}, source="cfg.toml")


def test_a_smooseg_runs_curves_and_log_name_its_own_loss(tmp_path):
    from omh_ref.evaluate import pictures

    feats = builders.write_feats(tmp_path / "f" / "feats.npy", 16, 4, 5, C, np.float32)
    ck = _run(small(omh=False), feats, tmp_path / "r", steps=3, log_every=1)
    log = tmp_path / "r" / "log.jsonl"
    assert pictures.loss_keys(pictures.read_log(log))[:2] == ["loss", "smooth"]
    assert pictures.BASE_LOSSES == {"corr": "stego base loss (corr)", "smooth": "smooseg base loss (smooth)",
                                    "supcon": "hp base loss (supcon)"}
    assert ck
