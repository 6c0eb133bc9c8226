"""Evaluation: cluster predictions and scores on a model with known answers, the linear probe's
gradient, and a tiny end-to-end demo run."""
import json

import numpy as np
import pytest

from omh_ref.jobs import demo
from omh_ref.core import model
from omh_ref.evaluate import predict
from omh_ref.evaluate import probe as probe_mod
from omh_ref.features.store import FeatureStore
from omh_ref.core.errors import InputError
from omh_ref.core.gradcheck import check_vjp
from tests.builders import identity_params, known_world


def test_cluster_eval_recovers_a_known_permutation(tmp_path):
    store, protos = known_world(tmp_path)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    perm = np.array([2, 0, 1])
    res, preds = predict.cluster_eval(identity_params(cfg, protos, perm), cfg, store, n_classes=3, keep=2)
    assert res["miou"] == pytest.approx(100.0) and res["acc"] == pytest.approx(100.0)
    # cluster c is prototype perm[c], so it must be matched to class perm[c]
    assert res["match"].cluster_to_class.tolist() == perm.tolist()
    assert preds.shape == (2, 8, 8)
    assert res["confusion"].sum() == 6 * 64 - 1      # the ignored pixel is not counted


def test_linear_probe_learns_a_separable_world(tmp_path):
    store, protos = known_world(tmp_path, N=8)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = identity_params(cfg, protos, np.arange(3))
    probe = probe_mod.linear_probe(params, store, 3, epochs=60, batch_size=4, lr=5e-2, progress=False, cfg=cfg)
    res = probe_mod.linear_eval(params, probe, store, 3, cfg=cfg)
    assert res["acc"] > 95


def _probe_in_memory(params, cfg, store, n_classes, epochs, batch_size, lr, seed):
    """The probe as it was before it streamed: every code held in memory at once (the reference
    the streaming probe must reproduce)."""
    from omh_ref.core.optim import adam_init, adam_step

    size = predict.label_shape(store)
    Z = np.concatenate([z for _, z in predict.codes(params, store, batch_size, cfg=cfg)])
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(Z.shape[-1])
    probe = {"W": rng.uniform(-bound, bound, (n_classes, Z.shape[-1])).astype(np.float32),
             "b": np.zeros(n_classes, np.float32)}
    state = adam_init(probe)
    for _ in range(epochs):
        order = rng.permutation(store.N)
        for s in range(0, store.N, batch_size):
            idx = np.sort(order[s:s + batch_size])
            lab = store.read_labels(idx).astype(np.int64)
            adam_step(probe, probe_mod.loss_and_grads(probe, Z[idx], lab, size, n_classes)[1], state, lr)
    return probe


def test_the_streaming_probe_reproduces_the_in_memory_one(tmp_path):
    """Cached codes give the same probe bit for bit; recomputed codes within float32 rounding;
    the temporary code file is gone afterwards and the log says which mode ran."""
    import os

    store, protos = known_world(tmp_path, N=11, seed=2)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = model.init_params(cfg, np.random.default_rng(4))
    want = _probe_in_memory(params, cfg, store, 3, epochs=3, batch_size=4, lr=5e-2, seed=7)
    cache = tmp_path / "cache"
    cache.mkdir()
    said = []
    got = probe_mod.linear_probe(params, store, 3, epochs=3, batch_size=4, lr=5e-2, seed=7, progress=False,
                                 cache="auto", cache_dir=cache, say=said.append, cfg=cfg)
    assert all(np.array_equal(got[k], want[k]) for k in want) and "caching the codes" in said[0]
    assert os.listdir(cache) == []
    said.clear()
    fly = probe_mod.linear_probe(params, store, 3, epochs=3, batch_size=4, lr=5e-2, seed=7, progress=False,
                                 cache="none", say=said.append, cfg=cfg)
    for k in want:
        np.testing.assert_allclose(fly[k], want[k], rtol=1e-5, atol=1e-6)
    assert "recomputed from" in said[0]
    with pytest.raises(InputError, match="--probe-cache: expected one of auto, memmap, none"):
        probe_mod.linear_probe(params, store, 3, epochs=1, cache="ram", progress=False, cfg=cfg)


