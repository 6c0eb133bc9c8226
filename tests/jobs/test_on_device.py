"""Every command's ``--device gpu`` path, end to end on the strict CuPy stand-in
(omh_ref.core.strict_device): the same numbers as the NumPy run (the arithmetic is NumPy's, so
identical), and the host conversions of the per-step and per-batch paths bounded."""
import collections
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from omh_ref.core import backend
from omh_ref.core import strict_device as sd
from omh_ref_cli.main import main


def run(args, device):
    """``omh-ref ARGS --device DEVICE`` in-process (the stand-in as the GPU for ``gpu``) ->
    (output, the host conversions it made, as a Counter of (what, file:line))."""
    with backend.strict_device() if device == "gpu" else _nothing():
        sd.reset_conversions()
        res = CliRunner().invoke(main, [str(a) for a in args] + ["--device", device])
        conv = collections.Counter(sd.conversions())
    assert res.exit_code == 0, (device, res.output, res.exception)
    return res.output, conv


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def sites(conv, path_part):
    """How many conversions were made in files whose path contains ``path_part``."""
    return sum(n for (_, site), n in conv.items() if path_part in site)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The tiny demo (train three methods, evaluate, probe, k-means on the STEGO code) on each device."""
    d = tmp_path_factory.mktemp("demo")
    out = {}
    for device in ("cpu", "gpu"):
        args = ["demo", "--out", d / device, "--n-train", 24, "--n-val", 8, "--steps", 6, "--seeds", 0,
                "--probe-epochs", 2, "--batch-size", 4, "--quiet"]
        out[device] = (d / device, *run(args, device))
    return out


def test_the_demo_on_the_device_gives_the_numpy_report(demo_runs):
    (cpu, _, _), (gpu, _, conv) = demo_runs["cpu"], demo_runs["gpu"]
    a, b = (json.loads((d / "report.json").read_text()) for d in (cpu, gpu))
    assert a["methods"] == b["methods"] and a["levels"] == b["levels"]
    assert sites(conv, "/train/loop.py") <= 3 * 6    # at most one read per logged step (every step here)


def test_train_and_resume_on_the_device_are_the_numpy_run(tmp_path, demo_runs):
    feats = demo_runs["cpu"][0] / "data" / "train" / "feats.npy"
    logs = {}
    for device in ("cpu", "gpu"):
        out = tmp_path / device
        common = ["--features", feats, "--out", out, "--batch-size", 4, "--levels", "8,4", "--log-every", 4, "--quiet"]
        _, first = run(["train", *common, "--steps", 8, "--ckpt-every", 8], device)
        _, conv = run(["train", "--resume", out / "ckpt.npz", "--steps", 12, "--quiet"], device)
        logs[device] = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
        if device == "gpu":
            # one read per logged step (2 of steps 1-8), the rest are the checkpoint's arrays
            assert sites(first, "/train/loop.py") == 2, first
            assert all("checkpoint.py" in site or "loop.py" in site for (_, site) in first), first
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in logs["cpu"]]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in logs["gpu"]]
    assert [r["step"] for r in logs["gpu"]] == [4, 8, 12]


def test_eval_on_the_device_writes_the_numpy_scores_masks_and_match(tmp_path, demo_runs):
    root = demo_runs["cpu"][0]
    ckpt, val = root / "runs" / "OMH-seed0" / "ckpt.npz", root / "data" / "val" / "feats.npy"
    for device in ("cpu", "gpu"):
        d = tmp_path / device
        _, conv = run(["eval", "--checkpoint", ckpt, "--features", val, "--json", d / "scores.json",
                       "--save-masks", d / "masks", "--save-match", d / "match.json", "--out", d / "pics",
                       "--probe-epochs", 2], device)
    a, b = (json.loads((tmp_path / dev / "scores.json").read_text()) for dev in ("cpu", "gpu"))
    a.pop("seconds", None), b.pop("seconds", None)
    assert a == b
    assert (tmp_path / "cpu" / "match.json").read_text() == (tmp_path / "gpu" / "match.json").read_text()
    masks = sorted((tmp_path / "cpu" / "masks").rglob("*.png"))
    assert masks
    for m in masks:
        twin = tmp_path / "gpu" / m.relative_to(tmp_path / "cpu")
        assert np.array_equal(np.asarray(Image.open(m)), np.asarray(Image.open(twin))), m
    n_batches = -(-8 // 16)
    # per evaluated batch: its predictions and its probe codes come back, nothing read per pixel or per class
    assert sites(conv, "/evaluate/predict.py") <= 4 * n_batches, conv
    assert sites(conv, "/evaluate/probe.py") <= 2 * 2 * n_batches + 2, conv


def test_seeds_on_the_device_gives_the_numpy_table(tmp_path, demo_runs):
    root = demo_runs["cpu"][0] / "data"
    for device in ("cpu", "gpu"):
        run(["seeds", "--features", root / "train" / "feats.npy", "--val-features", root / "val" / "feats.npy",
             "--out", tmp_path / device, "--seeds", "0,1", "--steps", 4, "--batch-size", 4, "--levels", "18,9",
             "--probe-epochs", 1, "--quiet"], device)
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cpu", "gpu"))
    assert a["summary"] == b["summary"] and a["config"] == b["config"]
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in x["runs"]] for x in (a, b)]
    assert timeless[0] == timeless[1] and len(timeless[0]) == 2


def test_gradcheck_on_the_device_passes():
    out, _ = run(["gradcheck"], "gpu")
    assert "0 failed" in out and "gpu" in out.splitlines()[-1]


def test_segment_on_the_device_writes_the_numpy_masks(tmp_path):
    from tests.builders import colour_ckpt, pooled_onnx, write_worlds

    model, ckpt = pooled_onnx(tmp_path / "dyn.onnx"), colour_ckpt(tmp_path / "colour.npz")
    write_worlds(tmp_path / "imgs")
    for device in ("cpu", "gpu"):
        run(["segment", "--model", model, "--checkpoint", ckpt, "--images", tmp_path / "imgs", "--out",
             tmp_path / device, "--resolution", 64, "--levels", "all", "--overlay", "--quiet"], device)
    pngs = sorted(Path(tmp_path / "cpu").glob("*.png"))
    assert any(p.name.endswith(".clusters.png") for p in pngs)
    for p in pngs:
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(tmp_path / "gpu" / p.name))), p
