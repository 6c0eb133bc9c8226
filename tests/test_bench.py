"""The benchmark harness (benchmarks/harness.py, ``python -m benchmarks``) in a tiny configuration:
the shape of its results, and that the agreement checks between ours and the peers really run (a
broken gradient makes them raise). No timing is asserted."""
import contextlib
import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("ot")

from benchmarks import __main__ as bench_main
from benchmarks import harness as bench
from omh_ref.core import fixtures, model
from omh_ref.core.ops import relu, sinkhorn

TINY = {"cfg": fixtures.small_config(), "batch_size": 3, "grid": (5, 4), "threads": (1,), "repeats": 1, "warmup": 0}


def _timing(t):
    assert t["median_s"] > 0 and t["min_s"] <= t["median_s"] and len(t["times_s"]) >= 1


def test_step_benchmark_structure():
    res = bench.step_benchmark(**TINY)
    cfg = TINY["cfg"]
    assert res["shape"] == {"batch": 3, "grid": [5, 4], "C": cfg.in_dim, "D": cfg.dim, "levels": list(cfg.levels),
                            "S": cfg.feature_samples, "dtype": "float32"}
    check = res["check"]
    assert set(check["grad_rel_err"]) == set(model.init_params(cfg, np.random.default_rng(0)))
    assert check["loss_rel_err"] <= bench.LOSS_RTOL
    assert max(check["grad_rel_err"].values()) <= bench.GRAD_RTOL
    (run,) = res["runs"]
    assert run["threads"] == 1
    _timing(run["numpy"])
    _timing(run["torch"])
    assert run["ratio"] == pytest.approx(run["numpy"]["median_s"] / run["torch"]["median_s"])
    assert res["goal"] == ("numpy / torch", "<=", 0.4)


def test_step_benchmark_refuses_a_broken_gradient(monkeypatch):
    """A 1 % error in relu's backward (it feeds W2, b2 only) must stop the benchmark."""
    good = relu.backward
    monkeypatch.setattr(relu, "backward", lambda dy, cache: good(dy, cache) * np.float32(1.01))
    with pytest.raises(bench.Mismatch, match="gradient (W2|b2)"):
        bench.step_benchmark(**TINY)


def test_step_benchmark_subprocess_isolation():
    """The fallback without threadpoolctl: each thread count in its own process."""
    res = bench.step_benchmark(**TINY, isolate="subprocess")
    assert res["isolate"] == "subprocess"
    _timing(res["runs"][0]["numpy"])
    _timing(res["runs"][0]["torch"])


def test_gemm_floor_structure():
    res = bench.gemm_floor(TINY["cfg"], 3, (5, 4), threads=(1,), repeats=1, warmup=0)
    (run,) = res["runs"]
    assert run["floor_s"] > 0 and run["step_s"] > 0 and run["ratio"] == pytest.approx(run["step_s"] / run["floor_s"])
    cfg = TINY["cfg"]
    P2, P = 2 * 3 * 20, 3 * 20
    C, D = cfg.in_dim, cfg.dim
    want = 2 * (P2 * C * (2 * D + C) + 3 * P * D * sum(cfg.levels) + P2 * (3 * C * D + C * C))
    assert res["gflop"] == pytest.approx(want / 1e9) and res["goal"] == ("step / GEMM floor", "<=", 1.5)


def test_step_profile_parts_add_up():
    prof = bench.step_profile(TINY["cfg"], 3, (5, 4), threads=1, torch_top=3)
    assert set(prof["parts_ms"]) == {"head", "correlation", "cluster targets", "cluster levels", "hierarchy",
                                     "draws", "other"}
    assert sum(prof["parts_ms"].values()) == pytest.approx(prof["total_ms"], rel=1e-6)
    assert 0 < prof["hierarchy_sinkhorn_ms"] <= prof["parts_ms"]["hierarchy"]
    assert len(prof["torch_top_ops"]["ops"]) == 3


def test_kernel_count_counts_both_steps_and_sees_an_unfused_optimiser(monkeypatch):
    """Ours and torch's kernels per step are counted (each part non-zero, the total their sum);
    an Adam written as separate operations (the update before fusion) shows as more kernels."""
    res = bench.kernel_count(**{k: TINY[k] for k in ("cfg", "batch_size", "grid")})
    for side in ("ours", "torch"):
        r = res[side]
        assert r["loss_and_grads"] > 0 and r["optimiser"] > 0 and r["total"] == r["loss_and_grads"] + r["optimiser"]
    assert res["ratio"] == pytest.approx(res["ours"]["total"] / res["torch"]["total"])
    assert res["goal"] == ("ours / torch", "<=", 1.0)
    from omh_ref.core import backend, optim

    monkeypatch.setattr(backend, "fusing", lambda name: contextlib.nullcontext())
    monkeypatch.setattr(optim, "fusing", lambda name: contextlib.nullcontext())
    unfused = bench.kernel_count(**{k: TINY[k] for k in ("cfg", "batch_size", "grid")})
    n = len(model.init_params(TINY["cfg"], np.random.default_rng(0)))
    assert unfused["ours"]["optimiser"] >= res["ours"]["optimiser"] + 5 * n
    assert unfused["ours"]["loss_and_grads"] == res["ours"]["loss_and_grads"]


