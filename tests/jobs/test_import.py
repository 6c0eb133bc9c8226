"""``omh-ref import``: the peers' released checkpoints in, evaluated here.

Checkpoints are built in each peer's key layout with random weights (tests/builders.py: the peers'
Lightning modules rendered in torch from their definitions, a tiny DINO ViT for STEGO, a tiny
DINOv2 for SmooSeg, the hyper-parameters as a DictConfig that pickles with omegaconf's global
names), saved as Lightning saves them, imported, and checked against the torch rendering: the
cluster and linear predictions, eval's scores, the exported backbone and the features it makes;
then the one-line refusals."""
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.core.ops import linear, resize
from omh_ref.evaluate import metrics
from omh_ref.evaluate.predict import cluster_logits, code, scores_json
from omh_ref.jobs import peers as peers_mod
from omh_ref.jobs import torch_file
from omh_ref.jobs.evaluate import EvalOptions
from omh_ref.jobs.evaluate import run as eval_run
from omh_ref.train import checkpoint
from omh_ref_cli.main import main
from tests import layouts
from tests.builders import (CONFIG_LIST, SMOOSEG_CFG, STEGO_CFG, hp_checkpoint, peer_module, random_vit,
                            save_lightning, tiny_backbones, tiny_dino)

torch = pytest.importorskip("torch")

N_CLASSES = 4


def _ok(args):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, (args, res.output)
    return res.output


def _one_line_error(args, *wanted):
    """The command fails with exit 2 and one ``error:`` line (the last) holding every ``wanted``."""
    res = CliRunner().invoke(main, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and "Traceback" not in res.output, (args, res.output)
    assert [ln for ln in lines if ln.startswith("error:")] == [lines[-1]], res.output
    for w in wanted:
        assert w in lines[-1], (w, lines[-1])
    return lines[-1]


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """A STEGO checkpoint (tiny DINO ViT/8, D = 8, 4 classes + 2 extra clusters, a linear probe)
    and a SmooSeg one (tiny DINOv2 ViT/14, 4 clusters, teacher apart from the student), each
    imported; features and labels at the feature grid and at twice its size."""
    d = tmp_path_factory.mktemp("import")
    out = {}
    with tiny_dino(), tiny_backbones():
        for peer, family, patch, res, cfg, extra in (("stego", "dino", 8, 32, STEGO_CFG, 2),
                                                     ("smooseg", "dinov2", 14, 56, SMOOSEG_CFG, 0)):
            vit = random_vit(family, "vit_tiny", patch, 0, seed=3)
            lit = peer_module(peer, vit, n_classes=N_CLASSES, dim=8, extra=extra, seed=1)
            ck = save_lightning(lit, d / f"{peer}.ckpt", peer, cfg, N_CLASSES)
            text = _ok(["import", str(ck), "--out", str(d / peer), "--resolution", str(res)])
            out[peer] = SimpleNamespace(vit=vit, lit=lit, ckpt=ck, dir=d / peer, res=res, text=text,
                                        model=d / peer / f"{family}_vitt{patch}_{res}.onnx")
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3, 4, 5, 32)).astype(np.float32)
    np.save(d / "feats.npy", feats)
    for name, (H, W) in (("labels.npy", (4, 5)), ("labels2.npy", (8, 10))):
        lab = rng.integers(0, N_CLASSES, (3, H, W)).astype(np.uint8)
        lab[0, 0, :2] = 255
        np.save(d / name, lab)
    return SimpleNamespace(d=d, feats=feats, **out)


def _torch_predict(lit, feats, size):
    with torch.no_grad():
        c, lin = lit.predict(torch.from_numpy(feats).permute(0, 3, 1, 2), size)
    return c.numpy(), None if lin is None else lin.numpy()


