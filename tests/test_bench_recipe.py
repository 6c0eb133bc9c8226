"""benchmarks/bench_recipe.py: the per-stage rates behind the recipe time estimates. A tiny run
goes through every stage's code path and returns one positive time per case."""
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

from benchmarks import bench_recipe as br  # noqa: E402


def test_tiny_run_times_every_stage(capsys):
    res = br.main(["--tiny", "--repeats", "1", "--threads", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert [(f["arch"], f["patch"], f["resolution"], f["unit"]) for f in res["forward"]] == [("vit_small", 16, 32, "crop")]
    assert [(s["C"], s["levels"]) for s in res["step"]] == [(8, [6, 3])]
    assert [e["unit"] for e in res["eval"]] == ["val image"] and [e["unit"] for e in res["probe"]] == ["training row"]
    from omh_ref.evaluate import crf

    assert ("crf" in res) == crf.available()
    for part in ("forward", "step", "eval", "probe") + (("crf",) if crf.available() else ()):
        for case in res[part]:
            assert len(case["times_s"]) == 1 and case["s_per_unit"] == pytest.approx(
                case["times_s"][0] / case["units_per_call"])
    assert out[-1].startswith("{") and any(line.startswith("forward vit_small/16 32 px: ") for line in out)


def test_parts_can_be_skipped():
    res = br.main(["--tiny", "--repeats", "1", "--skip", "forward,eval,crf", "--pause", "0"])
    assert set(res) & {"forward", "eval", "probe", "crf"} == set() and len(res["step"]) == 1