def test_sinkhorn_benchmark_structure():
    res = bench.sinkhorn_benchmark(hier=((7, 5),), eps=(0.2, 0.05), n_iters=9, targets=(30, 7), threads=(1,),
                                   repeats=1, warmup=0)
    hier = [c for c in res["cases"] if c["problem"] == "hierarchy"]
    (targets,) = [c for c in res["cases"] if c["problem"] == "targets"]
    assert [(c["n"], c["m"], c["eps"], c["backward"]) for c in hier] == [(7, 5, 0.2, True), (7, 5, 0.05, True)]
    assert set(hier[0]["rel_err"]) == {"plan", "dcost", "da", "db"}
    assert (targets["n"], targets["m"], targets["backward"]) == (30, 7, False)
    assert set(targets["rel_err"]) == {"plan"}
    for c in res["cases"]:
        _timing(c["ours"])
        _timing(c["pot_torch"])
        assert c["speedup"] == pytest.approx(c["pot_torch"]["median_s"] / c["ours"]["median_s"])
    _timing(targets["pot_numpy"])
    _timing(targets["pot_torch_contiguous"])


def test_sinkhorn_benchmark_refuses_a_broken_backward(monkeypatch):
    good = sinkhorn.backward

    def broken(dplan, cache):
        dC, da, db = good(dplan, cache)
        return dC * np.float32(1.01), da, db

    monkeypatch.setattr(sinkhorn, "backward", broken)
    with pytest.raises(bench.Mismatch, match="dcost"):
        bench.sinkhorn_case(*bench.hierarchy_problem(7, 5, D=3), 0.2, 9, repeats=1, warmup=0)


def test_python_m_benchmarks_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench_main.main(["--tiny", "--json", str(out)])
    printed = capsys.readouterr().out
    for text in ("Training step", "numpy / torch", "goal <= 0.4", "Kernels per training step", "ours / torch",
                 "goal <= 1.0", "GEMM floor", "goal <= 1.5", "torch / ours", "goal >= 2.0",
                 "ours / bare", "goal >= 0.7", "Scaling", "GPU:"):
        assert text in printed, text
    data = json.loads(out.read_text())
    assert set(data) >= {"versions", "step", "kernels", "profile", "components", "sinkhorn", "eval", "scaling", "gpu"}
    (comp,) = data["components"]["runs"]
    for part in ("head", "feature sampling", "cluster targets"):
        assert comp[part]["numpy"] > 0 and comp[part]["torch"] > 0
    assert [r["batch"] for r in data["scaling"]["batch"]] == [2, 3]
    assert [r["levels"] for r in data["scaling"]["levels"]] == [[6], [6, 4]]
    assert "ratio_ours_over_bare" in data["eval"]
    assert data["gpu"]["available"] in (True, False)


def test_training_check_runs_and_compares_devices(tmp_path):
    """gpu_check.sh's training row, on the CPU here: the run happens, is validated, and two devices
    whose losses differ are reported as a mismatch."""
    rows = bench.training_check(tmp_path, steps=4, devices=("cpu",), log_every=2)
    assert set(rows) == {"cpu"} and rows["cpu"]["seconds"] > 0 and 0 <= rows["cpu"]["val_miou"] <= 100


def test_gpu_check_script_says_so_without_a_gpu():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, env={"PYTHON": sys.executable,
                                                                                     "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0 and "gpu_check: no GPU here" in res.stdout


def test_hp_memory_benchmark_measures_a_constant_per_entry_peak(capsys):
    """bench_hp_memory at tiny sizes: one line per batch, finite losses, the same peak per block
    entry at every B (what its linear extrapolation to HP's batch rests on), the B = 64 line."""
    from benchmarks import bench_hp_memory

    bench_hp_memory.main(["--batches", "2,4", "--grid", "6", "--dim", "16"])
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert [r["B"] for r in rows] == [2, 4, 64] and all(r["finite"] for r in rows[:2])
    assert rows[0]["block_entries"] == 36 * 72 and rows[1]["N"] == 144
    per = [r["bytes_per_block_entry"] for r in rows[:2]]
    assert 0 < per[0] and abs(per[0] - per[1]) <= 0.1 * per[0]
    assert rows[2]["peak_gb_extrapolated"] == round(per[1] * 36 * 64 * 36 / 2**30, 2)