def _omh_predict(ckpt, feats, size, upsample="logits"):
    params, cfg = checkpoint.load_params(ckpt)
    z = code(params, feats, cfg)
    clusters = np.asarray(cluster_logits(params, cfg, z, size, upsample)).argmax(-1)
    probe = checkpoint.stored_probe(ckpt)
    lin = None
    if probe is not None:
        lin = np.asarray(resize.forward(linear.forward(z, probe["W"], probe["b"])[0], size)[0]).argmax(-1)
    return clusters, lin


def test_stego_import_predicts_as_stegos_probes(peers):
    """The cluster probe and the linear probe give STEGO's predictions on the same features, at
    the feature grid exactly; at twice its size the linear probe still exactly (upsampling and a
    1x1 conv commute), the cluster probe exactly when the code is upsampled first (``--upsample
    code``, STEGO's order) and not quite with omh-ref's default (the logits upsampled:
    docs/DECISIONS.md)."""
    s = peers.stego
    params, cfg = checkpoint.load_params(s.dir / "ckpt.npz")
    assert (cfg.base, cfg.omh, cfg.levels, cfg.head_activation, cfg.in_dim, cfg.dim) == ("stego", False, (6,), "relu",
                                                                                         32, 8)
    assert (cfg.shift_neg, cfg.shift_inter, cfg.shift_intra) == (0.46, 0.12, 0.18)        # read from the DictConfig
    for size in ((4, 5), (8, 10)):
        want_c, want_l = _torch_predict(s.lit, peers.feats, size)
        got_c, got_l = _omh_predict(s.dir / "ckpt.npz", peers.feats, size)
        assert len(np.unique(want_c)) >= 3 and len(np.unique(want_l)) >= 3      # the probes say something
        np.testing.assert_array_equal(got_l, want_l)
        np.testing.assert_array_equal(_omh_predict(s.dir / "ckpt.npz", peers.feats, size, "code")[0], want_c)
        if size == (4, 5):
            np.testing.assert_array_equal(got_c, want_c)
        else:   # the two orders disagree near boundaries: 13 % of these random features' pixels
            assert 0.8 < (got_c == want_c).mean() < 1, (got_c == want_c).mean()


def test_smooseg_import_predicts_from_its_teacher(peers):
    """SmooSeg predicts with its teacher (global) centres, and so does the import: equal to the
    torch rendering, and unlike the student's predictions."""
    s = peers.smooseg
    params, cfg = checkpoint.load_params(s.dir / "ckpt.npz")
    assert (cfg.base, cfg.omh, cfg.levels, cfg.head_activation) == ("smooseg", False, (4,), "silu")
    assert (cfg.shift_intra, cfg.teacher_tau, cfg.ema_alpha) == (0.32, 0.1, 0.998)
    np.testing.assert_array_equal(params["G"], s.lit.prediction.global_clusters.detach().numpy())
    want, _ = _torch_predict(s.lit, peers.feats, (4, 5))
    got, lin = _omh_predict(s.dir / "ckpt.npz", peers.feats, (4, 5))
    np.testing.assert_array_equal(got, want)
    assert lin is None
    with torch.no_grad():
        student = s.lit.predict(torch.from_numpy(peers.feats).permute(0, 3, 1, 2), (4, 5), "local_clusters")[0]
    assert (student.numpy() != want).any()


@pytest.mark.parametrize("peer,labels", [("stego", "labels.npy"), ("stego", "labels2.npy"),
                                         ("smooseg", "labels.npy"), ("smooseg", "labels2.npy")])
def test_eval_scores_the_import_as_the_torch_rendering_is_scored(peers, peer, labels):
    """eval's cluster scores (both protocols, per class, the matching) are those of the torch
    rendering's predictions under omh-ref's metrics, at the feature grid and, with ``--upsample
    code``, at twice its size; STEGO's stored linear probe likewise with the identity mapping,
    untrained."""
    s = getattr(peers, peer)
    lab = np.load(peers.d / labels)
    want_c, want_l = _torch_predict(s.lit, peers.feats, lab.shape[1:])
    res = eval_run(EvalOptions(checkpoint=str(s.dir / "ckpt.npz"), features=str(peers.d / "feats.npy"),
                               labels=str(peers.d / labels), n_classes=N_CLASSES, stored_probe=peer == "stego",
                               upsample="code", progress=False), say=lambda m: None)
    K = 6 if peer == "stego" else 4
    assert res["cluster"] == scores_json(metrics.scores(metrics.confusion(want_c, lab, K, N_CLASSES)))
    if peer == "stego":
        conf = metrics.confusion(want_l, lab, N_CLASSES, N_CLASSES)
        assert res["linear"] == scores_json(metrics.scores(conf, metrics.identity_match(N_CLASSES, N_CLASSES)))
        assert res["linear_probe"] == "stored in the checkpoint"
    else:
        assert "linear" not in res


