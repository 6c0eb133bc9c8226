"""Training: bit-exact resume, atomic checkpoints (kill -9), Ctrl-C, and clear errors for bad input."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.lib.format import open_memmap

from omh_ref.core import fixtures, model
from tests import builders
from omh_ref.train import checkpoint
from omh_ref.core.errors import InputError
from omh_ref.train.loop import TrainOptions, train
from omh_ref_cli.main import main

C = 11


def write_feats(path, N=24, h=6, w=5, dtype=np.float16, seed=0):
    return builders.write_feats(path, N, h, w, C, dtype, seed)


@pytest.fixture
def feats(tmp_path):
    return write_feats(tmp_path / "feats.npy")


def small_cfg(**kw):
    return fixtures.small_config(in_dim=C, **kw)


def opts(feats, out, **kw):
    base = dict(features=feats, out=str(out), steps=100, batch_size=4, ckpt_every=30, log_every=10, progress=False)
    base.update(kw)
    return TrainOptions(**base)


def quiet(*_):
    pass


def test_resume_is_bit_exact(feats, tmp_path):
    cfg = small_cfg()
    train(cfg, opts(feats, tmp_path / "straight"), say=quiet)
    train(cfg, opts(feats, tmp_path / "split", steps=50), say=quiet)
    train(cfg, opts(feats, tmp_path / "split", resume=str(tmp_path / "split" / "ckpt.npz")), say=quiet)
    a = checkpoint.load(tmp_path / "straight" / "ckpt.npz")
    b = checkpoint.load(tmp_path / "split" / "ckpt.npz")
    assert a["step"] == b["step"] == 100
    for k in a["params"]:
        assert np.array_equal(a["params"][k], b["params"][k]), k
        assert np.array_equal(a["opt_state"]["m"][k], b["opt_state"]["m"][k]), k
    assert a["rng"].bit_generator.state == b["rng"].bit_generator.state
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "seconds"}  # noqa: E731
                       for ln in open(p).read().splitlines()]
    assert strip(tmp_path / "straight" / "log.jsonl") == strip(tmp_path / "split" / "log.jsonl")


def test_training_changes_params_and_logs(feats, tmp_path):
    cfg = small_cfg()
    res = train(cfg, opts(feats, tmp_path / "r", steps=20), say=quiet)
    lines = [json.loads(ln) for ln in open(res["log"])]
    assert [ln["step"] for ln in lines] == [10, 20]
    for key in ("loss", "corr", "clu_0", "hier_0", "sinkhorn_err_0", "plan_sparsity_0", "seconds"):
        assert key in lines[-1]


def test_first_step_is_adams_at_each_parameters_rate(feats, tmp_path):
    """After one step from the seed's initialisation every entry has moved by Adam's first step,
    lr · |g| / (|g| + 1e-8): at most its rate, and the rate itself wherever |g| ≫ 1e-8 (here
    3e-4 for the head and 7e-3 for the centroids, so a swapped or ignored rate fails)."""
    cfg = small_cfg()
    res = train(cfg, opts(feats, tmp_path / "r", steps=1, lr=3e-4, lr_clusters=7e-3), say=quiet)
    init = model.init_params(cfg, np.random.default_rng(0))
    trained = checkpoint.load(res["checkpoint"])["params"]
    for k in init:
        rate = 7e-3 if k.startswith("M") else 3e-4
        moved = np.abs(trained[k].astype(np.float64) - init[k]) / rate
        assert moved.max() <= 1 + 1e-3, k                      # float32 rounding of p − Δ
        assert abs(np.median(moved) - 1) <= 1e-3, (k, np.median(moved))


def test_same_seed_same_result(feats, tmp_path):
    cfg = small_cfg()
    p = [checkpoint.load(train(cfg, opts(feats, tmp_path / str(i), steps=12, seed=s), say=quiet)["checkpoint"])["params"]
         for i, s in enumerate((0, 0, 1))]
    assert all(np.array_equal(p[0][k], p[1][k]) for k in p[0])
    assert not np.array_equal(p[0]["W1"], p[2]["W1"])              # the seed is used


def test_resume_trims_the_log_past_the_checkpoint(feats, tmp_path):
    """A run killed after logging step 30 but before its next checkpoint (step 20), plus a torn
    last line: the resume keeps steps 10 and 20 only, then logs 30 and 40 again."""
    cfg = small_cfg()
    train(cfg, opts(feats, tmp_path / "r", steps=20, ckpt_every=20), say=quiet)
    log = tmp_path / "r" / "log.jsonl"
    with open(log, "a") as f:
        f.write(json.dumps({"step": 30, "loss": 0.0}) + "\n" + '{"step": 40, "lo')
    train(cfg, opts(feats, tmp_path / "r", steps=40, resume=str(tmp_path / "r" / "ckpt.npz")), say=quiet)
    steps = [json.loads(ln)["step"] for ln in log.read_text().splitlines()]
    assert steps == [10, 20, 30, 40]
    # the re-logged records are the ones of a run that was never killed
    train(cfg, opts(feats, tmp_path / "straight", steps=40), say=quiet)
    strip = lambda p: [{k: v for k, v in json.loads(ln).items() if k != "seconds"}  # noqa: E731
                       for ln in open(p).read().splitlines()]
    assert strip(log) == strip(tmp_path / "straight" / "log.jsonl")


def _fail_at_call(n, make_failure):
    """model.loss_and_grads whose n-th call goes through ``make_failure(real, args, kwargs)``."""
    real, calls = model.loss_and_grads, []

    def flaky(*a, **k):
        calls.append(1)
        return make_failure(real, a, k) if len(calls) == n else real(*a, **k)
    return flaky


def _nan_gradient(real, a, k):
    loss, parts, grads = real(*a, **k)          # a finite loss
    grads = dict(grads, W3=grads["W3"].copy())
    grads["W3"][1, 2] = np.nan
    return loss, parts, grads


def _nan_centroid(real, a, k):
    params = dict(a[0], M1=a[0]["M1"].copy())   # what the step sees; the run's own stay finite
    params["M1"][0, 0] = np.nan
    return real(params, *a[1:], **k)


@pytest.mark.parametrize("failure,why", [
    (_nan_gradient, r"non-finite gradients"),
    (_nan_centroid, r"non-finite loss"),        # the NaN reaches the hierarchy's Sinkhorn, then the loss
])
def test_divergence_saves_the_state_before_the_step(feats, tmp_path, monkeypatch, failure, why):
    """A NaN gradient with a finite loss, and a NaN reaching the hierarchy's Sinkhorn, at step 4:
    a one-line divergence, and diverged.npz is the state after step 3 exactly (parameters, Adam
    moments and count, generator, data position: equal to a 3-step run's checkpoint), which
    resumes bit-exactly as if nothing had happened."""
    from omh_ref.train import loop as train_mod

    cfg = small_cfg()
    train(cfg, opts(feats, tmp_path / "three", steps=3), say=quiet)
    train(cfg, opts(feats, tmp_path / "straight", steps=6), say=quiet)
    monkeypatch.setattr(train_mod.model, "loss_and_grads", _fail_at_call(4, failure))
    with pytest.raises(InputError, match=rf"training diverged at step 4 \({why}\).*diverged.npz") as e:
        train(cfg, opts(feats, tmp_path / "d", steps=6), say=quiet)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    d, three = (checkpoint.load(p) for p in (tmp_path / "d" / "diverged.npz", tmp_path / "three" / "ckpt.npz"))
    assert d["step"] == 3 and d["opt_state"]["t"] == three["opt_state"]["t"] == 3
    for k in three["params"]:
        assert np.array_equal(d["params"][k], three["params"][k]), k
        assert np.array_equal(d["opt_state"]["m"][k], three["opt_state"]["m"][k]), k
        assert np.array_equal(d["opt_state"]["v"][k], three["opt_state"]["v"][k]), k
    assert d["rng"].bit_generator.state == three["rng"].bit_generator.state
    assert np.array_equal(d["arrays"]["order"], three["arrays"]["order"]) and d["info"]["pos"] == three["info"]["pos"]
    train(cfg, opts(feats, tmp_path / "d", steps=6, resume=str(tmp_path / "d" / "diverged.npz")), say=quiet)
    a, b = (checkpoint.load(tmp_path / d / "ckpt.npz") for d in ("straight", "d"))
    assert all(np.array_equal(a["params"][k], b["params"][k]) for k in a["params"])


def test_a_bug_is_not_reported_as_divergence(feats, tmp_path, monkeypatch):
    """Only omh-ref's NonFiniteError is a divergence: any other error (a ValueError included)
    propagates as itself, with its traceback, and writes no diverged.npz."""
    from omh_ref.train import loop as train_mod

    def bug(real, a, k):
        raise ValueError("an unrelated bug")
    monkeypatch.setattr(train_mod.model, "loss_and_grads", _fail_at_call(2, bug))
    with pytest.raises(ValueError, match="an unrelated bug") as e:
        train(small_cfg(), opts(feats, tmp_path / "b", steps=4), say=quiet)
    assert type(e.value) is ValueError and e.traceback[-1].name == "bug"   # raised where it happened
    assert not (tmp_path / "b" / "diverged.npz").exists()


def test_resume_from_non_finite_parameters_is_refused(feats, tmp_path):
    cfg = small_cfg()
    train(cfg, opts(feats, tmp_path / "r", steps=2), say=quiet)
    ck = checkpoint.load(tmp_path / "r" / "ckpt.npz")
    ck["params"]["b2"][0] = np.inf
    checkpoint.save(tmp_path / "r" / "bad.npz", ck["params"], ck["opt_state"], ck["step"], ck["rng"], ck["config"],
                    arrays=ck["arrays"], info=ck["info"])
    with pytest.raises(InputError, match=r"bad.npz: non-finite values in b2; resume from an earlier"):
        train(cfg, opts(feats, tmp_path / "r", steps=4, resume=str(tmp_path / "r" / "bad.npz")), say=quiet)


def test_adam_refuses_non_finite_gradients_before_changing_anything():
    from omh_ref.core.errors import NonFiniteError
    from omh_ref.core.optim import adam_init, adam_step

    params = {"a": np.ones(3, np.float32), "b": np.zeros((2, 2), np.float32)}
    state = adam_init(params)
    assert adam_step(params, {"a": np.ones(3, np.float32), "b": np.full((2, 2), 2, np.float32)}, state, 0.1) == 19.0
    before = ({k: v.copy() for k, v in params.items()}, {k: v.copy() for k, v in state["m"].items()},
              {k: v.copy() for k, v in state["v"].items()})
    for g, msg in ((np.array([1, np.nan, 0], np.float32), "non-finite entries in a"),
                   (np.array([1e20, 0, 0], np.float32), "an overflow")):     # finite, but g² is not
        with pytest.raises(NonFiniteError, match=msg):
            adam_step(params, {"a": g, "b": np.zeros((2, 2), np.float32)}, state, 0.1)
        assert state["t"] == 1
        for now, then in zip((params, state["m"], state["v"]), before):
            assert all(np.array_equal(now[k], then[k]) for k in now)


def test_resume_into_another_runs_folder_is_refused(feats, tmp_path):
    cfg = small_cfg()
    train(cfg, opts(feats, tmp_path / "a", steps=5), say=quiet)
    train(cfg, opts(feats, tmp_path / "b", steps=5, seed=2), say=quiet)
    before = (tmp_path / "b" / "ckpt.npz").read_bytes()
    with pytest.raises(InputError, match=r"b/ckpt.npz: --out holds another run's checkpoint; resume .*--overwrite"):
        train(cfg, opts(feats, tmp_path / "b", steps=8, resume=str(tmp_path / "a" / "ckpt.npz")), say=quiet)
    assert (tmp_path / "b" / "ckpt.npz").read_bytes() == before
    train(cfg, opts(feats, tmp_path / "c", steps=8, resume=str(tmp_path / "a" / "ckpt.npz")), say=quiet)  # a new folder
    assert checkpoint.load(tmp_path / "c" / "ckpt.npz")["step"] == 8


def test_a_second_ctrl_c_stops_at_once():
    from omh_ref.train.loop import _Interrupt

    with _Interrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.hit
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)   # the handler runs between bytecodes of this thread


def test_resume_with_another_config_is_refused(feats, tmp_path):
    train(small_cfg(), opts(feats, tmp_path / "r", steps=5), say=quiet)
    before = (tmp_path / "r" / "ckpt.npz").read_bytes()
    with pytest.raises(InputError, match="another config.*eps"):
        train(small_cfg(eps=0.2), opts(feats, tmp_path / "r", steps=10, resume=str(tmp_path / "r" / "ckpt.npz")),
              say=quiet)
    assert (tmp_path / "r" / "ckpt.npz").read_bytes() == before


def test_resume_on_another_feature_file_is_refused(feats, tmp_path):
    train(small_cfg(), opts(feats, tmp_path / "r", steps=5), say=quiet)
    other = write_feats(tmp_path / "other.npy", seed=1)
    with pytest.raises(InputError, match="another feature file"):
        train(small_cfg(), opts(other, tmp_path / "r", steps=10, resume=str(tmp_path / "r" / "ckpt.npz")), say=quiet)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from omh_ref.core import fixtures, model
    from omh_ref.train import checkpoint
    from omh_ref.core.optim import adam_init
    cfg = fixtures.small_config()
    rng = np.random.default_rng(0)
    params = {"big": rng.standard_normal(8_000_000).astype(np.float32)}
    state = adam_init(params)
    step = 0
    print("ready", flush=True)
    while True:
        step += 1
        params["big"][0] = step
        checkpoint.save(sys.argv[1], params, state, step, rng, cfg)
""")


