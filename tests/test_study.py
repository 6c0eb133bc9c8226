"""The method study's machinery (benchmarks/study): its pre-stated decision rule applied to known
numbers, and its data families (where scikit-image, the study's own dependency, is installed)."""
import json

import numpy as np
import pytest

from benchmarks.study import report


def _records(family, variant, values):
    return [{"family": family, "variant": variant, "seed": s, "miou": v} for s, v in enumerate(values)]


def _rows(per_family):
    recs = []
    for family, variants in per_family.items():
        for variant, values in variants.items():
            recs += _records(family, variant, values)
    order = list(dict.fromkeys(r["variant"] for r in recs))
    return {f: report.table(recs, f, order)[1] for f in per_family}


BASE = [20.0, 22.0, 24.0, 21.0, 23.0]


def _shift(values, deltas):
    return [v + d for v, d in zip(values, deltas)]


def test_the_rule_adopts_a_consistent_gain_and_nothing_else():
    fams = {
        f: {
            "default": BASE,
            # +1 on every seed of both families: positive everywhere, larger than its (zero) spread
            "steady": _shift(BASE, [1.0] * 5),
            # +2 ± 0.1 on flat but -0.2 on tree: not positive on every family
            "one family": _shift(BASE, [2.0, 2.1, 1.9, 2.0, 2.0] if f == "flat" else [-0.2] * 5),
            # +0.2 on average with a spread of about 3 on both: positive, clear on neither
            "noisy": _shift(BASE, [3.0, -3.0, 3.0, -3.0, 1.0]),
            # a reference that passes is reported, never adopted
            "no hierarchy (λ_hier 0)": _shift(BASE, [5.0] * 5),
        }
        for f in report.RULE_FAMILIES
    }
    adopted, verdicts = report.decide(_rows(fams))
    assert verdicts == {"steady": True, "one family": False, "noisy": False, "no hierarchy (λ_hier 0)": True}
    assert adopted == "steady"


def test_the_rule_picks_the_largest_mean_gain_and_keeps_the_default_when_none_passes():
    fams = {f: {"default": BASE, "small": _shift(BASE, [0.5] * 5), "large": _shift(BASE, [1.5] * 5)}
            for f in report.RULE_FAMILIES}
    assert report.decide(_rows(fams))[0] == "large"
    fams = {f: {"default": BASE, "worse": _shift(BASE, [-0.5] * 5)} for f in report.RULE_FAMILIES}
    assert report.decide(_rows(fams)) == (None, {"worse": False})


def test_paired_differences_pair_by_seed():
    vals = {0: 10.0, 1: 30.0, 2: 50.0}
    base = {0: 9.0, 1: 29.0, 3: 0.0}             # seed 2 has no default run, seed 3 no variant run
    mean, std, n = report.paired(vals, base)
    assert (mean, std, n) == (1.0, 0.0, 2)


def test_the_report_prints_tables_and_the_decision(tmp_path, capsys):
    recs = []
    for f in report.RULE_FAMILIES:
        recs += _records(f, "default", BASE) + _records(f, "steady", _shift(BASE, [1.0] * 5))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    report.main([str(path), "--markdown", str(tmp_path / "out.md")])
    text = (tmp_path / "out.md").read_text()
    assert "| steady | 23.0 ± 1.6 | +1.0 ± 0.0 | 5 |" in text and "**Adopted: steady**" in text


def test_the_study_families_are_deterministic_and_split_apart(tmp_path):
    pytest.importorskip("skimage")
    from benchmarks.study import data

    a = data.write_family("tree", tmp_path / "a", n_train=3, n_val=2, say=lambda *_: None)
    b = data.write_family("tree", tmp_path / "b", n_train=3, n_val=2, say=lambda *_: None)
    for split in ("train", "val"):
        fa, fb = (np.load(f"{d[split]}/feats.npy") for d in (a, b))
        assert fa.shape == ((3 if split == "train" else 2), data.GRID, data.GRID, data.DIM)
        assert np.array_equal(fa, fb) and np.isfinite(fa.astype(np.float32)).all()
        labels = np.load(f"{a[split]}/labels.npy")
        assert labels.min() >= 0 and labels.max() < 9
        meta = json.loads(open(f"{a[split]}/feats.json").read())
        assert [g["name"] for g in meta["label_hierarchy"]] == ["classes", "superclasses"]
    # the two splits are different images
    tr, va = np.load(f"{a['train']}/feats.npy"), np.load(f"{a['val']}/feats.npy")
    assert not np.array_equal(tr[:2], va)
    # the train split carries the HP base's inputs, read by the store; evaluation's split none
    from omh_ref.features.store import FeatureStore

    st = FeatureStore(f"{a['train']}/feats.npy")
    attn, aug = st.open_attention().read([0, 2]), st.open_augmented().read([0, 2])
    assert attn.shape == (2, data.GRID, data.GRID, 9) and (attn >= 0).all() and (attn[:, 0, 0, 0] == 0).all()
    assert aug.shape == tr[[0, 2]].shape and not np.allclose(aug, tr[[0, 2]].astype(np.float32))
    assert np.array_equal(aug, FeatureStore(f"{b['train']}/feats.npy").open_augmented().read([0, 2]))
    assert FeatureStore(f"{a['val']}/feats.npy").meta.get("attention") is None


