"""benchmarks/bench_segment.py: omh-ref segment against the bare backbone forward, images/s.

A smoke run of the quick preset (random-init ViT-S/16, 64 px, two 160x120 JPEGs, one repeat)
checks the result's structure and that the agreement check ran before timing; a second test
checks that backbone inputs that are not the bare peer's refuse to be timed.
"""
import math

import pytest
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from benchmarks import bench_segment as bs  # noqa: E402
from omh_ref.jobs import segmenter as sg  # noqa: E402

from tests.builders import colour_ckpt, colour_world, pooled_onnx  # noqa: E402


def test_quick_run_structure(capsys):
    res = bs.main(["--quick", "--images", "2", "--repeats", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert (res["arch"], res["patch"], res["resolution"], res["images"], res["batch"]) == ("vit_small", 16, 64, 2, 4)
    assert res["windows_per_image"] == 2.0          # 160x120 at 64 px: two 64 px windows
    assert res["agreement"]["windows_checked"] == 4
    for k in ("segment", "command", "bare", "crop"):
        assert len(res[k]["times_s"]) == 1 and res[k]["images_per_s"] > 0
        assert math.isclose(res[k]["images_per_s"], 2 / res[k]["median_s"])
    assert math.isclose(res["segment_vs_bare"], res["segment"]["images_per_s"] / res["bare"]["images_per_s"])
    assert res["versions"]["onnxruntime"] and res["goal"] == 0.8
    assert len(res["segment"]["forward_s"]) == 1 and 0 < res["forward_share"] < 1
    assert 0 < res["segment"]["forward_s"][0] < res["segment"]["times_s"][0]
    assert len(out) == 2 and "segment / bare" in out[0] and out[-1].startswith("{")


def test_other_backbone_inputs_refuse_to_time(tmp_path):
    seg = sg.Segmenter(pooled_onnx(tmp_path / "m.onnx", size=32), colour_ckpt(tmp_path / "c.npz"), batch_size=2)
    for i, (H, W) in enumerate(((40, 70), (50, 30), (32, 32))):
        Image.fromarray(colour_world(H, W)[0]).save(tmp_path / f"{i}.png")
    paths = sorted(tmp_path.glob("*.png"))
    batches = bs.window_batches(seg, paths)
    assert bs.check_agreement(seg, paths, batches)["batches_checked"] >= 1
    shifted = [b.copy() for b in batches]
    shifted[0][0, 0, 0, 0] += 1e-3
    with pytest.raises(SystemExit, match="refusing to time"):
        bs.check_agreement(seg, paths, shifted)
    with pytest.raises(SystemExit, match="refusing to time"):
        bs.check_agreement(seg, paths, [b[:1] for b in batches])