def test_probe_gradient(tmp_path):
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 3, 4, 5))
    lab = rng.integers(0, 3, size=(2, 6, 8))
    lab[0, 0, :3] = 255

    def forward(W, b):
        return probe_mod.loss_and_grads({"W": W, "b": b}, z, lab, (6, 8), 3)   # the grads are the cache

    def backward(v, g):
        return g["W"] * v, g["b"] * v
    assert check_vjp(forward, backward, (rng.standard_normal((3, 5)), rng.standard_normal(3))).passed


def test_checkpoint_feature_mismatch_is_clear(tmp_path):
    store, protos = known_world(tmp_path)
    cfg = model.Config(in_dim=7, dim=5, levels=(3,))
    params = model.init_params(cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="C=5 channels.*expects 7"):
        predict.cluster_eval(params, cfg, store, 3)


def test_tiny_demo_end_to_end(tmp_path):
    opts = demo.DemoOptions(out=str(tmp_path / "demo"), seeds=(0, 1), steps=3, batch_size=4, n_train=12,
                            n_val=6, probe_epochs=1, progress=False)
    rep = demo.run(opts, say=lambda *a: None)
    rows = set(demo.BASE_METHODS["stego"]) | {"STEGO code + k-means"}      # the default table: STEGO's rows
    assert set(rep["methods"]) == rows and demo.KMEANS_OF["STEGO baseline"] == "STEGO code + k-means"
    for m, s in rep["methods"].items():
        assert len(s["cluster_miou"]["values"]) == 2 and 0 <= s["cluster_miou"]["mean"] <= 100
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["methods"] == rep["methods"]
    for png in ("predictions.png", "loss_curves.png", "confusion_OMH.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000
    table = demo.table(rep)
    assert all(m in table for m in rows) and "± " in table
    # every level against its granularity (36 -> parts, 9 -> classes) and the consistency, per method
    assert set(rep["levels"]) == rows and saved["levels"] == rep["levels"]
    # k-means rescores the baseline's own code: its linear probe is the baseline's, its clusters not
    base, km = rep["runs"]["STEGO baseline"], rep["runs"]["STEGO code + k-means"]
    assert [r["linear"] for r in km] == [r["linear"] for r in base] and [r["seed"] for r in km] == [0, 1]
    omh = rep["levels"]["OMH"]
    assert [e["granularity"] for e in omh["levels"]] == ["parts", "parts", "classes"]
    assert len(omh["consistency"]) == 2 and "L0 36->parts" in table and "consistency L0->L1" in table
    assert [e["granularity"] for e in rep["levels"]["STEGO baseline"]["levels"]] == ["classes"]


def test_the_demo_with_every_base_has_each_base_with_and_without_omh(tmp_path):
    """--bases all: SmooSeg's rows beside STEGO's, its models SmooSeg's (silu head, dim 64, its
    learning rates), its base alone predicting with its teacher and rescored by k-means."""
    from click.testing import CliRunner

    from omh_ref.train import checkpoint
    from omh_ref_cli.main import main

    assert demo.methods_of("all") == (*demo.BASE_METHODS["stego"], *demo.BASE_METHODS["smooseg"],
                                      *demo.BASE_METHODS["hp"])
    assert demo.methods_of("smooseg") == ("OMH on SmooSeg", "SmooSeg baseline")
    assert demo.methods_of("hp,stego") == (*demo.BASE_METHODS["stego"], "OMH on HP", "HP baseline")
    with pytest.raises(InputError, match="--bases: expected 'all' or base names from stego, smooseg, hp, got 'dino'"):
        demo.methods_of("dino")
    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--seeds", "0", "--steps", "2",
                                    "--batch-size", "4", "--n-train", "8", "--n-val", "4", "--probe-epochs", "1",
                                    "--bases", "smooseg", "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert set(rep["methods"]) == {"OMH on SmooSeg", "SmooSeg baseline", "SmooSeg code + k-means"}
    for name, omh in (("OMH_on_SmooSeg", True), ("SmooSeg_baseline", False)):
        ck = checkpoint.load(tmp_path / "d" / "runs" / f"{name}-seed0" / "ckpt.npz")
        cfg, opts = ck["config"], ck["info"]["options"]
        assert (cfg.base, cfg.omh, cfg.head_activation, cfg.dim) == ("smooseg", omh, "silu", 64)
        assert (opts["lr"], opts["lr_clusters"], opts["batch_size"]) == (1e-4, 5e-4, 4)   # the demo's batch
        assert "G" in ck["params"]


def test_the_demo_trains_hp_on_its_synthetic_inputs(tmp_path):
    """--bases hp: the train split gets attn.npy and feats_aug.npy (synthetic.write(hp=True)), the
    val split neither; HP's runs are HP's (relu head, dim 512, its learning rates, AdamW decay and
    clipping), the base alone rescored by k-means; a STEGO-only demo writes no HP inputs."""
    from click.testing import CliRunner

    from omh_ref.train import checkpoint
    from omh_ref_cli.main import main

    res = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d"), "--seeds", "0", "--steps", "2",
                                    "--batch-size", "2", "--n-train", "6", "--n-val", "3", "--probe-epochs", "1",
                                    "--bases", "hp", "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "d" / "report.json").read_text())
    assert set(rep["methods"]) == {"OMH on HP", "HP baseline", "HP code + k-means"}
    data = tmp_path / "d" / "data"
    assert (data / "train" / "attn.npy").is_file() and (data / "train" / "feats_aug.npy").is_file()
    assert not (data / "val" / "attn.npy").exists()
    for name, omh in (("OMH_on_HP", True), ("HP_baseline", False)):
        ck = checkpoint.load(tmp_path / "d" / "runs" / f"{name}-seed0" / "ckpt.npz")
        cfg, opts = ck["config"], ck["info"]["options"]
        assert (cfg.base, cfg.omh, cfg.head_activation, cfg.dim) == ("hp", omh, "relu", 512)
        assert (cfg.warmup, cfg.renew_interval) == (50, 20)      # HP's Cityscapes schedule (demo.HP_SHORT)
        assert (opts["lr"], opts["lr_clusters"], opts["batch_size"]) == (5e-4, 5e-3, 2)
        assert "PW" in ck["params"]
    assert demo.needs_hp_inputs(("OMH", "HP baseline")) and not demo.needs_hp_inputs(demo.BASE_METHODS["stego"])


def test_eval_cli_prints_tables_and_writes_json_and_pngs(tmp_path):
    from click.testing import CliRunner

    from omh_ref.train import checkpoint
    from omh_ref.core.optim import adam_init
    from omh_ref_cli.main import main

    store, protos = known_world(tmp_path, N=8)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = identity_params(cfg, protos, np.array([1, 2, 0]))
    params["M0"] = np.repeat(protos, 2, axis=0).astype(np.float32) + 0.01
    ck = tmp_path / "ckpt.npz"
    checkpoint.save(ck, params, adam_init(params), 0, np.random.default_rng(0), cfg)
    names = tmp_path / "names.txt"
    names.write_text("red\ngreen\nblue\n")
    args = ["eval", "--checkpoint", str(ck), "--features", str(store.path), "--labels", str(tmp_path / "labels.npy"),
            "--train-features", str(store.path), "--train-labels", str(tmp_path / "labels.npy"), "--n-classes", "3",
            "--class-names", str(names), "--probe-epochs", "2", "--json", str(tmp_path / "s.json"),
            "--out", str(tmp_path / "pics"), "--quiet"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "cluster    stego      100.00  100.00" in res.output and "cluster    strict     100.00  100.00" in res.output
    assert "green" in res.output and "L1:0" in res.output
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["cluster"]["miou"] == pytest.approx(100.0) and "linear" in saved
    assert saved["cluster"]["protocol"] == saved["linear"]["protocol"] == "stego"
    assert saved["cluster"]["strict"]["miou"] == pytest.approx(100.0)
    assert saved["cluster"]["match"]["cluster_to_class"] == [1, 2, 0]
    for png in ("confusion_cluster.png", "predictions.png", "hierarchy_L0_L1.png"):
        assert (tmp_path / "pics" / png).is_file()
    # each parent absorbs the two fine clusters built from its prototype
    assert "L1:0 [green]" in res.output and "L0: 2 (" in res.output


def test_both_extra_cluster_protocols_are_named_in_json_and_table():
    """4 clusters, 2 classes: cluster 3 (an id >= n_classes) holds 2 pixels of class 1. STEGO's
    protocol drops them; strict counts them against the unmatched pseudo-class."""
    from omh_ref.evaluate import metrics
    from omh_ref.jobs import evaluate as job

    conf = np.array([[5, 1], [0, 4], [0, 0], [0, 2]])
    res = predict.scores_json(metrics.scores(conf))
    assert res["protocol"] == "stego" and res["pixels"] == 10 and res["strict"]["pixels"] == 12
    assert res["miou"] == pytest.approx(100 * (5 / 6 + 4 / 5) / 2) and res["acc"] == pytest.approx(90.0)
    assert res["iou_unmatched"] is None and res["strict"]["iou_unmatched"] == 0.0
    assert res["strict"]["miou"] == pytest.approx(100 * (5 / 6 + 4 / 7 + 0) / 3)
    assert res["strict"]["acc"] == pytest.approx(75.0)
    table = job.format_table({"cluster": res, "class_names": ["a", "b"],
                              "hierarchy": {"text": [], "marginals_text": "uniform marginals, as trained"}})
    assert f"cluster    stego      {res['miou']:6.2f}   90.00" in table
    assert f"cluster    strict     {res['strict']['miou']:6.2f}   75.00" in table
    assert metrics.PROTOCOLS["stego"] in table and metrics.PROTOCOLS["strict"] in table
    assert "unmatched clusters (stego): [2, 3]; strict: [2, 3]" in table


def test_eval_cli_bad_input(tmp_path):
    from click.testing import CliRunner

    from omh_ref.train import checkpoint
    from omh_ref.core.optim import adam_init
    from omh_ref_cli.main import main

    store, protos = known_world(tmp_path)
    cfg = model.Config(in_dim=7, dim=5, levels=(3,))
    params = model.init_params(cfg, np.random.default_rng(0))
    ck = tmp_path / "ckpt.npz"
    checkpoint.save(ck, params, adam_init(params), 0, np.random.default_rng(0), cfg)
    base = ["eval", "--checkpoint", str(ck), "--features", str(store.path), "--quiet"]
    res = CliRunner().invoke(main, base + ["--labels", str(tmp_path / "labels.npy")])
    assert res.exit_code == 2 and "channels" in res.output and "Traceback" not in res.output
    np.save(tmp_path / "short.npy", np.zeros((2, 8, 8), np.uint8))
    res = CliRunner().invoke(main, base + ["--labels", str(tmp_path / "short.npy")])
    assert res.exit_code == 2 and "label maps" in res.output


def _out_of_range(lab):
    lab = lab.copy()
    lab[2, 3, 3] = 7
    return lab


@pytest.mark.parametrize("make,match", [
    (_out_of_range, r"bad\.npy.*7"),
    (lambda lab: np.full_like(lab, 255), r"bad\.npy: no labelled pixels"),
], ids=["label-out-of-range", "all-ignored"])
def test_bad_labels_name_the_file(tmp_path, make, match):
    store, protos = known_world(tmp_path)
    np.save(tmp_path / "bad.npy", make(np.load(tmp_path / "labels.npy")))
    store = FeatureStore(tmp_path / "feats.npy", labels=tmp_path / "bad.npy")
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    with pytest.raises(ValueError, match=match):
        predict.cluster_eval(identity_params(cfg, protos, np.arange(3)), cfg, store, 3)


def test_flip_averaging_uses_the_flipped_file(tmp_path):
    store, protos = known_world(tmp_path)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = identity_params(cfg, protos, np.arange(3))
    # a correctly flipped copy leaves perfect predictions perfect ...
    f = np.load(tmp_path / "feats.npy")
    np.save(tmp_path / "flip.npy", f[:, :, ::-1].copy())
    res, _ = predict.cluster_eval(params, cfg, store, 3, flipped=FeatureStore(tmp_path / "flip.npy"))
    assert res["miou"] == pytest.approx(100.0)
    # ... and an unflipped copy (the flip undone twice) is averaged in and hurts
    np.save(tmp_path / "same.npy", f)
    res, _ = predict.cluster_eval(params, cfg, store, 3, flipped=FeatureStore(tmp_path / "same.npy"))
    assert res["miou"] < 100.0


def _usage_world(tmp_path, marginals="usage"):
    store, protos = known_world(tmp_path, N=7)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 4, 3), tau=0.5, marginals=marginals)
    params = model.init_params(cfg, np.random.default_rng(3), dtype=np.float64)
    return store, cfg, params


