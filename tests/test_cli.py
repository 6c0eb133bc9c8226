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


def test_train_reads_stegos_train_config_and_a_stego_flag_beats_it(tmp_path):
    """--config train_config.yml trains with STEGO's loss weights, shifts, dim and lr, each renamed
    key noted and the rest named as not read; --max-steps (STEGO's --steps) given on the command
    line wins over the file's max_steps, as --steps would."""
    import pytest

    pytest.importorskip("yaml")
    from omh_ref.train import checkpoint

    run = CliRunner().invoke
    res = run(main, ["synth", "--out", str(tmp_path / "train"), "--n-images", "12", "--grid", "6", "--dim", "8"])
    assert res.exit_code == 0, res.output
    from tests.stego_files import TRAIN_CONFIG

    (tmp_path / "train_config.yml").write_text(TRAIN_CONFIG)
    res = run(main, ["train", "--features", str(tmp_path / "train" / "feats.npy"), "--out", str(tmp_path / "r"),
                     "--config", str(tmp_path / "train_config.yml"), "--max-steps", "2", "--batch-size", "4",
                     "--levels", "12,9", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "note: --max-steps is STEGO's name for omh-ref's --steps" in res.output
    assert f"note: {tmp_path / 'train_config.yml'}: neg_inter_shift is STEGO's name for omh-ref's shift_neg" in res.output
    assert __import__("re").search(r"STEGO keys not read .*: output_root, .*model_type, .*hydra\n", res.output)
    ck = checkpoint.load(tmp_path / "r" / "ckpt.npz")
    cfg = ck["config"]
    assert ck["step"] == 2 and (cfg.dim, cfg.weight_neg, cfg.weight_inter, cfg.shift_neg, cfg.shift_intra) == (
        70, 0.63, 0.25, 0.46, 0.18)


def test_stego_flag_spellings_are_aliases_with_a_note_and_the_right_suggestion(capsys):
    train = main.commands["train"]
    ctx = train.make_context("train", ["--neg-inter-shift", "0.6", "--pos-intra-weight", "0.2", "--val-freq", "7"])
    assert (ctx.params["shift_neg"], ctx.params["weight_intra"], ctx.params["val_every"]) == (0.6, 0.2, 7)
    assert "note: --neg-inter-shift is STEGO's name for omh-ref's --shift-neg" in capsys.readouterr().err
    assert main.commands["seeds"].make_context("seeds", ["--features", "f", "--val-features", "v", "--out", "o",
                                                         "--num-neighbors", "3"]).params["knn_k"] == 3
    for args, want in ((["--shift-neg", "1", "--neg-inter-shift", "0.6"],
                        "Error: --neg-inter-shift is STEGO's name for --shift-neg: give one of them"),
                       (["--neg-inter-shif", "0.6"], "Error: No such option '--neg-inter-shif'. (Did you mean one of: "
                                                     "'--neg-inter-shift',"),
                       (["--neg-inter-shift", "x"], "Error: Invalid value for '--neg-inter-shift' (STEGO's --shift-neg)")):
        res = CliRunner().invoke(main, ["train", *args])
        assert res.exit_code == 2 and res.output.strip().splitlines()[-1].startswith(want), (args, res.output)


def test_every_option_of_every_command_shows_its_default_in_its_help():
    """Each option that takes a value and has a default shows it; each config-field flag (None
    until given) shows the field's default as a command line spells it."""
    import click

    from omh_ref.core.config import flag_specs

    specs = {s.name: s for s in flag_specs()}
    for name in ("train", "seeds", "eval", "segment", "extract", "recipe", "demo"):
        cmd = main.commands[name]
        ctx = click.Context(cmd, info_name=name)
        for p in cmd.params:
            if not isinstance(p, click.Option) or p.hidden or (p.is_flag and not p.secondary_opts):
                continue
            text = p.get_help_record(ctx)[1]
            if p.name in specs and name in ("train", "seeds"):     # the commands with a flag per config field
                assert f"[default: {specs[p.name].shown_default}]" in text, (name, p.opts, text)
            elif p.default not in (None, click.core.UNSET):
                assert "[default: " in text, (name, p.opts, text)
    assert specs["levels"].shown_default == "108,54,27" and specs["omh"].shown_default == "omh"