def test_the_exported_backbone_is_the_checkpoints_and_eval_takes_its_features(peers, tmp_path):
    """The ONNX export equals the checkpoint's ViT in torch (<= 1e-4), the checkpoint records its
    weights' hash, eval and segment take features and images through it, and refuse the other
    peer's backbone in one line."""
    from omh_ref.extract import export_dino

    layouts.folder(tmp_path, n=3, labels=True, nested=False)
    for peer in ("stego", "smooseg"):
        s = getattr(peers, peer)
        x = export_dino.random_batch(s.res, seed=5)
        got = export_dino.ort_session(s.model).run(["features"], {"images": x})[0]
        with torch.no_grad():
            want = s.vit(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
        rec = checkpoint.backbone_of(s.dir / "ckpt.npz")
        assert rec["weights_sha256"] == export_dino.weights_sha256(s.vit) and rec["random_init"] is False
        manifest = json.loads((s.dir / "manifest.json").read_text())["models"]
        assert [m["file"] for m in manifest] == [s.model.name] and manifest[0]["weights_sha256"] == rec["weights_sha256"]
        _ok(["extract", "--model", str(s.model), "--images", str(tmp_path / "images"), "--labels",
             str(tmp_path / "labels"), "--out", str(tmp_path / peer), "--quiet"])
    st = peers.stego
    out = _ok(["eval", "--checkpoint", str(st.dir / "ckpt.npz"), "--features", str(tmp_path / "stego" / "feats.npy"),
               "--n-classes", "4", "--stored-probe", "--quiet"])
    assert "linear" in out and "stored in the checkpoint" in out and "warning" not in out
    _one_line_error(["eval", "--checkpoint", str(st.dir / "ckpt.npz"), "--features",
                     str(tmp_path / "smooseg" / "feats.npy"), "--n-classes", "4", "--quiet"],
                    "another patch size", "--allow-backbone-mismatch")
    _ok(["segment", "--model", str(peers.smooseg.model), "--checkpoint", str(peers.smooseg.dir / "ckpt.npz"),
         "--images", str(tmp_path / "images"), "--out", str(tmp_path / "masks"), "--quiet"])
    assert len(list((tmp_path / "masks").glob("*.clusters.png"))) == 3


def test_the_import_records_where_it_came_from(peers):
    s = peers.stego
    rec = json.loads((s.dir / "import.json").read_text())
    assert rec["peer"] == "stego" and rec["read_from"].startswith("mhamilton723/STEGO@eb4d6b5")
    assert rec["source_sha256"] == checkpoint.load(s.dir / "ckpt.npz")["info"]["imported"]["source_sha256"]
    assert rec["hyper_parameters"]["neg_inter_shift"] == 0.46 and rec["lightning"]["global_step"] == 1200
    # the config's ListConfig (torch.save's pickle of it) is recorded as the plain list it holds
    assert rec["hyper_parameters"]["crop_sizes"] == CONFIG_LIST["crop_sizes"] == [224, [0.5, "five"], {"crop": None}]
    assert rec["keys"]["left_out"] == ["decoder.bias", "decoder.weight", "train_cluster_probe.clusters"]
    assert "omh-ref eval --checkpoint" in s.text and "--stored-probe" in s.text
    # a second import of the same file into the same folder is a redo, of another file a refusal
    with tiny_dino():
        _ok(["import", str(s.ckpt), "--out", str(s.dir), "--resolution", "32"])
    _one_line_error(["import", str(peers.smooseg.ckpt), "--out", str(s.dir)], "--overwrite")


def test_refusals_are_one_line(peers, tmp_path, monkeypatch):
    s = peers.stego
    with tiny_dino():
        # an unknown layout
        torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}, "epoch": 1}, tmp_path / "other.ckpt")
        _one_line_error(["import", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "o")],
                        str(tmp_path / "other.ckpt"), "unknown checkpoint layout", "encoder.weight")
        # missing keys
        state = {k: v for k, v in s.lit.state_dict().items() if k not in ("net.cluster2.2.bias", "linear_probe.weight")}
        save_lightning(s.lit, tmp_path / "cut.ckpt", "stego", STEGO_CFG, N_CLASSES, state=state)
        _one_line_error(["import", str(tmp_path / "cut.ckpt"), "--out", str(tmp_path / "c")],
                        "a STEGO checkpoint without net.cluster2.2.bias, linear_probe.weight")
        # a global outside the allowed ones: refused, and nothing it names ran
        made = tmp_path / "made-by-the-pickle"

        class Runs:
            def __reduce__(self):
                return (os.mkdir, (str(made),))

        torch.save({"state_dict": s.lit.state_dict(), "x": Runs()}, tmp_path / "evil.ckpt")
        _one_line_error(["import", str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "e")],
                        "refused", f"{os.mkdir.__module__}.mkdir")
        assert not made.exists()
        # not a torch zip
        (tmp_path / "old.pth").write_bytes(b"\x80\x02legacy")
        _one_line_error(["import", str(tmp_path / "old.pth"), "--out", str(tmp_path / "l")], "not a zip archive")
        # a setting that asks for another model
        save_lightning(s.lit, tmp_path / "kk.ckpt", "stego", {**STEGO_CFG, "dino_feat_type": "KK"}, N_CLASSES)
        _one_line_error(["import", str(tmp_path / "kk.ckpt"), "--out", str(tmp_path / "k")], "dino_feat_type = 'KK'")
        # without torch
        monkeypatch.setitem(sys.modules, "torch", None)
        _one_line_error(["import", str(s.ckpt), "--out", str(tmp_path / "t")], "needs torch", "omh-ref[torch]")
        monkeypatch.undo()
    # an import is evaluated, not resumed; SmooSeg's has no linear probe to score
    _one_line_error(["train", "--resume", str(s.dir / "ckpt.npz"), "--quiet"], "imported from STEGO", "resume")
    _one_line_error(["eval", "--checkpoint", str(peers.smooseg.dir / "ckpt.npz"), "--features",
                     str(peers.d / "feats.npy"), "--labels", str(peers.d / "labels.npy"), "--n-classes", "4",
                     "--stored-probe", "--quiet"], "holds no linear probe")