def test_usage_is_streamed_and_gives_the_trained_losss_plan(tmp_path):
    """The eval hierarchy with usage marginals is the plan the training loss computes when the
    whole split is its batch (hierarchy.forward with marginals='usage' on every code at once),
    while the usage itself is summed batch by batch (3 images at a time, 7 images)."""
    from omh_ref.core.losses import hierarchy
    from omh_ref.core.ops import cosine, log_softmax
    from omh_ref.evaluate.hierarchy import UsageAccumulator, hierarchy_plans

    store, cfg, params = _usage_world(tmp_path)
    usage = UsageAccumulator(cfg)
    res, _ = predict.cluster_eval(params, cfg, store, 3, batch_size=3, usage=usage)
    assert (usage.images, usage.pixels) == (7, 7 * 16)
    plans = hierarchy_plans(params, cfg, usage.means())
    z = predict.code(params, store.read(np.arange(7)).astype(np.float64), cfg).reshape(-1, 5)     # all codes
    logp = [log_softmax.forward(cosine.forward(z, params[f"M{i}"])[0], cfg.tau)[0] for i in range(3)]
    for i, A in enumerate(plans):
        np.testing.assert_allclose(usage.means()[i], np.exp(logp[i]).mean(0), rtol=1e-12)
        _, cache = hierarchy.forward(logp[i], logp[i + 1], params[f"M{i}"], params[f"M{i + 1}"],
                                     eps=cfg.eps, n_iters=cfg.sinkhorn_iters, marginals="usage")
        np.testing.assert_allclose(A, cache.A, rtol=1e-9, atol=1e-14)         # A = diag(1/a) T
        np.testing.assert_allclose(A.sum(1), 1.0, atol=1e-6)
    uniform = hierarchy_plans(params, cfg)
    assert np.abs(uniform[0] - plans[0]).max() > 1e-3       # the marginals matter for this model