def test_kill_9_during_checkpoint_write_leaves_a_readable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.npz"
    rng = np.random.default_rng(0)
    for delay in (0.3, 0.45, 0.6, 0.75):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay + rng.uniform(0, 0.1))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():   # the very first write may not have finished
            ck = checkpoint.load(path)
            assert ck["params"]["big"][0] == ck["step"]
    assert path.exists()
    assert not [p for p in os.listdir(tmp_path) if p != "ckpt.npz" and not p.startswith(".ckpt.npz.tmp")]


def test_ctrl_c_writes_a_checkpoint_and_resume_finishes(feats, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal
        from omh_ref.core import fixtures, model
        from omh_ref.train.loop import TrainOptions, train
        import omh_ref.core.model as m
        real = m.loss_and_grads
        calls = [0]
        def slow(*a, **k):
            calls[0] += 1
            if calls[0] == 7:
                os.kill(os.getpid(), signal.SIGINT)   # as if the user pressed Ctrl-C mid-step
            return real(*a, **k)
        m.loss_and_grads = slow
        res = train(fixtures.small_config(in_dim={C}), TrainOptions(features={feats!r}, out={str(tmp_path / 'r')!r},
                    steps=100, batch_size=4, ckpt_every=1000, progress=False))
        print("RESULT", res["step"], res["interrupted"])
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RESULT 7 True" in out.stdout and "Traceback" not in out.stderr
    assert checkpoint.load(tmp_path / "r" / "ckpt.npz")["step"] == 7
    res = train(small_cfg(), opts(feats, tmp_path / "r", steps=12, resume=str(tmp_path / "r" / "ckpt.npz")), say=quiet)
    assert res["step"] == 12 and not res["interrupted"]


def run_cli(*args):
    res = CliRunner().invoke(main, list(args))
    return res.exit_code, res.output


@pytest.mark.parametrize("make,match", [
    (lambda p: None, "no such file"),
    (lambda p: np.save(p, np.zeros((3, 4, 5), np.float32)), r"shape \(N, h, w, C\)"),
    (lambda p: np.save(p, np.zeros((3, 4, 5, 6), np.int32)), "float16 or float32"),
    (lambda p: p.write_bytes(b"not an npy file"), "not a readable .npy"),
])
def test_bad_feature_files_are_one_line_errors(tmp_path, make, match):
    p = tmp_path / "feats.npy"
    make(p)
    code, out = run_cli("train", "--features", str(p), "--out", str(tmp_path / "o"), "--quiet", "--steps", "2")
    assert code == 2 and "Traceback" not in out
    assert out.startswith("error: ") and str(p) in out and len(out.strip().splitlines()) == 1
    import re
    assert re.search(match, out), out


def test_nan_rows_are_named(tmp_path):
    p = write_feats(tmp_path / "feats.npy", dtype=np.float32)
    f = np.load(p, mmap_mode="r+")
    f[5, 1, 1, 2] = np.nan
    f.flush()
    del f
    code, out = run_cli("train", "--features", p, "--out", str(tmp_path / "o"), "--quiet", "--steps", "50",
                        "--batch-size", "4", "--dim", "5", "--levels", "6,3", "--feature-samples", "3")
    assert code == 2 and "row 5" in out and "NaN" in out and "Traceback" not in out


def test_train_with_a_given_knn_table(tmp_path):
    """``--knn PATH`` (it crashed on unpacking before any step, and no test reached it)."""
    a = write_feats(tmp_path / "feats.npy")
    assert run_cli("knn", "--features", a, "--k", "3")[0] == 0
    table = tmp_path / "mine.knn.npy"
    os.replace(tmp_path / "feats.knn.npy", table)
    os.replace(tmp_path / "feats.knn.npy.json", str(table) + ".json")
    code, out = run_cli("train", "--features", a, "--knn", str(table), "--out", str(tmp_path / "o"), "--quiet",
                        "--steps", "3", "--batch-size", "4", "--dim", "5", "--levels", "6,3", "--feature-samples", "3")
    assert code == 0, out
    assert checkpoint.load(tmp_path / "o" / "ckpt.npz")["info"]["knn"] == str(table.resolve())
    assert not (tmp_path / "feats.knn.npy").exists()     # the given table was used, none was built


def _certified_feats(tmp_path):
    """Features whose KNN table certifies them finite (built more than a clock tick after their
    last write, as a real extraction's table is)."""
    from omh_ref.features.knn import CLOCK_TICK_S, build_knn, certifies_finite, default_path
    from omh_ref.features.store import FeatureStore

    p = write_feats(tmp_path / "feats.npy", dtype=np.float32)
    time.sleep(2 * CLOCK_TICK_S)
    store = FeatureStore(p)
    build_knn(store, default_path(store), k=7)
    assert certifies_finite(default_path(store), store)
    return p, store


def test_nan_written_after_the_knn_build_is_named(tmp_path):
    """The table's finite certificate is void once a row changes: the per-batch scan is back and
    names the row (it was keyed to the header and the first and last rows, so training ran into
    a 'divergence' with lower-lr advice)."""
    from omh_ref.features.knn import certifies_finite, default_path

    p, store = _certified_feats(tmp_path)
    f = np.load(p, mmap_mode="r+")
    f[5, 1, 1, 2] = np.nan
    f.flush()
    del f
    assert not certifies_finite(default_path(store), store)
    code, out = run_cli("train", "--features", p, "--out", str(tmp_path / "o"), "--quiet", "--steps", "50",
                        "--batch-size", "4", "--dim", "5", "--levels", "6,3", "--feature-samples", "3")
    assert code == 2 and "row 5" in out and "NaN" in out and "Traceback" not in out, out
    assert "lower --lr" not in out


def test_a_divergence_on_non_finite_input_says_check_the_features(tmp_path, monkeypatch):
    """Were the scan skipped on a file that holds NaN (a certificate fooled), the divergence
    names the row and the features, not the learning rate."""
    from omh_ref.train import loop

    p, _ = _certified_feats(tmp_path)
    f = np.load(p, mmap_mode="r+")
    f[1:-1, 1, 1, 2] = np.nan              # every row but the fingerprinted first and last: step 1 meets it
    f.flush()
    del f
    monkeypatch.setattr(loop, "certifies_finite", lambda path, store: True)
    with pytest.raises(InputError) as e:
        train(small_cfg(), TrainOptions(features=p, out=str(tmp_path / "o"), steps=5, batch_size=4, progress=False,
                                        log_every=5), say=lambda *a: None)
    msg = str(e.value)
    assert "diverged at step 1" in msg and "contains NaN" in msg and "check the features" in msg, msg
    assert "lower --lr" not in msg and (tmp_path / "o" / "diverged.npz").is_file()


def test_knn_from_another_feature_file_is_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_feats(tmp_path / "a" / "feats.npy")
    b = write_feats(tmp_path / "b" / "feats.npy", seed=3)
    assert run_cli("knn", "--features", a)[0] == 0
    code, out = run_cli("train", "--features", b, "--knn", str(tmp_path / "a" / "feats.knn.npy"), "--quiet",
                        "--out", str(tmp_path / "o"))
    assert code == 2 and "another feature file" in out


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--batch-size", "-1"), ("--rows-per-task", "0")])
def test_knn_sizes_must_be_positive(tmp_path, flag, value):
    a = write_feats(tmp_path / "feats.npy")
    code, out = run_cli("knn", "--features", a, flag, value)
    assert code == 2 and f"{flag}: expected a positive integer, got {value}" in out and "Traceback" not in out
    assert not (tmp_path / "feats.knn.npy").exists()


def test_cli_resume_with_changed_flag_is_refused_and_keeps_the_checkpoint(feats, tmp_path):
    common = ["--features", feats, "--out", str(tmp_path / "o"), "--quiet", "--batch-size", "4",
              "--dim", "5", "--levels", "6,3", "--feature-samples", "3"]
    assert run_cli("train", *common, "--steps", "3")[0] == 0
    ck = tmp_path / "o" / "ckpt.npz"
    before = ck.read_bytes()
    code, out = run_cli("train", *common, "--steps", "6", "--resume", str(ck), "--tau", "0.3")
    assert code == 2 and "another config" in out and ck.read_bytes() == before
    assert run_cli("train", "--features", feats, "--out", str(tmp_path / "o"), "--quiet", "--batch-size", "4",
                   "--steps", "6", "--resume", str(ck))[0] == 0
    assert checkpoint.load(ck)["step"] == 6


def test_config_file_and_flags(tmp_path, feats):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": {"dim": 5, "levels": [6, 3], "feature_samples": 3, "tau": 0.2}}))
    code, out = run_cli("train", "--features", feats, "--out", str(tmp_path / "o"), "--quiet", "--steps", "2",
                        "--batch-size", "4", "--config", str(cfg_file), "--tau", "0.3")
    assert code == 0, out
    cfg = checkpoint.load(tmp_path / "o" / "ckpt.npz")["config"]
    assert cfg.dim == 5 and cfg.levels == (6, 3) and cfg.tau == 0.3
    cfg_file.write_text(json.dumps({"dimm": 5}))
    code, out = run_cli("train", "--features", feats, "--out", str(tmp_path / "o2"), "--quiet", "--config", str(cfg_file))
    assert code == 2 and "dimm" in out


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", r"expected a table of config fields at the top level, got list"),
    ('{"train": 5}', r"\[train\] must be a table of fields, got int"),
    ('{"model": {"dim": 5}, "tau": 0.3}', r"top-level keys are not read; move 'tau' into one of them"),
    ('{"levels": 6}', r"config field 'levels': expected a list of integers, got 6"),
    ('{"dropout": "0.1"}', r"config field 'dropout': expected a number, got '0.1'"),
    ('{"eval_level": 0.5}', r"config field 'eval_level': expected an integer, got 0.5"),
    ('{"pointwise": "no"}', r"config field 'pointwise': expected true or false, got 'no'"),
    ('{"in_dim": 384}', r"c.json: in_dim 384 but .*feats.npy has C=11 channels"),
])
def test_config_files_of_the_wrong_shape_are_one_line_errors(tmp_path, feats, content, match):
    (tmp_path / "c.json").write_text(content)
    code, out = run_cli("train", "--features", feats, "--out", str(tmp_path / "o"), "--quiet", "--config",
                        str(tmp_path / "c.json"))
    assert code == 2 and "Traceback" not in out and __import__("re").search(match, out), out