def test_the_reader_rebuilds_what_torch_saved(tmp_path):
    """Tensors of every dtype the peers store, views with offsets and strides, shared storages,
    bfloat16 (widened exactly), a state dict's metadata, NumPy scalars and bytes; a tensor that
    would read past its storage is refused."""
    from collections import OrderedDict

    x = torch.randn(5, 6)
    m = torch.nn.Conv2d(3, 4, 1)
    obj = {"sd": m.state_dict(), "t": x.t(), "view": x[1:3, 2:], "bf16": x.to(torch.bfloat16), "half": x.half(),
           "long": torch.arange(7), "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.5),
           "param": torch.nn.Parameter(torch.ones(2)), "empty": torch.zeros(0, 3), "shared": [x, x[0]],
           "np": np.float32(2.5), "bytes": b"ab", "od": OrderedDict(a=1)}
    torch.save(obj, tmp_path / "a.pt")
    got = torch_file.load(tmp_path / "a.pt")
    for k in ("t", "view", "bf16", "half", "long", "bool", "scalar", "param", "empty"):
        want = obj[k].detach().float().numpy() if k == "bf16" else obj[k].detach().numpy()
        assert got[k].dtype == want.dtype and np.array_equal(got[k], want), k
    assert np.array_equal(got["shared"][1], x[0].numpy()) and isinstance(got["sd"], OrderedDict)
    assert hasattr(got["sd"], "_metadata") and got["np"] == 2.5 and got["bytes"] == b"ab" and got["od"] == {"a": 1}
    base = np.arange(10, dtype=np.float32)
    assert np.array_equal(torch_file._strided(base, 2, (2, 3), (3, 1)), base[2:8].reshape(2, 3))
    with pytest.raises(torch_file.Unreadable, match="reaches element 10"):
        torch_file._strided(base, 1, (2, 3), (5, 2))