@pytest.mark.parametrize("marginals,said", [("usage", "usage marginals as trained: mean assignments over the 7 "
                                                       "evaluation images"),
                                            ("uniform", "uniform marginals, as trained")])
def test_eval_says_which_marginals_the_hierarchy_has(tmp_path, marginals, said):
    from omh_ref.core.optim import adam_init
    from omh_ref.jobs import evaluate as job
    from omh_ref.train import checkpoint

    store, cfg, params = _usage_world(tmp_path, marginals)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    checkpoint.save(tmp_path / "ck.npz", params, adam_init(params), 0, np.random.default_rng(0), cfg)
    result = job.run(job.EvalOptions(checkpoint=str(tmp_path / "ck.npz"), features=str(store.path),
                                     labels=str(tmp_path / "labels.npy"), n_classes=3, batch_size=3,
                                     json=str(tmp_path / "s.json"), out=str(tmp_path / "pics"), progress=False))
    saved = json.loads((tmp_path / "s.json").read_text())["hierarchy"]
    assert saved["marginals"] == marginals and saved["trained_with"] == marginals and saved["marginals_text"] == said
    assert (saved["usage"] is None) == (marginals == "uniform")
    if marginals == "usage":
        assert [len(u) for u in saved["usage"]] == [6, 4, 3] and all(abs(sum(u) - 1) < 1e-5 for u in saved["usage"])
    assert f"share of the child's mass; {said}):" in job.format_table(result)
    assert (tmp_path / "pics" / "hierarchy.txt").read_text().startswith(f"# {said}\n")