def test_config_file_on_resume_is_compared_with_the_checkpoint(tmp_path, feats):
    common = ["--features", feats, "--out", str(tmp_path / "o"), "--quiet", "--batch-size", "4"]
    (tmp_path / "c.json").write_text(json.dumps({"model": {"dim": 5, "levels": [6, 3], "feature_samples": 3}}))
    assert run_cli("train", *common, "--steps", "2", "--config", str(tmp_path / "c.json"))[0] == 0
    ck = tmp_path / "o" / "ckpt.npz"
    assert run_cli("train", *common, "--steps", "3", "--resume", str(ck), "--config", str(tmp_path / "c.json"))[0] == 0
    (tmp_path / "c.json").write_text(json.dumps({"model": {"dim": 9, "levels": [6, 3], "feature_samples": 3}}))
    code, out = run_cli("train", *common, "--steps", "4", "--resume", str(ck), "--config", str(tmp_path / "c.json"))
    assert code == 2 and "another config (differs in dim)" in out
    assert checkpoint.load(ck)["step"] == 3


def test_shifts_auto_are_chosen_and_logged(tmp_path, feats):
    code, out = run_cli("train", "--features", feats, "--out", str(tmp_path / "o"), "--quiet", "--steps", "2",
                        "--batch-size", "4", "--dim", "5", "--levels", "6,3", "--feature-samples", "3",
                        "--shifts", "auto")
    assert code == 0 and "shifts auto:" in out
    cfg = checkpoint.load(tmp_path / "o" / "ckpt.npz")["config"]
    # the run's shifts are auto_shifts' values on its features, drawn from the child generator
    # [seed, 1], and the ones printed
    from omh_ref.features.knn import default_path, load_knn
    from omh_ref.features.store import FeatureStore
    from omh_ref.train.loop import auto_shifts

    store = FeatureStore(feats)
    knn = load_knn(default_path(store), store, min_k=7)[:, :8]
    want = auto_shifts(store, knn, cfg, np.random.default_rng([0, 1]))
    assert {k: getattr(cfg, k) for k in want} == want
    assert ", ".join(f"{k}={v:.4f}" for k, v in want.items()) in out


