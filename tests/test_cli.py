"""The command line: ``omh-ref gradcheck`` prints its table and exits by the result."""
from click.testing import CliRunner

from omh_ref_cli.main import main


def test_gradcheck_passes_and_covers_every_piece():
    res = CliRunner().invoke(main, ["gradcheck", "--seed", "1"])
    assert res.exit_code == 0, res.output
    for piece in ["linear", "relu", "dropout", "normalize", "cosine", "softmax", "log_softmax", "kl",
                  "grid_sample", "resize", "sinkhorn unrolled", "sinkhorn implicit", "correlation",
                  "cluster relaxed", "cluster balanced", "cluster hard", "hierarchy uniform",
                  "hierarchy usage", "model omh", "model stego"]:
        assert piece in res.output, piece
    assert " 0 failed" in res.output


def test_gradcheck_only_filter_and_unknown_filter():
    res = CliRunner().invoke(main, ["gradcheck", "--only", "grid_sample"])
    assert res.exit_code == 0 and "linear" not in res.output and "grid_sample" in res.output
    res = CliRunner().invoke(main, ["gradcheck", "--only", "nothing-like-this"])
    assert res.exit_code == 2 and "matches no check" in res.output


def test_gradcheck_fails_loudly_on_a_broken_backward(monkeypatch):
    from omh_ref.core.ops import relu

    monkeypatch.setattr(relu, "backward", lambda dy, cache: dy * (cache > 0) * 1.01)
    res = CliRunner().invoke(main, ["gradcheck", "--only", "relu"])
    assert res.exit_code == 1 and "FAIL" in res.output


def _synth_run(tmp_path):
    """Tiny synthetic train/val data and a 3-step checkpoint whose eval level has 9 clusters."""
    run = CliRunner().invoke
    for split, n in (("train", 12), ("val", 8)):
        res = run(main, ["synth", "--out", str(tmp_path / split), "--split", split, "--n-images", str(n),
                         "--grid", "6", "--dim", "8"])
        assert res.exit_code == 0, res.output
    res = run(main, ["train", "--features", str(tmp_path / "train" / "feats.npy"), "--out", str(tmp_path / "r"),
                     "--steps", "3", "--batch-size", "4", "--levels", "12,9", "--dim", "5", "--quiet"])
    assert res.exit_code == 0, res.output
    return ["eval", "--checkpoint", str(tmp_path / "r" / "ckpt.npz"), "--features", str(tmp_path / "val" / "feats.npy"),
            "--quiet"]


def test_eval_bad_arguments_are_one_line_and_checked_before_evaluating(tmp_path, monkeypatch):
    import numpy as np

    from omh_ref.jobs import evaluate as job

    base = _synth_run(tmp_path)
    (tmp_path / "afile").write_text("")
    np.save(tmp_path / "empty.npy", np.zeros((8, 0, 48), np.uint8))
    np.save(tmp_path / "odd.npy", np.zeros((8, 7, 5), np.uint8))
    calls = []
    real = job.cluster_eval
    monkeypatch.setattr(job, "cluster_eval", lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = [
        (["--batch-size", "0"], r"Invalid value for '--batch-size': 0 is not in the range x>=1"),
        (["--n-classes", "-2"], r"Invalid value for '--n-classes'"),
        (["--probe-epochs", "0"], r"Invalid value for '--probe-epochs'"),
        (["--seed", "-1"], r"Invalid value for '--seed'"),
        (["--out", str(tmp_path / "afile")], r"afile: is a file \(expected --out to be a folder"),
        (["--json", str(tmp_path / "afile" / "s.json")], r"s.json: cannot write the --json file there"),
        (["--n-classes", "2"], r"val/feats.json class_names: 9 names for 2 classes .*pass --class-names"),
        (["--labels", str(tmp_path / "empty.npy")], r"empty.npy: empty label maps \(shape \(8, 0, 48\)\)"),
        (["--labels", str(tmp_path / "odd.npy")], r"odd.npy: label maps of 7x5 px do not have the shape of .*6x6"),
    ]
    for args, msg in cases:
        res = CliRunner().invoke(main, base + args)
        assert res.exit_code == 2 and "Traceback" not in res.output, (args, res.output)
        assert __import__("re").search(msg, res.output.strip().splitlines()[-1]), (args, res.output)
    assert calls == []                     # every one refused before any evaluation ran
    res = CliRunner().invoke(main, base + ["--json", str(tmp_path / "new" / "dir" / "s.json")])
    assert res.exit_code == 0 and (tmp_path / "new" / "dir" / "s.json").is_file(), res.output


def test_os_errors_are_one_line(tmp_path, monkeypatch):
    """friendly_errors turns an OSError (a full disk, a permission) into one line naming the file,
    exit 2, and the failed write leaves nothing behind: no temporary file, no lock. The disk fills
    once as eval takes the folder's lock (the line names the folder), once as it writes the --json
    file after taking it (the line names that file)."""
    import os

    from omh_ref.core.lock import LOCK_NAME

    base = _synth_run(tmp_path)
    before = set(os.listdir(tmp_path))
    real_fsync = os.fsync

    def full_for(which):
        def fsync(fd):
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                name = ""
            if which(name):
                raise OSError(28, "No space left on device")
            return real_fsync(fd)
        return fsync

    monkeypatch.setattr(os, "fsync", full_for(lambda name: True))
    res = CliRunner().invoke(main, base + ["--json", str(tmp_path / "s.json")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == (f"error: {tmp_path}: cannot write there (No space left on "
                                                   "device); expected a writable output folder")
    assert set(os.listdir(tmp_path)) == before

    monkeypatch.setattr(os, "fsync", full_for(lambda name: name != LOCK_NAME))
    res = CliRunner().invoke(main, base + ["--json", str(tmp_path / "s.json")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().splitlines()[-1] == f"error: [Errno 28] No space left on device: '{tmp_path / 's.json'}'"
    assert set(os.listdir(tmp_path)) == before


def test_checkpoint_with_missing_or_misshapen_parameters_is_named(tmp_path):
    import numpy as np

    from omh_ref.train import checkpoint

    base = _synth_run(tmp_path)
    ck = checkpoint.load(tmp_path / "r" / "ckpt.npz")
    params = dict(ck["params"])
    params["M1"] = params["M1"][:4]
    checkpoint.save(tmp_path / "bad.npz", params, ck["opt_state"], ck["step"], ck["rng"], ck["config"])
    del params["W2"]
    params["M1"] = ck["params"]["M1"]
    checkpoint.save(tmp_path / "bad2.npz", params, ck["opt_state"], ck["step"], ck["rng"], ck["config"])
    for name, msg in (("bad.npz", r"parameter M1 should have shape \(9, 5\) for its config, got \(4, 5\)"),
                      ("bad2.npz", r"parameter W2 should have shape \(8, 8\) for its config, got nothing")):
        base[2] = str(tmp_path / name)
        res = CliRunner().invoke(main, base)
        assert res.exit_code == 2 and __import__("re").search(msg, res.output), res.output
    assert np.asarray(ck["params"]["M1"]).shape == (9, 5)