def test_hierarchy_text_names_the_eval_levels_clusters():
    """The matched class names go on the clusters of the level they were matched at."""
    from omh_ref.evaluate.hierarchy import hierarchy_text

    A0 = np.array([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])   # 4 -> 3
    A1 = np.array([[1.0, 0], [0, 1.0], [0, 1.0]])                         # 3 -> 2
    names = ["sky", "road", "car", "tree"]
    last = hierarchy_text([A0, A1], np.array([1, 0]), names)
    assert last[3].startswith("L2:0 [road]") and last[4].startswith("L2:1 [sky]")
    assert "[" not in "".join(last[:3])                                   # level 1 is not named
    mid = hierarchy_text([A0, A1], np.array([2, 3, 1]), names, named_level=1)
    assert [ln.split(" <-")[0].strip() for ln in mid[:3]] == ["L1:0 [car]", "L1:1 [tree]", "L1:2 [road]"]
    assert mid[3].startswith("L2:0 ") and "[" not in mid[3].split(" <-")[0]
    first = hierarchy_text([A0, A1], np.array([0, 0, 3, 1]), names, named_level=0)
    assert first[0].endswith("<- L0: 0 [sky] (1.00), 1 [sky] (1.00)") and first[2].endswith("3 [road] (1.00)")


def test_linear_probe_refuses_invalid_or_absent_training_labels(tmp_path):
    """A value that is neither a class nor ignore was silently treated as ignore; a split with no
    labelled pixel trained nothing and still printed a score."""
    store, protos = known_world(tmp_path, N=4)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = identity_params(cfg, protos, np.arange(3))
    lab = np.load(tmp_path / "labels.npy")
    lab[2, 3, 3] = 77
    np.save(tmp_path / "bad.npy", lab)
    with pytest.raises(InputError, match=r"bad.npy: label value 77 is neither a class in \[0, 3\) nor ignore"):
        probe_mod.linear_probe(params, FeatureStore(store.path, labels=tmp_path / "bad.npy"), 3, epochs=1,
                               progress=False, cfg=cfg)
    np.save(tmp_path / "none.npy", np.full_like(lab, 255))
    with pytest.raises(InputError, match=r"none.npy: no labelled pixels to train the linear probe on"):
        probe_mod.linear_probe(params, FeatureStore(store.path, labels=tmp_path / "none.npy"), 3, epochs=1,
                               progress=False, cfg=cfg)


