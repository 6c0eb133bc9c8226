"""benchmarks/bench_extract.py: onnxruntime vs torch forward of the same DINO ViT, images/s.

A smoke run of the quick preset (random-init ViT-S/16, 64 px, batch 4, 2 repeats, one thread)
checks the result's structure and that the ORT-vs-torch agreement check ran before timing; a
second test checks that disagreeing outputs refuse to be timed.
"""
import math

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")  # torch.onnx.export (TorchScript exporter) needs it

from benchmarks import bench_extract as be  # noqa: E402


def test_quick_run_structure(capsys):
    res = be.main(["--quick", "--threads", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert (res["arch"], res["patch"], res["resolution"], res["batch"], res["repeats"]) == ("vit_small", 16, 64, 4, 2)
    assert res["warmup"] >= 1
    assert res["versions"]["torch"] and res["versions"]["onnxruntime"] and res["versions"]["numpy"]
    assert len(res["cases"]) == 1
    c = res["cases"][0]
    assert c["threads"] == 1
    # The agreement check ran and passed before timing.
    assert "max_abs_diff" in c and 0.0 <= c["max_abs_diff"] <= 1e-4
    for k in ("ort", "torch"):
        assert len(c[k]["times_s"]) == 2 and all(t > 0 for t in c[k]["times_s"])
        assert c[k]["median_s"] > 0 and c[k]["images_per_s"] > 0
        assert math.isclose(c[k]["images_per_s"], 4 / c[k]["median_s"])
    assert c["ratio"] > 0
    assert math.isclose(c["ratio"], c["ort"]["images_per_s"] / c["torch"]["images_per_s"])
    # One human line per case, then the JSON line last.
    assert len(out) == 2 and "1 thread(s)" in out[0] and out[-1].startswith("{")


def test_disagreement_refuses_to_time():
    want = np.zeros((2, 4, 4, 8), np.float32)
    assert be.check_agreement(want + 5e-5, want) == pytest.approx(5e-5, rel=1e-3)
    with pytest.raises(SystemExit, match="refusing to time"):
        be.check_agreement(want + 1e-3, want)
    with pytest.raises(SystemExit, match="refusing to time"):
        be.check_agreement(want[:1], want)
    with pytest.raises(SystemExit, match="refusing to time"):
        be.check_agreement(np.full_like(want, np.nan), want)
