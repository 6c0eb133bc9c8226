"""Validation during training (``train --val-features --val-every --keep-best``): the numbers a
run logs are the eval level's scores of its parameters at that step, the best state is kept,
curves.png is drawn, and bad validation input is refused before the first step."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.core.errors import InputError
from omh_ref.evaluate.predict import cluster_eval
from omh_ref.evaluate.validation import Validator
from omh_ref.features.store import FeatureStore
from omh_ref.train import checkpoint
from omh_ref_cli.main import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    for split, n in (("train", 16), ("val", 6)):
        res = CliRunner().invoke(main, ["synth", "--out", str(root / split), "--split", split, "--n-images", str(n),
                                        "--grid", "6", "--dim", "16"])
        assert res.exit_code == 0, res.output
    return root


def _train(data, out, *extra):
    return CliRunner().invoke(main, ["train", "--features", str(data / "train" / "feats.npy"), "--out", str(out),
                                     "--quiet", "--steps", "6", "--batch-size", "4", "--levels", "18,9", "--dim", "6",
                                     "--log-every", "4", "--ckpt-every", "2", *extra])


def test_validation_logs_the_scores_of_the_run_and_keeps_the_best(data, tmp_path):
    out = tmp_path / "run"
    res = _train(data, out, "--val-features", str(data / "val" / "feats.npy"), "--val-every", "2", "--keep-best")
    assert res.exit_code == 0, res.output
    recs = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    vals = {r["step"]: r["val_miou"] for r in recs if "val_miou" in r}
    assert sorted(vals) == [2, 4, 6] and sorted(r["step"] for r in recs) == [2, 4, 6]
    # the last validation is the final checkpoint's eval-level score on the validation split
    ck = checkpoint.load(out / "ckpt.npz")
    store = FeatureStore(data / "val" / "feats.npy", labels=data / "val" / "labels.npy")
    want, _ = cluster_eval(ck["params"], ck["config"], store, 9)
    assert vals[6] == pytest.approx(want["miou"], abs=1e-4)
    best_step = max(vals, key=lambda s: (vals[s], -s))
    best = checkpoint.load(out / "best.npz")
    assert best["step"] == best_step and best["info"]["best"] == {"step": best_step, "val_miou": vals[best_step]}
    assert ck["info"]["best"]["step"] == best_step
    assert (out / "curves.png").stat().st_size > 1000
    assert f"best validation mIoU {vals[best_step]:.2f} at step {best_step}" in res.output


def test_bad_validation_input_is_refused_before_training(data, tmp_path):
    np.save(tmp_path / "other.npy", np.zeros((3, 6, 6, 5), np.float32))
    cases = [(["--keep-best"], "--keep-best: needs a validation split"),
             (["--val-labels", str(data / "val" / "labels.npy")], "--val-labels: goes with --val-features"),
             (["--val-features", str(tmp_path / "other.npy")], "--val-labels: not given"),
             (["--val-features", str(tmp_path / "other.npy"), "--val-labels", str(data / "val" / "labels.npy")],
              "has 6 label maps but"),
             (["--val-every", "0", "--val-features", str(data / "val" / "feats.npy")],
              "--val-every: expected a positive integer")]
    for args, msg in cases:
        res = _train(data, tmp_path / "r", *args)
        assert res.exit_code == 2 and msg in res.output and "Traceback" not in res.output, (args, res.output)
        assert not (tmp_path / "r" / "ckpt.npz").exists()


def test_validator_checks_the_model(data):
    from omh_ref.core.config import Config

    v = Validator(data / "val" / "feats.npy")
    with pytest.raises(InputError, match="validation features have C=16 channels, the training features 8"):
        v.check(Config(in_dim=8))
    with pytest.raises(InputError, match="9 classes but the eval level has 4 clusters"):
        v.check(Config(in_dim=16, levels=(8, 4)))