def _constant_images(path, vectors, h=3, w=4):
    """A feature file whose image n has every patch equal to vectors[n]."""
    f = open_memmap(path, mode="w+", dtype=np.float32, shape=(len(vectors), h, w, vectors.shape[1]))
    f[:] = vectors[:, None, None, :]
    f.flush()
    del f
    return str(path)


def test_auto_shifts_are_each_pair_types_mean_correlation(tmp_path):
    """Images that are one vector each, so every pair type's correlation is known exactly: intra
    (an image with itself) 1; orthonormal images: inter and neg 0; twins (2j, 2j+1 share a vector,
    each the other's first KNN partner): inter 1."""
    from omh_ref.features.knn import build_knn, load_knn
    from omh_ref.features.store import FeatureStore
    from omh_ref.train.loop import auto_shifts

    cfg = fixtures.small_config(in_dim=8)
    for name, vectors, inter in (("orthonormal", 3 * np.eye(8), 0.0),
                                 ("twins", np.repeat(2 * np.eye(8)[:4], 2, axis=0), 1.0)):
        store = FeatureStore(_constant_images(tmp_path / f"{name}.npy", vectors.astype(np.float32)))
        build_knn(store, tmp_path / f"{name}_knn.npy", k=1)
        knn = load_knn(tmp_path / f"{name}_knn.npy", store, min_k=1)
        got = auto_shifts(store, knn, cfg, np.random.default_rng(0))
        assert got["shift_intra"] == pytest.approx(1.0, abs=1e-6), name
        assert got["shift_inter"] == pytest.approx(inter, abs=1e-6), name
        if name == "orthonormal":
            assert got["shift_neg"] == pytest.approx(0.0, abs=1e-6)