# --------------------------------------------------------------------------------------------------
# HP: a plain torch.save dict of three state dicts (tests/builders.py hp_checkpoint)
# --------------------------------------------------------------------------------------------------
HP_EXTRA = 1     # HP trains with extra_clusters 0 (J:42); one here, so K and n_classes are read apart


@pytest.fixture(scope="module")
def hp(peers, tmp_path_factory):
    """An HP checkpoint (tiny DINO ViT/8, D = 8, 4 classes + 1 extra cluster, a linear probe, the
    moving-average head apart from the live one), imported without naming its data set."""
    d = tmp_path_factory.mktemp("hp")
    with tiny_dino():
        vit = random_vit("dino", "vit_tiny", 8, 0, seed=4)
        model, ck = hp_checkpoint(vit, d / "hp.pth", n_classes=N_CLASSES, dim=8, extra=HP_EXTRA, seed=2)
        text = _ok(["import", str(ck), "--out", str(d / "hp"), "--resolution", "32"])
    return SimpleNamespace(vit=vit, model=model, ckpt=ck, dir=d / "hp", text=text, d=d,
                           onnx=d / "hp" / "dino_vitt8_32.onnx")


def _conv2d(t):
    return t.detach().numpy()[:, :, 0, 0]


def test_hp_import_holds_hps_head_probes_and_moving_average_head(hp):
    """The live head, the cluster probe as M0, the linear probe as probe_W/probe_b, the EMA
    branches as the hp base's teacher keys (not the live ones); project_head drawn as the hp base
    draws it; the config HP's base alone, its sizes from the weights, the rest the hp base's
    defaults (said so)."""
    from omh_ref.core import bases
    from omh_ref.core.bases import hp as hp_base

    params, cfg = checkpoint.load_params(hp.dir / "ckpt.npz")
    assert (cfg.base, cfg.omh, cfg.levels, cfg.head_activation, cfg.in_dim, cfg.dim) == ("hp", False, (5,), "relu",
                                                                                         32, 8)
    assert {k: getattr(cfg, k) for k in hp_base.DEFAULTS if k != "dim"} == \
        {k: v for k, v in hp_base.DEFAULTS.items() if k != "dim"}
    net = hp.model.net
    for key, (branch, i) in {"W1": ("cluster1", 0), "W2": ("cluster2", 0), "W3": ("cluster2", 2)}.items():
        live, ema = getattr(net, branch)[i], getattr(net, "ema_model" + branch[-1])[i]
        np.testing.assert_array_equal(params[key], _conv2d(live.weight))
        np.testing.assert_array_equal(params["b" + key[1]], live.bias.detach().numpy())
        np.testing.assert_array_equal(params["E" + key], _conv2d(ema.weight))
        np.testing.assert_array_equal(params["Eb" + key[1]], ema.bias.detach().numpy())
        assert not np.array_equal(params["E" + key], params[key])
    assert set(peers_mod.HP.teacher) == set(bases.teacher_keys(hp_base))
    np.testing.assert_array_equal(params["M0"], hp.model.cluster_probe.clusters.detach().numpy())
    probe = checkpoint.stored_probe(hp.dir / "ckpt.npz")
    np.testing.assert_array_equal(probe["W"], _conv2d(hp.model.linear_probe.weight))
    drawn = hp_base.new_params(cfg, np.random.default_rng(0), np.float32)
    assert all(np.array_equal(params[k], drawn[k]) for k in ("PW", "Pb"))
    assert checkpoint.load(hp.dir / "ckpt.npz")["step"] == 1500
    assert "holds no training settings" in hp.text and "supcon_tau 0.8" in hp.text and "--dataset" in hp.text


