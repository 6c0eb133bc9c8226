"""Multi-granular evaluation on data whose label hierarchy is known: a perfect model scores 100 at
every level with consistency 1, and models wrong in known ways do not."""
import json

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.lib.format import open_memmap

from omh_ref.core.config import Config
from omh_ref.core.errors import InputError
from omh_ref.core.optim import adam_init
from omh_ref.evaluate import granular
from omh_ref.evaluate.hierarchy import hierarchy_plans
from omh_ref.evaluate.predict import cluster_eval
from omh_ref.extract.datasets import label_hierarchy
from omh_ref.features import meta as feats_meta
from omh_ref.features.store import FeatureStore
from omh_ref.train import checkpoint

S, CPS, PPC = 2, 2, 2           # superclasses, classes per superclass, parts per class
K_CLS, K_PART = S * CPS, S * CPS * PPC
C = K_PART + K_CLS + S          # one-hot part | class | superclass


def _world(tmp_path, N=8, h=6, seed=0):
    """Every patch one part; features concatenate the one-hots of its part, class and superclass;
    labels at the grid's resolution; feats.json with the three granularities."""
    rng = np.random.default_rng(seed)
    part = rng.integers(0, K_PART, size=(N, h, h))
    part.reshape(-1)[:K_PART] = np.arange(K_PART)                    # every part occurs
    cls, sup = part // PPC, part // (PPC * CPS)
    feats = open_memmap(tmp_path / "feats.npy", mode="w+", dtype=np.float32, shape=(N, h, h, C))
    feats[:] = np.concatenate([np.eye(K_PART)[part], np.eye(K_CLS)[cls], np.eye(S)[sup]], axis=-1)
    feats.flush()
    del feats
    labels = cls.astype(np.uint8)
    labels[0, 0, 0] = 255                                            # an ignored pixel
    np.save(tmp_path / "labels.npy", labels)
    np.save(tmp_path / "labels_fine.npy", part.astype(np.uint8))
    hier = [feats_meta.granularity("parts", K_PART, "labels_fine.npy", parent=[p // PPC for p in range(K_PART)]),
            feats_meta.granularity("classes", K_CLS, "labels.npy", [f"c{c}" for c in range(K_CLS)],
                                   parent=[c // CPS for c in range(K_CLS)]),
            feats_meta.granularity("superclasses", S, "labels.npy", map=[c // CPS for c in range(K_CLS)])]
    feats_meta.write(tmp_path / "feats.json", feats_meta.make(
        shape=[N, h, h, C], dtype="float32", backbone="test", resolution=h, patch=1, labels="labels.npy",
        labels_fine="labels_fine.npy", n_classes=K_CLS, label_hierarchy=hier))
    return FeatureStore(tmp_path / "feats.npy", labels=tmp_path / "labels.npy")


def _centroids():
    """Each level's centroid of a unit: the mean feature of its patches' kinds (parts, classes,
    superclasses): cosine argmax recovers the unit, and a child is closest to its true parent."""
    P = np.concatenate([np.eye(K_PART), np.eye(K_CLS)[np.arange(K_PART) // PPC],
                        np.eye(S)[np.arange(K_PART) // (PPC * CPS)]], axis=1)             # parts
    M1 = np.stack([P[np.arange(K_PART) // PPC == c].mean(0) for c in range(K_CLS)])
    M2 = np.stack([P[np.arange(K_PART) // (PPC * CPS) == s].mean(0) for s in range(S)])
    return P, M1, M2


def _params(perm=(None, None, None), swap_class_blocks=False):
    p = {"W1": np.eye(C, dtype=np.float32), "b1": np.zeros(C, np.float32), "W2": np.zeros((C, C), np.float32),
         "b2": np.zeros(C, np.float32), "W3": np.zeros((C, C), np.float32), "b3": np.zeros(C, np.float32)}
    for i, M in enumerate(_centroids()):
        if perm[i] is not None:
            M = M[perm[i]]
        p[f"M{i}"] = M.astype(np.float32)
    if swap_class_blocks:     # levels 0 and 1 see only their own one-hots: perfect partitions, blind plan
        M0, M1 = np.zeros_like(p["M0"]), np.zeros_like(p["M1"])
        M0[:, :K_PART] = np.eye(K_PART)
        M1[:, K_PART:K_PART + K_CLS] = np.eye(K_CLS)
        p["M0"], p["M1"] = M0, M1
    return p


CFG = Config(in_dim=C, dim=C, levels=(K_PART, K_CLS, S), eval_level=1, marginals="uniform", eps=0.05,
             sinkhorn_iters=200)


def _evaluate(store, params, cfg=CFG, level_labels=None):
    grans = granular.load_granularities(store)
    assign = None if level_labels is None else granular.parse_level_labels(level_labels, len(cfg.levels), grans)
    scorer = granular.LevelScorer(cfg, store, grans, assign)
    cluster_eval(params, cfg, store, K_CLS, batch_size=3, levels=scorer)
    return scorer.result(hierarchy_plans(params, cfg))


def test_a_perfect_model_scores_100_at_every_level_and_consistency_1(tmp_path):
    store = _world(tmp_path)
    rep = _evaluate(store, _params())
    assert [e["granularity"] for e in rep["levels"]] == ["parts", "classes", "superclasses"]
    for e in rep["levels"]:
        assert e["scores"]["protocol"] == "strict"
        assert e["scores"]["miou"] == pytest.approx(100.0) and e["scores"]["acc"] == pytest.approx(100.0)
        assert e["scores"]["many_to_one"]["miou"] == pytest.approx(100.0)
    for c in rep["consistency"]:
        assert c["consistency"] == pytest.approx(1.0) and c["consistency_soft"] > 0.99
        assert c["consistency_chance"] < 0.6 and all(c["consistent"])


def test_cluster_ids_are_matched_not_assumed(tmp_path):
    """Permuted clusters at every level: still 100 and consistent (the matching finds them)."""
    store = _world(tmp_path)
    rng = np.random.default_rng(3)
    rep = _evaluate(store, _params(perm=tuple(rng.permutation(k) for k in CFG.levels)))
    assert all(e["scores"]["miou"] == pytest.approx(100.0) for e in rep["levels"])
    assert all(c["consistency"] == pytest.approx(1.0) for c in rep["consistency"])


def test_a_wrong_partition_scores_below_100(tmp_path):
    """Class centroids built from the wrong pairs of parts: the class level is no longer the
    classes, and the parts -> classes consistency drops with it."""
    store = _world(tmp_path)
    P, _, M2 = _centroids()
    wrong = np.stack([P[[c, (c + 3) % K_PART]].mean(0) for c in range(0, K_PART, 2)])   # mixes classes
    params = _params()
    params["M1"] = wrong.astype(np.float32)
    rep = _evaluate(store, params)
    assert rep["levels"][0]["scores"]["miou"] == pytest.approx(100.0)
    assert rep["levels"][1]["scores"]["miou"] < 90
    assert rep["consistency"][0]["consistency"] < 1


def test_perfect_levels_with_a_blind_plan_are_not_consistent(tmp_path):
    """Every level a perfect partition, but the part and class centroids are orthogonal: the plan
    between them is uniform (every child to the first parent), and consistency says so while
    mIoU cannot."""
    store = _world(tmp_path)
    rep = _evaluate(store, _params(swap_class_blocks=True))
    assert all(e["scores"]["miou"] == pytest.approx(100.0) for e in rep["levels"])
    c = rep["consistency"][0]
    assert c["consistency"] < 0.75 and c["consistency_soft"] == pytest.approx(1 / K_CLS, abs=0.02)
    assert c["consistency_chance"] == pytest.approx(1 / K_CLS, abs=0.1)     # a blind plan scores chance


def test_level_labels_choose_the_granularity(tmp_path):
    store = _world(tmp_path)
    rep = _evaluate(store, _params(), level_labels="classes,classes,-")
    assert [e["granularity"] for e in rep["levels"]] == ["classes", "classes", None]
    assert rep["levels"][1]["scores"]["miou"] == pytest.approx(100.0)
    assert rep["levels"][0]["scores"]["miou"] < 100                # 8 part clusters for 4 classes, one-to-one
    assert rep["levels"][0]["scores"]["many_to_one"]["miou"] == pytest.approx(100.0)   # each part inside its class
    assert rep["consistency"][1]["consistency"] is None
    with pytest.raises(InputError, match="level-labels"):
        _evaluate(store, _params(), level_labels="parts,classes")
    with pytest.raises(InputError, match="unknown granularity"):
        _evaluate(store, _params(), level_labels="parts,kinds,superclasses")
    with pytest.raises(InputError, match="fewer than"):
        _evaluate(store, _params(), level_labels="parts,parts,superclasses")


def test_closest_granularity_from_below():
    g = [granular.Granularity(n, k, [], None, None, None) for n, k in (("fine", 182), ("classes", 27), ("ts", 2))]
    assert granular.closest_granularities((108, 54, 27, 5, 1), g) == [1, 1, 1, 2, None]


def test_consistency_by_hand():
    """4 child clusters against 2 parents, the confusions at the parent's granularity (2 classes)."""
    plan = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
    child = np.array([[10, 0], [2, 18], [25, 5], [0, 0]])      # majority classes 0, 1, 0; child 3 empty
    parent = np.array([[30, 10], [0, 60]])                     # classes 0, 1; 40 and 60 pixels
    r = granular.consistency(plan, child, parent)
    # hard: each child's argmax parent (0, 1, 0) has its class: 60 of 60 pixels
    assert r["consistency"] == pytest.approx(1.0) and r["consistent"] == [True, True, True, None]
    assert r["consistency_soft"] == pytest.approx((10 * 0.9 + 20 * 0.8 + 30 * 0.6) / 60)
    assert r["consistency_chance"] == pytest.approx((10 * 0.4 + 20 * 0.6 + 30 * 0.4) / 60)
    r = granular.consistency(plan[:, ::-1], child, parent)    # every child sent to the other class
    assert r["consistency"] == 0.0 and r["consistent"] == [False, False, False, None]


def test_a_nested_hierarchy_of_two_over_clustered_levels_is_consistent():
    """The one-to-one matching's failure, reproduced by hand: two classes, 8 pure children (4 per
    class) each sent by the plan to its true parent among 4 pure parents (2 per class), child
    masses [6, 1, 5.5, 5.5] per class. It gave consistency 0.0 and coverage 0.33 for this
    perfectly nested hierarchy; many-to-one gives 1."""
    mass = np.array([6, 1, 5.5, 5.5] * 2) * 10
    cls = np.repeat([0, 1], 4)
    child = np.zeros((8, 2))
    child[np.arange(8), cls] = mass
    parent_of = np.array([0, 0, 1, 1, 2, 2, 3, 3])          # children 0-3 under parents 0, 1 (class 0) ...
    plan = np.full((8, 4), 0.02)
    plan[np.arange(8), parent_of] = 0.94
    parent = np.zeros((4, 2))
    np.add.at(parent, parent_of, child)
    r = granular.consistency(plan, child, parent)
    assert r["consistency"] == 1.0 and r["consistency_soft"] == pytest.approx(0.96)
    assert r["consistency_chance"] == pytest.approx(0.5)
    perm_c, perm_p = np.random.default_rng(0).permutation(8), np.random.default_rng(1).permutation(4)
    shuffled = granular.consistency(plan[perm_c][:, perm_p], child[perm_c], parent[perm_p])
    assert {k: shuffled[k] for k in ("consistency", "consistency_soft", "consistency_chance")} == \
        pytest.approx({k: r[k] for k in ("consistency", "consistency_soft", "consistency_chance")})


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_over_clustered_levels_of_a_perfect_model_score_the_same_whatever_the_ids(tmp_path, seed):
    """Parts (8 clusters) scored against the classes and classes (4) against the superclasses:
    both levels have more clusters than classes. A perfect model is consistent (1, where the
    one-to-one matching gave 1.0, 0.0 or 0.52 depending on the data seed), and permuting the
    cluster ids of every level changes no printed number (STEGO's protocol gave 25 or 100)."""
    store = _world(tmp_path, seed=seed)
    rep = _evaluate(store, _params(), level_labels="classes,superclasses,-")
    assert [e["granularity"] for e in rep["levels"]] == ["classes", "superclasses", None]
    assert rep["consistency"][0]["consistency"] == pytest.approx(1.0)
    assert all(e["scores"]["many_to_one"]["miou"] == pytest.approx(100.0) for e in rep["levels"][:2])
    assert all(e["scores"]["miou"] < 100 for e in rep["levels"][:2])       # one-to-one: half the clusters unmatched
    rng = np.random.default_rng(10 + seed)
    perm = _evaluate(store, _params(perm=tuple(rng.permutation(k) for k in CFG.levels)),
                     level_labels="classes,superclasses,-")
    assert granular.format_levels(perm) == granular.format_levels(rep)
    assert perm["consistency"][0]["consistency"] == pytest.approx(1.0)


def test_eval_reports_levels_in_json_table_and_png(tmp_path):
    from omh_ref_cli.main import main

    store = _world(tmp_path)
    params = _params()
    checkpoint.save(tmp_path / "ck.npz", params, adam_init(params), 0, np.random.default_rng(0), CFG)
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "ck.npz"), "--features", str(store.path),
                                    "--json", str(tmp_path / "r.json"), "--out", str(tmp_path / "pics"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "every level against its label granularity" in res.output
    assert "consistency L0 -> L1: 1.00" in res.output and "superclasses" in res.output
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [e["scores"]["miou"] for e in saved["levels"]["levels"]] == pytest.approx([100.0] * 3)
    assert (tmp_path / "pics" / "hierarchy_tree.png").is_file()
    bad = CliRunner().invoke(main, ["eval", "--checkpoint", str(tmp_path / "ck.npz"), "--features", str(store.path),
                                    "--level-labels", "parts", "--quiet"])
    assert bad.exit_code != 0 and "--level-labels" in bad.output and "Traceback" not in bad.output


def test_a_missing_fine_labels_file_leaves_its_granularity_out(tmp_path):
    store = _world(tmp_path)
    (tmp_path / "labels_fine.npy").unlink()
    notes = []
    grans = granular.load_granularities(FeatureStore(store.path, labels=store.labels_path), notes=notes)
    assert [g.name for g in grans] == ["classes", "superclasses"] and "labels_fine.npy" in notes[0]


def _legacy_store(tmp_path, **meta):
    """A tiny 27-class feature file whose feats.json has no label_hierarchy (written before they
    existed); ``meta``: its extra fields (dataset, labels_fine)."""
    rng = np.random.default_rng(0)
    np.save(tmp_path / "feats.npy", rng.standard_normal((2, 2, 2, 3)).astype(np.float32))
    np.save(tmp_path / "labels.npy", rng.integers(0, 27, size=(2, 4, 4)).astype(np.uint8))
    feats_meta.write(tmp_path / "feats.json", feats_meta.make(shape=[2, 2, 2, 3], dtype="float32", backbone="t",
                                                              resolution=4, patch=2, labels="labels.npy",
                                                              n_classes=27, **meta))
    return FeatureStore(tmp_path / "feats.npy", labels=tmp_path / "labels.npy")


def test_known_data_sets_get_their_hierarchy_without_one_in_feats_json(tmp_path):
    """A feats.json written before label hierarchies (cityscapes27, no field) gets the data set's."""
    grans = granular.load_granularities(_legacy_store(tmp_path, dataset="cityscapes27"), known=label_hierarchy)
    assert [(g.name, g.n_classes) for g in grans] == [("classes", 27), ("categories", 7)]
    # road, sidewalk flat; person, rider human; bicycle vehicle (cityscapesScripts' categories)
    assert [grans[0].parent[i] for i in (0, 1, 17, 18, 26)] == [0, 0, 5, 5, 6]


def test_label_hierarchy_records_are_checked():
    good = [feats_meta.granularity("a", 4, "labels.npy", parent=[0, 0, 1, 1]),
            feats_meta.granularity("b", 2, "labels.npy", map=[0, 0, 1, 1])]
    feats_meta.check_label_hierarchy(good)
    for bad, match in ((good[:1], "parent"), ([good[0], dict(good[1], map=[0, 5])], "map"),
                       ([dict(good[0], parent=[0, 0, 0, 0]), good[1]], "without children"),
                       ([dict(good[0], class_names=["x"]), good[1]], "class_names"),
                       ([good[0], dict(good[1], name="a")], "taken")):   # names pick levels and parents
        with pytest.raises(InputError, match=match):
            feats_meta.check_label_hierarchy(bad)


def test_eval_of_another_granularitys_labels_file_scores_every_level_from_its_own_file(tmp_path):
    """``eval --labels labels_fine.npy`` (the parts, 8 classes): the labels given are the parts'
    file, not a stand-in for labels.npy, so the class and superclass levels still read labels.npy
    (they were scored on the part ids and failed with 'values must be in [0, 4)')."""
    import dataclasses

    from omh_ref.jobs.evaluate import EvalOptions, run

    store = _world(tmp_path)
    params = _params()
    cfg = dataclasses.replace(CFG, eval_level=0)
    checkpoint.save(tmp_path / "ck.npz", params, adam_init(params), 0, np.random.default_rng(0), cfg)
    res = run(EvalOptions(checkpoint=str(tmp_path / "ck.npz"), features=str(store.path),
                          labels=str(tmp_path / "labels_fine.npy"), n_classes=K_PART, progress=False))
    assert res["cluster"]["miou"] == pytest.approx(100.0)
    assert [e["granularity"] for e in res["levels"]["levels"]] == ["parts", "classes", "superclasses"]
    assert [e["scores"]["miou"] for e in res["levels"]["levels"]] == pytest.approx([100.0] * 3)


def test_a_fine_label_outside_0_255_is_reported_not_ignored(tmp_path):
    """A granularity read as is (no map) reports label values that are neither a class nor an
    ignore value, naming its file, also beyond uint8's range (an int16 file's 300 was silently
    turned into 'ignore')."""
    store = _world(tmp_path)
    fine = np.load(tmp_path / "labels_fine.npy").astype(np.int16)
    fine[1, 2, 3] = 300
    np.save(tmp_path / "labels_fine.npy", fine)
    with pytest.raises(InputError, match=r"labels_fine\.npy.*found 300"):
        _evaluate(store, _params())


def test_without_a_label_hierarchy_the_classes_are_named_as_eval_names_them(tmp_path):
    """No label hierarchy (an unknown data set): the one granularity takes eval's class names.
    It took feats.json's, and with --n-classes / --class-names for more classes than those name,
    the tree picture indexed past them (IndexError after the whole evaluation)."""
    import dataclasses

    from omh_ref.jobs.evaluate import EvalOptions, run

    store = _world(tmp_path)
    m = feats_meta.read(tmp_path / "feats.json")
    feats_meta.write(tmp_path / "feats.json", dict(m, label_hierarchy=None, class_names=[f"c{i}" for i in range(K_CLS)]))
    (tmp_path / "names.txt").write_text("\n".join(f"p{i}" for i in range(K_PART)))
    params = _params()
    checkpoint.save(tmp_path / "ck.npz", params, adam_init(params), 0, np.random.default_rng(0),
                    dataclasses.replace(CFG, eval_level=0))
    res = run(EvalOptions(checkpoint=str(tmp_path / "ck.npz"), features=str(store.path),
                          labels=str(tmp_path / "labels_fine.npy"), n_classes=K_PART,
                          class_names=str(tmp_path / "names.txt"), out=str(tmp_path / "o"), progress=False))
    assert [e["granularity"] for e in res["levels"]["levels"]] == ["classes", None, None]
    assert (tmp_path / "o" / "hierarchy_tree.png").is_file()
    grans = granular.load_granularities(FeatureStore(store.path, labels=tmp_path / "labels_fine.npy"), K_PART)
    assert grans[0].class_names == [str(i) for i in range(K_PART)]        # feats.json's 4 names are too few


def test_a_granularity_without_labelled_pixels_is_noted_not_fatal(tmp_path):
    """All parts ignored (255) in this split: level 0 is not scored and says why; the other levels
    are scored, and the pair that needs level 0 has no consistency."""
    store = _world(tmp_path)
    np.save(tmp_path / "labels_fine.npy", np.full(np.load(tmp_path / "labels_fine.npy").shape, 255, np.uint8))
    rep = _evaluate(store, _params())
    assert rep["levels"][0]["scores"] is None and rep["levels"][0]["granularity"] is None
    assert [e["scores"]["miou"] for e in rep["levels"][1:]] == [pytest.approx(100.0)] * 2
    assert rep["consistency"][0]["consistency"] is None and rep["consistency"][1]["consistency"] == pytest.approx(1.0)
    assert any("level 0 not scored" in n and "labels_fine.npy" in n for n in rep["notes"])
    assert "level 0" in "\n".join(granular.format_levels(rep))


def test_fine_labels_named_but_missing_are_noted(tmp_path):
    """An older feats.json (no label_hierarchy) naming a labels_fine file that is gone."""
    notes = []
    grans = granular.load_granularities(_legacy_store(tmp_path, dataset="cocostuff27", labels_fine="labels_fine.npy"),
                                        notes=notes, known=label_hierarchy)
    assert [g.name for g in grans][0] == "classes" and any("labels_fine.npy" in n for n in notes)


def test_the_result_names_each_child_clusters_parent_in_the_plan(tmp_path):
    """``parents`` (what a drawing of the tree needs): the argmax of each child's row of the plan,
    following the clusters when their ids are permuted; None without plans."""
    store = _world(tmp_path)
    rng = np.random.default_rng(5)
    perm = tuple(rng.permutation(k) for k in CFG.levels)
    params = _params(perm=perm)
    rep = _evaluate(store, params)
    for c, A in zip(rep["consistency"], hierarchy_plans(params, CFG)):
        assert c["parents"] == np.asarray(A).argmax(axis=1).tolist()
    plain = _evaluate(store, _params())["consistency"]
    for l, (c, p) in enumerate(zip(rep["consistency"], plain)):
        inverse = np.argsort(perm[l + 1])             # an old parent id -> its new id
        assert c["parents"] == [int(inverse[p["parents"][perm[l][i]]]) for i in range(CFG.levels[l])]
    scorer = granular.LevelScorer(CFG, store, granular.load_granularities(store))
    cluster_eval(_params(), CFG, store, K_CLS, batch_size=3, levels=scorer)
    assert [c["parents"] for c in scorer.result(None)["consistency"]] == [None, None]
