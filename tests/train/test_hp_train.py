"""Training the HP base: its inputs read beside the features (attn.npy, feats_aug.npy, refused in
one line when missing), its pools made, renewed on schedule and checkpointed, its moving-average
head, AdamW's decay and the clipping, λ over the run, a bit-exact resume (pools included) and a
divergence that keeps the pools of the step before, on NumPy and on the strict CuPy stand-in; then
``omh-ref train --base hp`` with and without --omh, ``eval`` and ``segment`` on its checkpoint."""
import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.core import backend, checks, fixtures, head, model
from omh_ref.core import strict_device as sd
from omh_ref.core.bases import hp
from omh_ref.core.errors import InputError
from omh_ref.features import synthetic
from omh_ref.train import checkpoint, loop
from omh_ref.train.loop import TrainOptions, train
from omh_ref_cli.main import main
from tests import builders

C = 11


def hp_folder(folder, N=16, h=4, w=5, c=C, **kw):
    builders.write_feats(Path(folder) / "feats.npy", N, h, w, c, np.float16)
    return builders.hp_inputs(folder, **kw)


def small(**kw):
    """The checks' HP problem (a pool of 6 patches, warmup 1, a sampled denominator, the
    consistency term on) at C = 11, renewing its specific pool every 2 steps."""
    return fixtures.small_config(in_dim=C, **{**checks.HP_CHECK, "renew_interval": 2, **kw})


def _opts(feats, out, **kw):
    base = dict(features=str(feats), out=str(out), steps=6, batch_size=4, ckpt_every=3, log_every=1, progress=False)
    return TrainOptions(**{**base, **kw})