def test_hp_import_predicts_as_hps_evaluation(hp, peers):
    """HP evaluates the live code upsampled to the labels before both probes (run.py lines
    361-382): with ``--upsample code`` the import's cluster and linear predictions equal the
    torch rendering's at the feature grid and at twice its size."""
    for size in ((4, 5), (8, 10)):
        with torch.no_grad():
            want_c, want_l = (t.numpy() for t in hp.model.predict(torch.from_numpy(peers.feats).permute(0, 3, 1, 2),
                                                                  size))
        got_c, got_l = _omh_predict(hp.dir / "ckpt.npz", peers.feats, size, "code")
        assert len(np.unique(want_c)) >= 3 and len(np.unique(want_l)) >= 3
        np.testing.assert_array_equal(got_c, want_c)
        np.testing.assert_array_equal(got_l, want_l)


@pytest.mark.parametrize("labels", ["labels.npy", "labels2.npy"])
def test_eval_scores_the_hp_import_as_its_torch_rendering_is_scored(hp, peers, labels):
    lab = np.load(peers.d / labels)
    with torch.no_grad():
        want_c, want_l = (t.numpy() for t in hp.model.predict(torch.from_numpy(peers.feats).permute(0, 3, 1, 2),
                                                              lab.shape[1:]))
    res = eval_run(EvalOptions(checkpoint=str(hp.dir / "ckpt.npz"), features=str(peers.d / "feats.npy"),
                               labels=str(peers.d / labels), n_classes=N_CLASSES, stored_probe=True, upsample="code",
                               progress=False), say=lambda m: None)
    assert res["cluster"] == scores_json(metrics.scores(metrics.confusion(want_c, lab, N_CLASSES + HP_EXTRA,
                                                                          N_CLASSES)))
    conf = metrics.confusion(want_l, lab, N_CLASSES, N_CLASSES)
    assert res["linear"] == scores_json(metrics.scores(conf, metrics.identity_match(N_CLASSES, N_CLASSES)))


def test_the_hp_backbone_is_exported_and_the_import_recorded(hp, tmp_path):
    """The ONNX export is the checkpoint's ViT (``net_model_state_dict.model.*``), extract, eval
    and segment take the import through it; import.json says what the file held and what not."""
    from omh_ref.extract import export_dino

    x = export_dino.random_batch(32, seed=5)
    got = export_dino.ort_session(hp.onnx).run(["features"], {"images": x})[0]
    with torch.no_grad():
        want = hp.vit(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4
    assert checkpoint.backbone_of(hp.dir / "ckpt.npz")["weights_sha256"] == export_dino.weights_sha256(hp.vit)
    layouts.folder(tmp_path, n=2, labels=True, nested=False)
    _ok(["extract", "--model", str(hp.onnx), "--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"),
         "--out", str(tmp_path / "f"), "--quiet"])
    out = _ok(["eval", "--checkpoint", str(hp.dir / "ckpt.npz"), "--features", str(tmp_path / "f" / "feats.npy"),
               "--n-classes", "4", "--stored-probe", "--upsample", "code", "--quiet"])
    assert "stored in the checkpoint" in out and "warning" not in out
    _ok(["segment", "--model", str(hp.onnx), "--checkpoint", str(hp.dir / "ckpt.npz"), "--images",
         str(tmp_path / "images"), "--out", str(tmp_path / "masks"), "--quiet"])
    assert len(list((tmp_path / "masks").glob("*.clusters.png"))) == 2
    rec = json.loads((hp.dir / "import.json").read_text())
    assert rec["peer"] == "hp" and rec["read_from"].startswith("hynnsk/HP@8913644") and "lightning" not in rec
    assert rec["saved"] == {"epoch": 2, "iter": 1500, "best_epoch": 2, "best_iter": 1500, "best": 187.25}
    assert rec["settings"]["assumed"] is True and rec["settings"]["values"]["warmup"] == 1000
    assert "PW, Pb" in rec["not_in_file"] and rec["keys"]["left_out"] == [] and rec["linear_probe"] is True
    assert "net_model_state_dict.ema_model2.2.bias" in rec["keys"]["used"] and rec["clusters"] == 5