def test_train_without_features_uses_the_embedded_demo_data(tmp_path):
    code, out = run_cli("train", "--out", str(tmp_path / "o"), "--quiet", "--steps", "2", "--levels", "36,18,9")
    assert code == 0, out
    assert "embedded demo data" in out and (tmp_path / "o" / "data" / "train" / "feats.npy").is_file()
    assert checkpoint.load(tmp_path / "o" / "ckpt.npz")["config"].in_dim == 384


def test_config_file_train_table_and_toml(tmp_path, feats):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('[model]\ndim = 5\nlevels = [6, 3]\nfeature_samples = 3\n\n'
                        '[train]\nsteps = 4\nbatch_size = 4\nlog_every = 2\n')
    code, out = run_cli("train", "--features", feats, "--out", str(tmp_path / "o"), "--quiet",
                        "--config", str(cfg_file), "--log-every", "1")
    assert code == 0, out
    assert checkpoint.load(tmp_path / "o" / "ckpt.npz")["step"] == 4          # from the file
    assert len((tmp_path / "o" / "log.jsonl").read_text().splitlines()) == 4   # the flag won
    cfg_file.write_text('[train]\nstepz = 4\n')
    code, out = run_cli("train", "--features", feats, "--out", str(tmp_path / "o2"), "--quiet", "--config", str(cfg_file))
    assert code == 2 and "stepz" in out