def _log(out):
    return [json.loads(ln) for ln in (Path(out) / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def feats(tmp_path):
    return hp_folder(tmp_path / "f")


# ---- a run -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("omh", [False, True])
def test_a_run_trains_logs_its_terms_and_checkpoints_its_pools(feats, tmp_path, omh):
    cfg = small(omh=omh)
    res = train(cfg, _opts(feats, tmp_path / "r"), say=lambda *a: None)
    ck = checkpoint.load(res["checkpoint"])
    assert ck["step"] == 6 and set(ck["state"]) == {"pool_ag", "pool_sp"}
    assert ck["state"]["pool_ag"].shape == (6, C) and ck["state"]["pool_sp"].shape == (6, cfg.dim)
    for pool in ck["state"].values():
        np.testing.assert_allclose(np.linalg.norm(pool, axis=1), 1.0, rtol=1e-6)
    opts = ck["info"]["options"]
    assert (opts["weight_decay"], opts["grad_clip"]) == (0.1, 10.0)          # HP's optimiser, unasked
    log = _log(tmp_path / "r")
    assert [r["lam"] for r in log] == [hp.lam(t, 6, 1) for t in range(6)] == [0, 0, 0.2, 0.4, 0.6, 0.8]
    assert all(np.isfinite(r[k]) for r in log for k in ("supcon", "supcon_global", "supcon_local", "consistency"))
    init = model.init_params(cfg, np.random.default_rng(0))
    for k in ("PW", "Pb", *head.KEYS):
        assert not np.array_equal(ck["params"][k], init[k]), k              # project_head trains with the head
    assert not np.any(ck["opt_state"]["m"]["EW1"]) and np.any(ck["opt_state"]["m"]["PW"])


def test_the_specific_pool_is_renewed_every_interval_and_the_agnostic_pool_never(feats, tmp_path):
    """renew_interval 2: before steps t = 2, 4 (0-based), never at t = 0."""
    cfg = small()
    pools = {}
    for steps in (1, 2, 3, 5):
        res = train(cfg, _opts(feats, tmp_path / str(steps), steps=steps), say=lambda *a: None)
        pools[steps] = checkpoint.load(res["checkpoint"])["state"]
    assert all(np.array_equal(pools[s]["pool_ag"], pools[1]["pool_ag"]) for s in pools)
    assert np.array_equal(pools[2]["pool_sp"], pools[1]["pool_sp"])       # t = 1: not due
    assert not np.array_equal(pools[3]["pool_sp"], pools[2]["pool_sp"])   # t = 2: renewed
    assert not np.array_equal(pools[5]["pool_sp"], pools[3]["pool_sp"])   # t = 4: renewed


def test_the_ema_head_follows_the_head_of_the_step_before_adam(feats, tmp_path):
    cfg = small(ema_alpha=0.9)
    one = checkpoint.load(train(cfg, _opts(feats, tmp_path / "1", steps=1), say=lambda *a: None)["checkpoint"])
    two = checkpoint.load(train(cfg, _opts(feats, tmp_path / "2", steps=2), say=lambda *a: None)["checkpoint"])
    init = model.init_params(cfg, np.random.default_rng(0))
    a, b = np.float32(0.9), np.float32(1 - 0.9)
    for k in head.KEYS:
        assert np.array_equal(one["params"][f"E{k}"], init[k] * a + init[k] * b), k     # E₁ from E₀ = θ₀
        assert np.array_equal(two["params"][f"E{k}"], one["params"][f"E{k}"] * a + one["params"][k] * b), k


def test_adamw_decays_and_the_clip_bounds_only_the_heads_parameters(feats, tmp_path, monkeypatch):
    seen, raw = [], []
    real_step, real_grads = loop.adam_step, model.loss_and_grads

    def spy_step(params, grads, state, lr, **kw):
        seen.append((dict(grads), kw.get("weight_decay")))
        return real_step(params, grads, state, lr, **kw)

    def spy_grads(*a, **k):
        out = real_grads(*a, **k)
        raw.append(out[2])
        return out

    monkeypatch.setattr(loop, "adam_step", spy_step)
    monkeypatch.setattr(model, "loss_and_grads", spy_grads)
    train(small(), _opts(feats, tmp_path / "r", steps=2, grad_clip=1e-3), say=lambda *a: None)
    for (grads, decay), before in zip(seen, raw):
        assert decay == {k: 0.1 for k in head.KEYS}
        norm = np.sqrt(sum(float((grads[k] ** 2).sum()) for k in head.KEYS))
        assert norm <= 1e-3 * (1 + 1e-5) and norm >= 0.999e-3                  # clipped to the bound
        for k in ("PW", "Pb", "M0"):
            assert np.array_equal(grads[k], before[k]), k                        # not project_head, not the probe
    seen.clear()
    train(fixtures.small_config(in_dim=C), _opts(feats, tmp_path / "stego", steps=1), say=lambda *a: None)
    assert seen[0][1] is None                                                    # other bases: plain Adam
    # the decay itself: the first step with it is the first step without it minus lr·wd·θ₀ (head only)
    runs = {wd: checkpoint.load(train(small(), _opts(feats, tmp_path / f"wd{wd}", steps=1, weight_decay=wd),
                                      say=lambda *a: None)["checkpoint"])["params"] for wd in (0.0, 0.1)}
    init = model.init_params(small(), np.random.default_rng(0))
    for k in head.KEYS:     # up to the float32 rounding of the two parameters (a few ulps of θ₀)
        ulps = 4 * np.finfo(np.float32).eps * np.abs(init[k]).max()
        np.testing.assert_allclose(runs[0.1][k] - runs[0.0][k], -5e-4 * 0.1 * init[k], rtol=0, atol=ulps)
        assert np.abs(runs[0.1][k] - runs[0.0][k]).max() > 100 * ulps
    for k in ("PW", "Pb", "M0"):
        assert np.array_equal(runs[0.1][k], runs[0.0][k]), k


# ---- resume and divergence ---------------------------------------------------------------------------
def _interrupt_at(step):
    """A validator that sends the process a SIGINT at ``step``: the loop's Ctrl-C, in process."""
    class Stop:
        def __call__(self, params, cfg):
            self.at = getattr(self, "at", 0) + 1
            if self.at == step:
                signal.raise_signal(signal.SIGINT)
            return {"val_miou": 0.0, "val_acc": 0.0}
    return Stop()


@pytest.mark.parametrize("omh", [False, True])
def test_resume_is_bit_exact_pools_and_ema_head_included(feats, tmp_path, omh):
    """Stopped at step 3 of 7 by a Ctrl-C (the pool renewed before it and after), resumed: the
    uninterrupted run's parameters, moments, pools and log."""
    cfg = small(omh=omh)
    straight = train(cfg, _opts(feats, tmp_path / "a", steps=7, val_every=1), say=lambda *a: None,
                     validate=lambda p, c: {"val_miou": 0.0, "val_acc": 0.0})
    first = train(cfg, _opts(feats, tmp_path / "b", steps=7, val_every=1), say=lambda *a: None,
                  validate=_interrupt_at(3))
    assert first["interrupted"] and first["step"] == 3
    notes = []
    train(cfg, _opts(feats, tmp_path / "b", steps=7, val_every=1, resume=first["checkpoint"]), say=notes.append,
          validate=lambda p, c: {"val_miou": 0.0, "val_acc": 0.0})
    a, b = (checkpoint.load(tmp_path / d / "ckpt.npz") for d in ("a", "b"))
    for k in a["params"]:
        assert np.array_equal(a["params"][k], b["params"][k]), k
        assert np.array_equal(a["opt_state"]["m"][k], b["opt_state"]["m"][k]), k
    for k in ("pool_ag", "pool_sp"):
        assert np.array_equal(a["state"][k], b["state"][k]), k
    assert a["rng"].bit_generator.state == b["rng"].bit_generator.state
    strip = [[{k: v for k, v in r.items() if k != "seconds"} for r in _log(tmp_path / d)] for d in ("a", "b")]
    assert strip[0] == strip[1]
    assert not any("note" in n for n in notes)


def test_a_resume_with_other_steps_or_optimiser_settings_says_so(feats, tmp_path):
    cfg = small()
    first = train(cfg, _opts(feats, tmp_path / "r", steps=4), say=lambda *a: None)
    notes = []
    train(cfg, _opts(feats, tmp_path / "r", steps=6, resume=first["checkpoint"]), say=notes.append)
    said = [n for n in notes if n.startswith("note:")]
    assert said == ["note: --steps 4 -> 6 since the checkpoint; the continuation differs from an uninterrupted run "
                    "(the hp base's λ follows the run's steps)"]
    notes.clear()
    train(cfg, _opts(feats, tmp_path / "r", steps=7, resume=str(tmp_path / "r" / "ckpt.npz"), weight_decay=0.0),
          say=notes.append)
    assert any("--weight-decay 0.1 -> 0.0" in n for n in notes)
    assert checkpoint.load(tmp_path / "r" / "ckpt.npz")["info"]["options"]["weight_decay"] == 0.0
    notes.clear()
    train(cfg, _opts(feats, tmp_path / "r", steps=8, resume=str(tmp_path / "r" / "ckpt.npz")), say=notes.append)
    assert checkpoint.load(tmp_path / "r" / "ckpt.npz")["info"]["options"]["weight_decay"] == 0.0   # kept


def test_a_checkpoint_without_its_pools_is_refused_in_one_line(feats, tmp_path):
    res = train(small(), _opts(feats, tmp_path / "r", steps=2), say=lambda *a: None)
    ck = checkpoint.load(res["checkpoint"])
    checkpoint.save(tmp_path / "cut.npz", ck["params"], ck["opt_state"], ck["step"], ck["rng"], ck["config"],
                    arrays=ck["arrays"], info=ck["info"])
    with pytest.raises(InputError, match=r"cut.npz: holds no pool_ag, pool_sp \(the hp base's state\)"):
        train(small(), _opts(feats, tmp_path, resume=str(tmp_path / "cut.npz")), say=lambda *a: None)


def test_a_divergence_keeps_the_pools_and_ema_head_of_the_step_before(feats, tmp_path, monkeypatch):
    """NaN gradients at step 4, looked at after step 6: the pool was renewed before step 5
    meanwhile; diverged.npz holds step 3's state, its pools included."""
    cfg = small()
    train(cfg, _opts(feats, tmp_path / "ref", steps=8, val_every=1), say=lambda *a: None,
          validate=_interrupt_at(3))                                  # step 3 of the same 8 (λ's T)
    real, calls = model.loss_and_grads, []

    def flaky(*a, **k):
        loss, parts, grads = real(*a, **k)
        calls.append(1)
        return (loss, parts, dict(grads, PW=grads["PW"] * np.nan)) if len(calls) == 4 else (loss, parts, grads)

    monkeypatch.setattr(model, "loss_and_grads", flaky)
    with pytest.raises(InputError, match="diverged at step 4"):
        train(cfg, _opts(feats, tmp_path / "bad", steps=8, log_every=6, ckpt_every=8), say=lambda *a: None)
    want, got = (checkpoint.load(p) for p in (tmp_path / "ref" / "ckpt.npz", tmp_path / "bad" / "diverged.npz"))
    for k in want["params"]:
        assert np.array_equal(got["params"][k], want["params"][k]), k
    for k in ("pool_ag", "pool_sp"):
        assert np.array_equal(got["state"][k], want["state"][k]), k


# ---- inputs ------------------------------------------------------------------------------------------
def test_missing_attention_or_augmented_features_are_one_line_before_anything_is_written(tmp_path):
    cfg = small()
    feats = hp_folder(tmp_path / "a", attention=False)
    with pytest.raises(InputError) as e:
        train(cfg, _opts(feats, tmp_path / "ra"), say=lambda *a: None)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "feats.json: names no attention weights (attn.npy)" in msg
    assert "omh-ref extract --attention" in msg and not (tmp_path / "ra").exists()
    feats = hp_folder(tmp_path / "b", augmented=False)
    with pytest.raises(InputError, match=r"names no augmented features \(feats_aug.npy\).*extract --augment"):
        train(cfg, _opts(feats, tmp_path / "rb"), say=lambda *a: None)
    feats = hp_folder(tmp_path / "c", write_attn=False)
    with pytest.raises(InputError, match=r"attn.npy: no such file"):
        train(cfg, _opts(feats, tmp_path / "rc"), say=lambda *a: None)


def test_without_the_consistency_term_the_augmented_features_are_not_read(tmp_path, monkeypatch):
    feats = hp_folder(tmp_path / "f", augmented=False)
    seen = []
    real = model.loss_and_grads

    def spy(params, batch, *a, **k):
        seen.append(sorted(batch))
        return real(params, batch, *a, **k)

    monkeypatch.setattr(model, "loss_and_grads", spy)
    train(small(consistency_weight=0.0), _opts(feats, tmp_path / "r", steps=2), say=lambda *a: None)
    assert seen == [["attn", "feats"]] * 2
    assert "consistency" not in _log(tmp_path / "r")[0]


def test_the_batch_inputs_are_the_batch_rows_of_the_files(feats, tmp_path, monkeypatch):
    seen = []
    real = loop._next_indices

    def spy_idx(*a, **k):
        out = real(*a, **k)
        seen.append(out[0].copy())
        return out

    batches = []
    real_lg = model.loss_and_grads

    def spy(params, batch, *a, **k):
        batches.append(batch)
        return real_lg(params, batch, *a, **k)

    monkeypatch.setattr(loop, "_next_indices", spy_idx)
    monkeypatch.setattr(model, "loss_and_grads", spy)
    train(small(), _opts(feats, tmp_path / "r", steps=3), say=lambda *a: None)
    folder = Path(feats).parent
    attn, aug = np.load(folder / "attn.npy"), np.load(folder / "feats_aug.npy")
    for idx, batch in zip(seen, batches):
        assert np.array_equal(batch["attn"], attn[idx].astype(np.float32))
        assert np.array_equal(batch["feats_aug"], aug[idx].astype(np.float32))


# ---- the strict CuPy stand-in ------------------------------------------------------------------------
def test_a_run_on_the_strict_stand_in_is_the_numpy_run(feats, tmp_path):
    cfg = small()
    train(cfg, _opts(feats, tmp_path / "cpu", steps=5, ckpt_every=5, log_every=5), say=lambda *a: None)
    with backend.strict_device():
        sd.reset_conversions()
        train(cfg, _opts(feats, tmp_path / "gpu", steps=5, ckpt_every=5, log_every=5, device="gpu"),
              say=lambda *a: None)
        conv = sd.conversions()
    assert sum(1 for _, site in conv if "/train/loop.py" in site) <= 1                  # the one look at step 5
    assert not [site for _, site in conv if "/core/" in site]                             # nothing read per step
    a, b = (checkpoint.load(tmp_path / d / "ckpt.npz") for d in ("cpu", "gpu"))
    for k in a["params"]:
        assert np.array_equal(a["params"][k], b["params"][k]), k
    for k in a["state"]:
        assert np.array_equal(a["state"][k], b["state"][k]), k


# ---- the command line, eval and segment -------------------------------------------------------------
def _cli(args):
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, (res.output, res.exception)
    return res.output


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Synthetic train and val splits (3 x 3 classes, grid 4, C = 8), the train split with HP's
    inputs."""
    d = tmp_path_factory.mktemp("hp_synth")
    for split, n in (("train", 16), ("val", 8)):
        synthetic.write(synthetic.SynthSpec(n_images=n, grid=4, dim=8, seed=0), d / split, split=split)
    builders.hp_inputs(d / "train")
    return d


@pytest.mark.parametrize("omh", [True, False])
def test_train_base_hp_on_the_command_line_then_eval(synth, tmp_path, omh):
    out = tmp_path / "run"
    args = ["train", "--base", "hp", "--features", synth / "train" / "feats.npy", "--out", out, "--steps", 4,
            "--batch-size", 4, "--levels", "18,9", "--dim", 6, "--pool-size", 10, "--renew-interval", 2,
            "--warmup", 1, "--denominator-share", 0.3, "--quiet", "--omh" if omh else "--no-omh"]
    _cli(args)
    ck = checkpoint.load(out / "ckpt.npz")
    c = ck["config"]
    assert (c.base, c.omh, c.levels, c.dim, c.ema_alpha, c.supcon_tau) == ("hp", omh, (18, 9) if omh else (9,), 6,
                                                                           0.99, 0.8)
    o = ck["info"]["options"]
    assert (o["lr"], o["lr_clusters"], o["weight_decay"], o["grad_clip"]) == (5e-4, 5e-3, 0.1, 10.0)
    _cli(["train", "--resume", out / "ckpt.npz", "--steps", 6, "--quiet"])
    ck = checkpoint.load(out / "ckpt.npz")
    assert ck["step"] == 6 and ck["info"]["options"]["weight_decay"] == 0.1 and set(ck["state"]) == {"pool_ag",
                                                                                                        "pool_sp"}
    _cli(["eval", "--checkpoint", out / "ckpt.npz", "--features", synth / "val" / "feats.npy", "--json",
          tmp_path / "scores.json", "--quiet"])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert 0 <= scores["cluster"]["miou"] <= 100 and 0 <= scores["cluster"]["acc"] <= 100


def test_the_optimiser_flags_reach_train_and_seeds(synth, tmp_path):
    """--weight-decay and --grad-clip override the base's values in train and in seeds (whose runs
    record them); a STEGO run keeps both off."""
    small = ["--batch-size", 4, "--levels", "18,9", "--dim", 6, "--pool-size", 10, "--quiet"]
    _cli(["train", "--base", "hp", "--features", synth / "train" / "feats.npy", "--out", tmp_path / "t", "--steps", 2,
          "--weight-decay", 0, "--grad-clip", 3.5, *small])
    o = checkpoint.load(tmp_path / "t" / "ckpt.npz")["info"]["options"]
    assert (o["weight_decay"], o["grad_clip"]) == (0.0, 3.5)
    _cli(["seeds", "--base", "hp", "--features", synth / "train" / "feats.npy", "--val-features",
          synth / "val" / "feats.npy", "--out", tmp_path / "s", "--seeds", "0", "--steps", 2, "--no-probe",
          "--weight-decay", 0.25, *small])
    o = checkpoint.load(tmp_path / "s" / "seed0" / "ckpt.npz")["info"]["options"]
    assert (o["weight_decay"], o["grad_clip"]) == (0.25, 10.0)      # the clip: HP's own
    assert json.loads((tmp_path / "s" / "results.json").read_text())["options"]["weight_decay"] == 0.25
    _cli(["train", "--features", synth / "train" / "feats.npy", "--out", tmp_path / "stego", "--steps", 1,
          "--batch-size", 4, "--levels", "18,9", "--dim", 6, "--quiet"])
    o = checkpoint.load(tmp_path / "stego" / "ckpt.npz")["info"]["options"]
    assert (o["weight_decay"], o["grad_clip"]) == (0.0, 0.0)


def test_train_base_hp_without_attention_is_one_line(tmp_path):
    synthetic.write(synthetic.SynthSpec(n_images=8, grid=4, dim=8, seed=0), tmp_path / "f")
    res = CliRunner().invoke(main, ["train", "--base", "hp", "--features", str(tmp_path / "f" / "feats.npy"),
                                    "--out", str(tmp_path / "r"), "--steps", 1, "--batch-size", 4, "--quiet"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: ") and "names no attention weights (attn.npy)" in line


def test_segment_with_an_hp_checkpoint(tmp_path):
    """A run on 3-channel features (the pooled colour model's), segmented: masks at each image's
    size; and an hp checkpoint whose probe knows the colours segments them whatever its
    moving-average head and project_head hold (predictions come from the live code's probe)."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from omh_ref.core.config import Config, with_base_defaults
    from omh_ref.jobs import segmenter as sg
    from omh_ref.evaluate import metrics

    feats = hp_folder(tmp_path / "f", N=8, h=4, w=4, c=3)
    _cli(["train", "--base", "hp", "--features", feats, "--out", tmp_path / "run", "--steps", 2, "--batch-size", 4,
          "--levels", "4", "--dim", 3, "--pool-size", 8, "--no-omh", "--quiet"])
    model_path = builders.pooled_onnx(tmp_path / "pooled.onnx")
    truths = builders.write_worlds(tmp_path / "imgs")
    _cli(["segment", "--model", model_path, "--checkpoint", tmp_path / "run" / "ckpt.npz", "--images",
          tmp_path / "imgs", "--out", tmp_path / "seg", "--resolution", 64, "--quiet"])
    for name, truth in truths.items():
        assert np.asarray(__import__("PIL.Image").Image.open(tmp_path / "seg" / f"{name}.clusters.png")).shape \
            == truth.shape

    colour = checkpoint.load(builders.colour_ckpt(tmp_path / "colour.npz"))["params"]
    cfg = Config(**with_base_defaults({"base": "hp", "omh": False, "in_dim": 3, "dim": 3, "levels": (4,)}))
    rng = np.random.default_rng(1)
    params = {**{k: colour[k] for k in head.KEYS}, "M0": colour["M0"],
              **{k: rng.standard_normal(s).astype(np.float32) for k, s in hp.shapes(cfg).items()}}
    ck = builders.save_ckpt(tmp_path / "hp.npz", params, cfg)
    for H, W in builders.SIZES:
        rgb, truth = builders.colour_world(H, W)
        pred = sg.Segmenter(model_path, ck, resolution=64).segment(rgb).clusters
        conf = np.zeros((4, 4))
        np.add.at(conf, (pred.astype(np.int64).ravel(), truth.ravel()), 1)
        assert metrics.scores(conf, metrics.hungarian(conf))["miou"] >= 95.0     # test_segment's threshold


def test_the_pools_patches_are_read_by_cell_and_a_bad_file_is_one_line(tmp_path):
    from omh_ref.features.store import FeatureStore

    path = Path(builders.write_feats(tmp_path / "feats.npy", 6, 3, 4, 5, np.float32))
    whole = np.load(path)
    read = loop._patch_reader(FeatureStore(path))
    rows, cells = np.array([4, 0, 4, 2]), np.array([11, 0, 5, 7])
    assert np.array_equal(read(rows, cells), whole[rows, cells // 4, cells % 4])
    f = np.load(path, mmap_mode="r+")
    f[2, 1, 3] = np.nan
    f.flush()
    del f
    with pytest.raises(InputError, match=r"feats.npy: row 2 contains NaN or inf"):
        read(rows, cells)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(InputError, match=r"feats.npy: the feature file shrank while in use"):
        read(rows, cells)


def test_a_checkpoint_with_pools_of_another_shape_is_refused_in_one_line(feats, tmp_path):
    """A pool of other rows or columns than the config's (a crafted or corrupted checkpoint) is
    named in one line, not trained on nor left to a traceback from the thresholds."""
    res = train(small(), _opts(feats, tmp_path / "r", steps=2), say=lambda *a: None)
    d = dict(np.load(res["checkpoint"]))
    for key, bad in (("state/pool_ag", d["state/pool_ag"][:2]), ("state/pool_sp", d["state/pool_sp"].T.copy())):
        e = dict(d, **{key: bad})
        np.savez(tmp_path / "cut.npz", **e)
        with pytest.raises(InputError, match=re.escape(f"cut.npz: {key} {tuple(bad.shape)} (expected (")):
            train(small(), _opts(feats, tmp_path, steps=4, resume=str(tmp_path / "cut.npz")), say=lambda *a: None)


def test_a_batch_past_the_denominator_draws_index_is_one_line(feats, tmp_path):
    from omh_ref.core.bases import hp

    hp.check_batch(small(), 64, 784)                                   # HP's own batch and grid
    with pytest.raises(ValueError, match="past its 2\\^32 entries"):
        hp.check_batch(small(), 7000, 784)
    hp.check_batch(small(denominator_share=1.0), 7000, 784)           # no draw at ρ = 1


def test_seeds_refuses_a_finished_run_of_other_optimiser_settings(synth, tmp_path):
    """A seed's finished run is reused only under the settings it was trained with: another
    --weight-decay (or --lr) is one line, not results filed under settings the run never had."""
    args = ["seeds", "--base", "hp", "--features", synth / "train" / "feats.npy", "--val-features",
            synth / "val" / "feats.npy", "--out", tmp_path / "s", "--seeds", "0", "--steps", 2, "--no-probe",
            "--batch-size", 4, "--levels", "18,9", "--dim", 6, "--pool-size", 10, "--quiet"]
    _cli(args)
    _cli(args)                                                          # the same settings: reused
    res = CliRunner().invoke(main, [str(a) for a in args + ["--weight-decay", 0]])
    assert res.exit_code != 0 and "trained with --weight-decay 0.1 (now 0.0)" in res.output, res.output
    assert "Traceback" not in res.output
