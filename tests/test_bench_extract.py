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


def test_one_row_per_family(capsys):
    """--families: DINO ViT-S/16, DINOv2 ViT-S/14 and DINOv3 ViT-S/16, each at the multiple of its
    patch nearest 64 px, each checked against torch before it is timed."""
    res = be.main(["--quick", "--families", "--threads", "1", "--repeats", "1", "--pipeline", "0"])
    out = capsys.readouterr().out.strip().splitlines()
    rows = [(r["family"], r["arch"], r["patch"], r["registers"], r["resolution"]) for r in res["rows"]]
    assert rows == [("dino", "vit_small", 16, 0, 64), ("dinov2", "vit_small", 14, 0, 70),
                    ("dinov3", "vit_small", 16, 4, 64)]
    for r in res["rows"]:
        (c,) = r["cases"]
        assert 0.0 <= c["max_abs_diff"] <= 1e-4 and c["ratio"] > 0
        assert math.isclose(c["ratio"], c["ort"]["images_per_s"] / c["torch"]["images_per_s"])
    assert res["cases"] == res["rows"][0]["cases"] and res["arch"] == "vit_small"
    assert len(out) == 4 and out[1].startswith("DINOv2 ViT-S/14 70 px") and out[-1].startswith("{")


def test_disagreement_refuses_to_time():
    want = np.zeros((2, 4, 4, 8), np.float32)
    assert be.check_agreement(want + 5e-5, want) == pytest.approx(5e-5, rel=1e-3)
    with pytest.raises(SystemExit, match="refusing to time"):
        be.check_agreement(want + 1e-3, want)
    with pytest.raises(SystemExit, match="refusing to time"):
        be.check_agreement(want[:1], want)
    with pytest.raises(SystemExit, match="refusing to time"):
        be.check_agreement(np.full_like(want, np.nan), want)