def test_a_non_finite_probe_gradient_stops_the_probe_at_the_epochs_end_in_one_line(tmp_path, monkeypatch):
    """The probe reads its divergence flag once an epoch (not once a step): a NaN gradient in
    the second epoch is one InputError naming the epoch and the features, and the first epoch's
    finite steps ran."""
    store, protos = known_world(tmp_path, N=4)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = identity_params(cfg, protos, np.arange(3))
    real, calls = probe_mod.loss_and_grads, []

    def poisoned(*a, **k):
        loss, grads = real(*a, **k)
        calls.append(1)
        if len(calls) == 3:                       # epoch 2 of 2 steps an epoch (N=4, batch 2)
            grads["W"] = grads["W"] * np.nan
        return loss, grads

    monkeypatch.setattr(probe_mod, "loss_and_grads", poisoned)
    with pytest.raises(InputError, match=r"linear probe: non-finite gradients in epoch 2 on the codes of .*feats.npy"):
        probe_mod.linear_probe(params, store, 3, epochs=3, batch_size=2, progress=False, cfg=cfg)
    assert len(calls) == 4                        # it stopped at the end of epoch 2


@pytest.mark.parametrize("flag", ["--out", "--save-masks", "--json"])
def test_eval_refuses_a_folder_another_process_writes(tmp_path, flag):
    """eval holds the lock of every folder it writes (--out, --save-masks, --json's folder):
    another writer there refuses it before it writes anything, in one line naming the holder."""
    from click.testing import CliRunner

    from omh_ref.core.optim import adam_init
    from omh_ref.train import checkpoint
    from omh_ref_cli.main import main

    from tests.helpers import lock_holder

    store, protos = known_world(tmp_path, N=4)
    cfg = model.Config(in_dim=5, dim=5, levels=(6, 3))
    params = identity_params(cfg, protos, np.array([1, 2, 0]))
    ck = tmp_path / "ckpt.npz"
    checkpoint.save(ck, params, adam_init(params), 0, np.random.default_rng(0), cfg)
    busy = tmp_path / "busy"
    target = str(busy / "s.json") if flag == "--json" else str(busy)
    p = lock_holder(busy, "train")
    try:
        res = CliRunner().invoke(main, ["eval", "--checkpoint", str(ck), "--features", str(store.path), "--labels",
                                        str(tmp_path / "labels.npy"), "--n-classes", "3", flag, target, "--quiet"])
    finally:
        p.kill()
        p.wait()
    assert res.exit_code == 2 and f"another omh-ref train (pid {p.pid}" in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1
    assert sorted(x.name for x in busy.iterdir()) == [".omh-ref.lock"]      # nothing written there
