"""``omh-ref seeds``: one config trained and evaluated per seed, mean ± std per metric; finished
runs are skipped; on Dask (``--scheduler local:2``) the numbers equal a run one seed after another."""
import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.core.config import Config
from omh_ref.core.errors import InputError
from omh_ref.jobs import seeds
from omh_ref.features import synthetic
from omh_ref_cli.main import main

LEVELS = (36, 18, 9)      # 4K/2K/K over the synthetic data's 9 classes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthetic.write(synthetic.SynthSpec(n_images=16, grid=5, dim=16, seed=0), d / "train", split="train")
    synthetic.write(synthetic.SynthSpec(n_images=6, grid=5, dim=16, seed=1), d / "val", split="val")
    return d


def _opts(data, out, **kw):
    base = dict(features=str(data / "train" / "feats.npy"), val_features=str(data / "val" / "feats.npy"), out=str(out),
                config=Config(in_dim=16, levels=LEVELS), seeds=(0, 1), steps=4, batch_size=4, probe_epochs=1,
                progress=False)
    return seeds.SeedsOptions(**{**base, **kw})


def quiet(*_):
    pass


def test_parse_seeds():
    assert seeds.parse_seeds("0, 1,2") == (0, 1, 2)
    for bad in ("", "a", "-1", "1,1", "1.5"):
        with pytest.raises(InputError, match="--seeds: expected distinct comma-separated integers >= 0"):
            seeds.parse_seeds(bad)


def test_summary_table_and_markdown_of_known_scores():
    runs = [{"seed": s, "cluster": {"miou": m, "acc": a}, "linear": {"miou": 50.0, "acc": 70.0}}
            for s, m, a in ((0, 10.0, 40.0), (1, 20.0, 60.0), (2, 60.0, 80.0))]
    runs[2]["crf"] = {"miou": 1.0, "acc": 2.0}            # only some runs: not summarised
    s = seeds.summarize(runs)
    assert list(s) == ["cluster_miou", "cluster_acc", "linear_miou", "linear_acc"]
    assert s["cluster_miou"]["values"] == [10.0, 20.0, 60.0]
    assert s["cluster_miou"]["mean"] == pytest.approx(30.0)
    assert s["cluster_miou"]["std"] == pytest.approx(math.sqrt(((20 ** 2) + 10 ** 2 + 30 ** 2) / 2))
    assert s["linear_acc"]["std"] == 0.0 and seeds.summarize(runs[:1])["cluster_miou"]["std"] == 0.0
    t = seeds.table({"OMH": s}, 3, 12.0)
    assert "cluster mIoU" in t.splitlines()[0] and "30.0 ± 26.5" in t and "over 3 seeds" in t
    md = seeds.markdown({"title": "T", "runs": runs, "summary": s})
    assert "| cluster mIoU | 30.00 ± 26.46 | 10.00 | 20.00 | 60.00 |" in md


def test_seeds_write_results_and_a_rerun_skips_finished_runs(data, tmp_path, monkeypatch):
    rep = seeds.run(_opts(data, tmp_path / "r"), say=quiet)
    saved = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1] and saved["runs"][0] != saved["runs"][1]
    assert saved["summary"] == rep["summary"] and set(rep["summary"]) >= {"cluster_miou", "linear_miou"}
    assert (tmp_path / "r" / "results.md").read_text().count(" ± ") >= 4
    for seed in (0, 1):
        assert (tmp_path / "r" / f"seed{seed}" / "ckpt.npz").is_file()
        assert (tmp_path / "r" / f"seed{seed}" / "pictures" / "predictions.png").is_file()

    def forbidden(*a, **k):
        raise AssertionError("a finished run ran again")
    monkeypatch.setattr(seeds, "train", forbidden)
    monkeypatch.setattr(seeds, "run_eval", forbidden)
    again = seeds.run(_opts(data, tmp_path / "r"), say=quiet)
    assert again["runs"] == rep["runs"]
    # one more seed: only that one runs
    monkeypatch.undo()
    said = []
    more = seeds.run(_opts(data, tmp_path / "r", seeds=(0, 1, 2)), say=said.append)
    assert more["runs"][:2] == rep["runs"] and len(more["summary"]["cluster_miou"]["values"]) == 3
    assert sum("trained already" in m for m in said) == 2


def test_another_config_in_the_same_folder_is_refused(data, tmp_path):
    seeds.run(_opts(data, tmp_path / "r", seeds=(0,)), say=quiet)
    with pytest.raises(InputError, match=r"seed0/ckpt.npz: trained with another config \(differs in eps\)"):
        seeds.run(_opts(data, tmp_path / "r", seeds=(0,), config=Config(in_dim=16, levels=LEVELS, eps=0.3)),
                  say=quiet)
    with pytest.raises(InputError, match="past the 2 steps asked for"):
        seeds.run(_opts(data, tmp_path / "r", seeds=(0,), steps=2), say=quiet)


def test_on_dask_the_numbers_equal_one_seed_after_another(data, tmp_path):
    pytest.importorskip("distributed")
    one = seeds.run(_opts(data, tmp_path / "serial"), say=quiet)
    two = seeds.run(_opts(data, tmp_path / "dask", scheduler="local:2"), say=quiet)
    a = json.loads((tmp_path / "serial" / "results.json").read_text())
    b = json.loads((tmp_path / "dask" / "results.json").read_text())
    assert a["runs"] == b["runs"] and a["summary"] == b["summary"]
    assert one["runs"] == two["runs"]
    for seed in (0, 1):   # the runs themselves, not only their scores
        with np.load(tmp_path / "serial" / f"seed{seed}" / "ckpt.npz") as x, \
                np.load(tmp_path / "dask" / f"seed{seed}" / "ckpt.npz") as y:
            params = [k for k in x.files if k.startswith("param")]
            assert params and all(np.array_equal(x[k], y[k]) for k in params)


def test_the_seeds_command(data, tmp_path):
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[model]\nlevels = [36, 18, 9]\n[train]\nsteps = 3\nbatch_size = 4\nseed = 7\n")
    res = CliRunner().invoke(main, ["seeds", "--features", str(data / "train" / "feats.npy"), "--val-features",
                                    str(data / "val" / "feats.npy"), "--out", str(tmp_path / "o"), "--seeds", "3,4",
                                    "--config", str(cfg), "--probe-epochs", "1", "--eps", "0.3", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "cluster mIoU" in res.output and "(mean ± std over 2 seeds" in res.output
    rep = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["seed"] for r in rep["runs"]] == [3, 4]          # --seeds, not the file's seed
    assert rep["options"]["steps"] == 3 and rep["config"]["eps"] == 0.3 and rep["config"]["levels"] == [36, 18, 9]
    res = CliRunner().invoke(main, ["seeds", "--features", str(tmp_path / "none.npy"), "--val-features",
                                    str(data / "val" / "feats.npy"), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "none.npy" in res.output