def test_a_new_run_never_overwrites_a_checkpoint_silently(feats, tmp_path):
    train(small_cfg(), opts(feats, tmp_path / "r", steps=3), say=quiet)
    before = (tmp_path / "r" / "ckpt.npz").read_bytes()
    with pytest.raises(InputError, match="--resume.*--overwrite"):
        train(small_cfg(), opts(feats, tmp_path / "r", steps=5), say=quiet)
    assert (tmp_path / "r" / "ckpt.npz").read_bytes() == before
    assert train(small_cfg(), opts(feats, tmp_path / "r", steps=5, overwrite=True), say=quiet)["step"] == 5


def test_resume_with_other_loop_options_says_so_and_keeps_the_seed(feats, tmp_path):
    cfg = small_cfg()
    train(cfg, opts(feats, tmp_path / "r", steps=5, seed=3), say=quiet)
    said = []
    train(cfg, opts(feats, tmp_path / "r", steps=8, lr=1e-4, resume=str(tmp_path / "r" / "ckpt.npz")),
          say=said.append)
    assert any(m.startswith("note: --lr 0.0005 -> 0.0001 since the checkpoint") for m in said), said
    assert checkpoint.load(tmp_path / "r" / "ckpt.npz")["info"]["options"]["seed"] == 3
    said.clear()
    train(cfg, opts(feats, tmp_path / "r", steps=9, lr=1e-4, resume=str(tmp_path / "r" / "ckpt.npz")),
          say=said.append)
    assert not any(m.startswith("note:") for m in said)