def test_hp_settings_are_those_of_the_named_data_set(tmp_path):
    """With the data set named, its JSON values; a data set of another class count, an unknown
    one, or a data set named for another peer's checkpoint: one line each."""
    from omh_ref.core.errors import InputError
    from omh_ref.jobs import imports

    with tiny_dino():
        vit = random_vit("dino", "vit_tiny", 8, 0, seed=4)
        _, ck = hp_checkpoint(vit, tmp_path / "p.pth", n_classes=3, dim=8, seed=3)
        said = []
        rec = imports.run(imports.ImportOptions(checkpoint=str(ck), out=str(tmp_path / "p"), resolution=(32,),
                                                dataset="potsdam3"), say=said.append)
        _, cfg = checkpoint.load_params(tmp_path / "p" / "ckpt.npz")
        assert (cfg.supcon_tau, cfg.consistency_weight, cfg.denominator_share, cfg.pool_size, cfg.renew_interval,
                cfg.warmup, cfg.ema_alpha) == (0.4, 0.0, 1.0, 1024, 20, 100, 0.999)
        assert rec["settings"] == {"dataset": "potsdam3", "assumed": False,
                                   "source": "hynnsk/HP@8913644 json/server/potsdam.json",
                                   "values": peers_mod.HP_SETTINGS["potsdam3"]["fields"]}
        assert any("its D is 8, json/server/potsdam.json trains 256" in s for s in said)
        assert not any("holds no training settings" in s for s in said)
        for dataset, opts, wanted in (("cocostuff27", {}, "predicts 3 classes; HP's cocostuff27 has 27"),
                                      ("potsdam", {}, "known for cocostuff27, cityscapes27, potsdam3"),
                                      ("potsdam3", {"checkpoint": "stego"}, "is STEGO's")):
            path = tmp_path / "stego.ckpt" if opts else ck
            if opts:
                lit = peer_module("stego", vit, n_classes=3, dim=8, extra=0, seed=1)
                save_lightning(lit, path, "stego", STEGO_CFG, 3)
            with pytest.raises(InputError) as e:
                imports.run(imports.ImportOptions(checkpoint=str(path), out=str(tmp_path / "q"), dataset=dataset),
                            say=lambda m: None)
            assert wanted in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_hp_settings_table_agrees_with_the_recipes_and_the_base():
    """The import's table of HP's JSON values is the hp recipes' (configs/<data set>_hp.toml, each
    cited line by line) and, for COCO-Stuff, the hp base's defaults."""
    import tomllib
    from pathlib import Path

    from omh_ref.core.bases import hp as hp_base

    for name, s in peers_mod.HP_SETTINGS.items():
        model = tomllib.loads((Path(__file__).parents[2] / "configs" / f"{name}_hp.toml").read_text())["model"]
        assert {k: model[k] for k in s["fields"]} == s["fields"], name
        assert (model["dim"], model["in_dim"], model["levels"][-1]) == (s["dim"], s["in_dim"], s["n_classes"]), name
    coco = peers_mod.HP_SETTINGS[peers_mod.HP_DEFAULT_DATASET]
    assert {k: hp_base.DEFAULTS[k] for k in coco["fields"]} == coco["fields"] and coco["dim"] == hp_base.DEFAULTS["dim"]