def test_the_level_table_pairs_the_finest_consistency_by_seed():
    def rec(variant, seed, cons):
        return {"family": "tree", "variant": variant, "seed": seed, "miou": 1.0,
                "levels": [{"level": 0, "clusters": 6, "granularity": "classes", "miou": 40.0, "many_to_one_miou": 60.0},
                           {"level": 1, "clusters": 3, "granularity": "superclasses", "miou": 50.0,
                            "many_to_one_miou": 70.0}],
                "consistency": [{"child": 0, "parent": 1, "consistency": cons, "consistency_chance": 0.25}]}

    recs = [rec("default", s, c) for s, c in enumerate([0.5, 0.6, 0.7])]
    recs += [rec("other", s, c) for s, c in enumerate([0.6, 0.8, 0.6])]     # +0.1, +0.2, -0.1
    lines = report.level_table(recs, "tree", ["default", "other"])
    assert lines[2] == ("| default | 6 → classes: 40.0 (60.0); 3 → superclasses: 50.0 (70.0) | L0→L1 0.60 (0.25) | – |")
    assert lines[3].endswith("| L0→L1 0.67 (0.25) | +0.07 ± 0.15 (2/3) |"), lines[3]


def test_the_stego_code_k_means_row_is_scored_in_the_baselines_job(tmp_path):
    """A study with STEGO baseline records but none of k-means on its code runs the baseline's job
    again (re-evaluating it), and that job returns both rows, from the one trained run."""
    from benchmarks.study import run
    from omh_ref.jobs import demo

    assert run.trained_variants(["STEGO code + k-means"]) == ["STEGO baseline"]
    have = {("demo", "STEGO baseline", 0), ("demo", "default", 0)}
    assert run.missing("demo", "STEGO baseline", 0, have) and not run.missing("demo", "default", 0, have)
    paths = demo.prepare_data(tmp_path / "data", 8, 4)
    job = {"family": "demo", "variant": "STEGO baseline", "seed": 0, "steps": 3, "out": str(tmp_path),
           "paths": {k: str(p) for k, p in paths.items()}}
    recs = run.run_job(job)
    assert [r["variant"] for r in recs] == ["STEGO baseline", "STEGO code + k-means"]
    assert all(0.0 <= r["miou"] <= 100.0 for r in recs) and recs[0]["miou"] != recs[1]["miou"]
    again = run.run_job(job)    # the trained run is re-evaluated, and k-means is seeded: the same rows
    assert [r["miou"] for r in again] == [r["miou"] for r in recs]


def test_the_bases_table_pairs_omh_with_its_own_base_by_seed():
    def recs(variant, values, cons=None):
        out = _records("flat", variant, values)
        for r in out:
            r["consistency"] = [{"child": 0, "parent": 1, "consistency": cons, "consistency_chance": 0.1}]
        return out

    data = (recs("STEGO baseline", [10.0, 12.0, 11.0]) + recs("STEGO code + k-means", [15.0, 15.0, 16.0])
            + recs("default", [20.0, 21.0, 22.0], 0.8) + recs("SmooSeg baseline", [12.0, 13.0, 14.0])
            + recs("SmooSeg code + k-means", [13.0, 18.0, 14.0]) + recs("OMH on SmooSeg", [19.0, 17.0, 25.0], 0.7)
            + recs("HP baseline", [14.0, 16.0, 15.0]) + recs("HP code + k-means", [16.0, 16.0, 16.0])
            + recs("OMH on HP", [18.0, 22.0, 23.0], 0.9))
    lines = report.bases_table(data, "flat")
    # OMH − alone per seed: STEGO 10, 9, 11; SmooSeg 7, 4, 11; OMH − k-means: 5, 6, 6 and 6, −1, 11
    assert lines[2] == "| STEGO | 11.0 ± 1.0 | 15.3 ± 0.6 | 21.0 ± 1.0 | +10.0 ± 1.0 (3/3) | +5.7 ± 0.6 (3/3) | 0.80 |"
    assert lines[3] == "| SmooSeg | 13.0 ± 1.0 | 15.0 ± 2.6 | 20.3 ± 4.2 | +7.3 ± 3.5 (3/3) | +5.3 ± 6.0 (2/3) | 0.70 |"
    # HP: OMH − alone 4, 6, 8; OMH − k-means 2, 6, 7
    assert lines[4] == "| HP | 15.0 ± 1.0 | 16.0 ± 0.0 | 21.0 ± 2.6 | +6.0 ± 2.0 (3/3) | +5.0 ± 2.6 (3/3) | 0.90 |"
    # OMH on each base − OMH on STEGO: SmooSeg −1, −4, +3; HP −2, +1, +1
    assert lines[-1] == ("OMH on SmooSeg − OMH on STEGO: -0.7 ± 3.5 (1/3); OMH on HP − OMH on STEGO: +0.0 ± 1.7 (2/3) "
                         "(paired by seed)")
    for v in ("OMH on SmooSeg", "SmooSeg baseline", "OMH on HP", "HP baseline"):
        assert v in report.REFERENCES   # never adopted by the rule