def test_prefetching_does_not_change_the_run(feats, tmp_path, monkeypatch):
    """Reading the next batch in a background thread is an overlap, not another computation:
    the same parameters, bit for bit, with and without it (both asked for explicitly: on a CPU
    the default is off, and the two runs compared were both off)."""
    import threading

    from omh_ref.features.store import FeatureStore

    readers = []
    real_read = FeatureStore.read

    def read(self, *a, **k):
        readers.append(threading.current_thread().name)
        return real_read(self, *a, **k)

    monkeypatch.setattr(FeatureStore, "read", read)
    cfg = small_cfg()
    train(cfg, opts(feats, tmp_path / "b", steps=7), say=quiet)     # builds the KNN table first
    readers.clear()
    train(cfg, dataclasses.replace(opts(feats, tmp_path / "a", steps=7), prefetch=True), say=quiet)
    assert readers and all(r.startswith("omh-ref-batches") for r in readers), readers   # read ahead
    readers.clear()
    train(cfg, dataclasses.replace(opts(feats, tmp_path / "b", steps=7), prefetch=False, overwrite=True), say=quiet)
    assert readers and not any(r.startswith("omh-ref-batches") for r in readers), readers
    a, b = (checkpoint.load(tmp_path / r / "ckpt.npz") for r in ("a", "b"))
    assert all(np.array_equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert a["rng"].bit_generator.state == b["rng"].bit_generator.state


def test_resume_alone_continues_the_run_where_it_stands(feats, tmp_path, monkeypatch):
    """The printed hint ``--resume CKPT`` taken literally: the checkpoint brings its feature file,
    its folder, its settings and its target step (no demo data is generated, a --steps 2 run stays
    at 2, not the default 300); a --steps that differs is allowed and said, and the split run equals
    a straight one bit for bit."""
    monkeypatch.chdir(tmp_path)     # where a --features-less run would put the demo data
    common = ["--quiet", "--batch-size", "4", "--dim", "5", "--levels", "6,3", "--feature-samples", "3",
              "--ckpt-every", "2"]
    assert run_cli("train", "--features", feats, "--out", str(tmp_path / "straight"), "--steps", "4", *common)[0] == 0
    assert run_cli("train", "--features", feats, "--out", str(tmp_path / "split"), "--steps", "2", *common)[0] == 0
    ck = tmp_path / "split" / "ckpt.npz"
    code, out = run_cli("train", "--resume", str(ck))
    assert code == 0 and f"resuming on the checkpoint's feature file {feats}" in out, out
    assert checkpoint.load(ck)["step"] == 2 and not (tmp_path / "runs").exists() and not (tmp_path / "split" / "data").exists()
    code, out = run_cli("train", "--resume", str(ck), "--steps", "4")
    assert code == 0 and "note: --steps 4: the run was started with --steps 2; it now trains to step 4" in out, out
    a, b = checkpoint.load(tmp_path / "straight" / "ckpt.npz"), checkpoint.load(ck)
    assert a["step"] == b["step"] == 4
    assert all(np.array_equal(a["params"][k], b["params"][k]) for k in a["params"])
    write_feats(tmp_path / "other.npy", seed=1)
    code, out = run_cli("train", "--resume", str(ck), "--features", str(tmp_path / "other.npy"), "--steps", "5")
    assert code == 2 and f"trained on another feature file than {tmp_path / 'other.npy'} ({feats};" in out, out
    os.rename(feats, tmp_path / "moved.npy")
    code, out = run_cli("train", "--resume", str(ck), "--steps", "5")
    assert code == 2 and f"its feature file {feats} is not there (moved?); pass --features" in out, out