def _hp_edit(**changes):
    """An ``edit`` for hp_checkpoint: ``entry=None`` drops an entry, ``entry={key: None}`` drops a
    key of its state dict, ``entry={key: tensor}`` adds one (to a new entry: makes it)."""
    def edit(ck):
        for entry, change in changes.items():
            if change is None:
                del ck[entry]
                continue
            for k, v in change.items():
                if v is None:
                    del ck[entry][k]
                else:
                    ck.setdefault(entry, {})[k] = v
    return edit


def test_hp_refusals_are_one_line(hp, tmp_path):
    """HP loads its state dicts strictly (eval.py lines 97-99), so does the import: a key missing
    or left over, an entry its save_checkpoint does not write, the backbone missing or not
    DINO's; and an import is not resumed."""
    net = "net_model_state_dict"
    cases = [
        ({net: {"ema_model2.2.bias": None}}, "an HP checkpoint without net_model_state_dict.ema_model2.2.bias"),
        ({"linear_model_state_dict": {"bias": None}}, "without linear_model_state_dict.bias"),
        ({net: {"cluster3.0.weight": torch.zeros(8, 32, 1, 1)}}, "with net_model_state_dict.cluster3.0.weight, which"),
        ({"cluster_model_state_dict": {"clusters2": torch.zeros(5, 8)}}, "cluster_model_state_dict.clusters2"),
        ({"project_head_state_dict": {"weight": torch.zeros(8, 8)}}, "with the entry 'project_head_state_dict'"),
        ({"cluster_model_state_dict": None}, "an HP checkpoint without cluster_model_state_dict"),
        ({net: {"model.blocks.0.extra": torch.zeros(2)}}, "unexpected keys (1): blocks.0.extra"),
        ({net: {"model.norm.bias": None}}, "missing keys (1): norm.bias"),
        ({net: {"ema_model1.0.weight": torch.zeros(8, 16, 1, 1)}}, "ema_model1.0.weight has shape (8, 16, 1, 1)"),
    ]
    with tiny_dino():
        for i, (changes, wanted) in enumerate(cases):
            _, ck = hp_checkpoint(hp.vit, tmp_path / f"e{i}.pth", n_classes=N_CLASSES, dim=8, extra=HP_EXTRA,
                                  edit=_hp_edit(**changes))
            _one_line_error(["import", str(ck), "--out", str(tmp_path / f"o{i}"), "--resolution", "32"],
                            str(ck), wanted)
        vit_keys = {k: None for k in hp.model.net.state_dict() if k.startswith("model.")}
        _, ck = hp_checkpoint(hp.vit, tmp_path / "nb.pth", n_classes=N_CLASSES, dim=8, extra=HP_EXTRA,
                              edit=_hp_edit(net_model_state_dict=vit_keys))
        _one_line_error(["import", str(ck), "--out", str(tmp_path / "nb")], "without net_model_state_dict.model.*")
    _one_line_error(["train", "--resume", str(hp.dir / "ckpt.npz"), "--quiet"], "imported from HP", "resume")


def test_hp_optimiser_states_are_left_out_and_odd_bookkeeping_noted(hp, tmp_path):
    """A checkpoint saved without model_only (utils/common_utils.py lines 36-40) holds the
    optimisers' states: imported all the same, recorded as left out; a bookkeeping entry of
    another type is noted and left out of the record."""
    opt = torch.optim.Adam(hp.model.net.cluster1.parameters(), lr=5e-4)

    def edit(ck):
        ck.update(net_optimizer_state_dict=opt.state_dict(), best="n/a")

    with tiny_dino():
        _, ck = hp_checkpoint(hp.vit, tmp_path / "o.pth", n_classes=N_CLASSES, dim=8, extra=HP_EXTRA, edit=edit)
        out = _ok(["import", str(ck), "--out", str(tmp_path / "o"), "--resolution", "32"])
    rec = json.loads((tmp_path / "o" / "import.json").read_text())
    assert rec["entries_left_out"] == ["net_optimizer_state_dict"] and "best" not in rec["saved"]
    assert "its best is 'n/a', left out" in out and "net_optimizer_state_dict left out" in out
