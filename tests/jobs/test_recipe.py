"""The recipes (configs/*.toml) and ``omh-ref recipe``: every recipe is a valid ``train --config``
file whose backbone, feature size, levels and classes agree; the whole recipe runs on the data set
fixtures with a random-init backbone (tiny settings laid over the recipe, not edited into it),
skips what is done, continues after a crash mid-training with the numbers of an uninterrupted
run, and reports mean ± std over seeds."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.jobs import recipe
from omh_ref.core.config import read_file
from omh_ref.core.errors import InputError
from omh_ref.extract.classes import CLASS_NAMES
from omh_ref.features import synthetic
from omh_ref_cli.main import main
from tests import builders, layouts

REPO = Path(__file__).resolve().parents[2]
NAMES = [f"{d}_{b}" for d in ("cocostuff27", "cityscapes27", "potsdam3")
         for b in ("vits8", "vitb8", "dinov2_vits14", "dinov2_vitb14", "dinov3_vits16", "dinov3_vitb16")]
# seconds, not hours: laid over the recipe's tables as a caller's options (the files stay as shipped)
TINY = {"train": {"steps": 3, "batch_size": 4, "ckpt_every": 1},
        "recipe": {"train_resolution": 32, "eval_resolution": 48, "knn_k": 2, "probe_crops": 40}}


def quiet(*_):
    pass


# --------------------------------------------------------------------------------------------------
# The recipe files
# --------------------------------------------------------------------------------------------------
SMOOSEG_NAMES = [f"{d}_smooseg" for d in ("cocostuff27", "cityscapes27", "potsdam3")]
HP_NAMES = [f"{d}_hp" for d in ("cocostuff27", "cityscapes27", "potsdam3")]


def test_the_recipes_ship():
    assert recipe.names() == sorted(NAMES + SMOOSEG_NAMES + HP_NAMES)


def test_a_recipe_that_leaves_out_its_loop_values_takes_its_bases(tmp_path):
    """A SmooSeg recipe without lr, lr_clusters and batch_size trains with SmooSeg's, as train
    --config with that file does (it took omh-ref's before, so a recipe and its printed seeds
    command trained differently)."""
    text = (REPO / "configs" / "cocostuff27_smooseg.toml").read_text()
    kept = "\n".join(ln for ln in text.splitlines() if not ln.startswith(("lr ", "lr_clusters ", "batch_size ")))
    (tmp_path / "mine_smooseg.toml").write_text(kept)
    rec = recipe.load(str(tmp_path / "mine_smooseg.toml"))
    assert (rec.train["lr"], rec.train["lr_clusters"], rec.train["batch_size"]) == (1e-4, 5e-4, 32)


@pytest.mark.parametrize("name", SMOOSEG_NAMES)
def test_each_smooseg_recipe_is_smoosegs_loop_on_its_data_set(name, tmp_path):
    """SmooSeg's loop (3000 steps, batch 32, its two learning rates), head and loss values (each
    cited in the file), OMH's levels on top; --no-omh leaves SmooSeg alone; train takes the file."""
    rec = recipe.load(name)
    dataset = name.split("_", 1)[0]
    c = rec.config
    assert (c.base, c.dim, c.dropout, c.head_activation, c.zero_clamp, c.weight_inter, c.neg_samples) == \
        ("smooseg", 64, 0.2, "silu", False, 0.0, 1)
    assert (rec.train["steps"], rec.train["batch_size"], rec.train["lr"], rec.train["lr_clusters"]) == \
        (3000, 32, 1e-4, 5e-4)
    assert list(c.levels) == [4 * rec.n_classes, 2 * rec.n_classes, rec.n_classes] and c.omh
    assert rec.config.eval_k == len(CLASS_NAMES[dataset]) and rec.config.in_dim == recipe.ARCH_DIMS[rec.settings["arch"]]
    alone = recipe.load(name, {"model": {"omh": False}}).config
    assert (alone.levels, alone.cluster_target, alone.tau) == ((rec.n_classes,), "teacher", 1.0)
    feats = _features(tmp_path / "f", c.in_dim)
    res = CliRunner().invoke(main, ["train", "--features", feats, "--config", str(REPO / "configs" / f"{name}.toml"),
                                    "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--quiet"])
    assert res.exit_code == 0, res.output


# HP's values per data set (docs/hp_reading.md §9): dim, ema, tau, alpha, rho, pool, renew, warmup, steps
HP_VALUES = {"cocostuff27": (512, 0.99, 0.8, 0.05, 0.02, 2048, 100, 1000, 11631),
             "cityscapes27": (512, 0.999, 0.6, 0.05, 0.02, 2048, 20, 50, 6960),
             "potsdam3": (256, 0.999, 0.4, 0.0, 1.0, 1024, 20, 100, 5000)}


@pytest.mark.parametrize("name", HP_NAMES)
def test_each_hp_recipe_is_hps_loop_on_its_data_set(name, tmp_path):
    """HP's loop (batch 64, AdamW at 5e-4 with decay 0.1, clipping at 10, the probe at 5e-3), its
    values for the data set (each cited in the file), OMH's levels on top; --no-omh leaves HP alone
    with STEGO's probe; train takes the file, on features with HP's inputs beside them."""
    rec = recipe.load(name)
    dataset = name.split("_", 1)[0]
    c = rec.config
    assert (c.base, c.dropout, c.head_activation) == ("hp", 0.1, "relu")
    assert (c.dim, c.ema_alpha, c.supcon_tau, c.consistency_weight, c.denominator_share, c.pool_size,
            c.renew_interval, c.warmup, rec.train["steps"]) == HP_VALUES[dataset]
    assert (rec.train["batch_size"], rec.train["lr"], rec.train["lr_clusters"], rec.train["weight_decay"],
            rec.train["grad_clip"]) == (64, 5e-4, 5e-3, 0.1, 10.0)
    assert list(c.levels) == [4 * rec.n_classes, 2 * rec.n_classes, rec.n_classes] and c.omh
    assert rec.settings["arch"] == ("vit_base" if dataset == "potsdam3" else "vit_small") and rec.settings["patch"] == 8
    alone = recipe.load(name, {"model": {"omh": False}}).config
    assert (alone.levels, alone.cluster_target) == ((rec.n_classes,), "hard")
    feats = builders.hp_inputs(Path(_features(tmp_path / "f", c.in_dim)).parent)
    res = CliRunner().invoke(main, ["train", "--features", feats, "--config", str(REPO / "configs" / f"{name}.toml"),
                                    "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    from omh_ref.train.checkpoint import load

    ck = load(tmp_path / "run" / "ckpt.npz")
    assert ck["config"] == c and (ck["info"]["options"]["weight_decay"], ck["info"]["options"]["grad_clip"]) == \
        (0.1, 10.0)


@pytest.mark.parametrize("name", NAMES)
def test_each_recipe_agrees_with_its_backbone_and_data_set(name):
    rec = recipe.load(name)
    s = rec.settings
    dataset, backbone = name.split("_", 1)
    family = "" if s["family"] == "dino" else f"{s['family']}_"
    assert s["dataset"] == dataset and backbone == f"{family}{recipe.ARCH_SHORT[s['arch']]}{s['patch']}"
    assert s["patch"] == {"dino": 8, "dinov2": 14, "dinov3": 16}[s["family"]]
    assert s["registers"] == {"dino": 0, "dinov2": 0, "dinov3": 4}[s["family"]]
    assert rec.config.in_dim == recipe.ARCH_DIMS[s["arch"]]
    assert rec.config.eval_k == len(CLASS_NAMES[dataset])
    assert list(rec.config.levels) == [4 * rec.n_classes, 2 * rec.n_classes, rec.n_classes]
    assert s["train_resolution"] % s["patch"] == 0 and s["eval_resolution"] % s["patch"] == 0
    # STEGO's loop, resolutions and crops (the file cites each); at patch 14 the evaluation is at
    # 322 px, the whole-patch size nearest STEGO's 320
    assert (rec.train["steps"], rec.train["batch_size"], s["train_resolution"], s["eval_resolution"]) == \
        (5000, 16, 224, 322 if s["patch"] == 14 else 320)
    assert s["train_crop"] == ("center" if dataset == "potsdam3" else "five") and s["eval_flip"]
    # what train --config reads: nothing but [model] and [train] fields
    tables = read_file(REPO / "configs" / f"{name}.toml")
    assert set(tables) == {"model", "train", "recipe"}


def _features(folder, dim):
    synthetic.write(synthetic.SynthSpec(n_images=6, grid=4, dim=dim, seed=0), folder)
    return str(Path(folder) / "feats.npy")


@pytest.mark.parametrize("name", NAMES)
def test_train_accepts_every_recipe(tmp_path, name):
    """``omh-ref train --config`` on each recipe: the config merge, its in_dim check against the
    features and one real step (the loop flags given on the command line win over [train])."""
    dim = recipe.load(name).config.in_dim
    feats = _features(tmp_path / "f", dim)
    res = CliRunner().invoke(main, ["train", "--features", feats, "--config", str(REPO / "configs" / f"{name}.toml"),
                                    "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "run"), "--quiet"])
    assert res.exit_code == 0, res.output
    from omh_ref.train.checkpoint import load

    ck = load(tmp_path / "run" / "ckpt.npz")
    assert ck["step"] == 1 and ck["config"] == recipe.load(name).config
    # the other backbone's features are refused, naming the file
    other = _features(tmp_path / "g", 768 if dim == 384 else 384)
    res = CliRunner().invoke(main, ["train", "--features", other, "--config", str(REPO / "configs" / f"{name}.toml"),
                                    "--steps", "1", "--out", str(tmp_path / "run2"), "--quiet"])
    assert res.exit_code == 2 and f"{name}.toml: in_dim {dim}" in res.output


@pytest.mark.parametrize("edit,message", [
    (("model", "levels", [108, 54, 9]), "the eval level has 9 clusters but cocostuff27 has 27 classes"),
    (("model", "in_dim", 768), "in_dim should be 384"),
    (("recipe", "train_crop", "random"), "[recipe] train_crop: expected center or five"),
    (("recipe", "eval_resolution", 321), "eval_resolution 321 is not a multiple of patch 8"),
    (("recipe", "colour", 1), "unknown [recipe] key 'colour'"),
    (("train", "epochs", 3), "unknown [train] field 'epochs'"),
    (("recipe", "family", "dinov4"), "[recipe] family: expected one of dino, dinov2, dinov3"),
    (("recipe", "patch", 14), "names DINO vit_small at patch 14 with 0 registers, which DINO did not release"),
    (("recipe", "registers", 4), "DINO vit_small at patch 8 with 4 registers, which DINO did not release"),
])
def test_a_bad_recipe_is_one_error_naming_the_file_and_key(tmp_path, edit, message):
    table, key, value = edit
    with pytest.raises(InputError) as err:
        recipe.load("cocostuff27_vits8", {table: {key: value}})
    assert message in str(err.value) and "cocostuff27_vits8.toml" in str(err.value)
    with pytest.raises(InputError, match=r"not a recipe file and not one of cityscapes27_\w+, "):
        recipe.load("cocostuff_vits8")


def test_a_model_of_any_input_size_extracts_each_split_at_the_recipes_resolution(tmp_path):
    """One .onnx that takes any input size serves both extractions, each told its size (the
    training crops' and the evaluation's; it ran both at the model's default 224 px before), and
    the command said is one ``extract`` takes."""
    import shlex

    layouts.coco(tmp_path / "data", "train", n=2, seed=1)
    layouts.coco(tmp_path / "data", "val", n=2, seed=2)
    model = builders.patch_conv_onnx(tmp_path / "any_size.onnx", dim=384, patch=8)
    opts = recipe.RecipeOptions(name="cocostuff27_vits8", root=str(tmp_path / "data"), weights=(model,),
                                out=str(tmp_path / "run"), seeds=(0,), progress=False, overrides=TINY)
    stages = {st.name: st for st in recipe.plan(opts, say=quiet)}
    for split, key in (("train", "train_resolution"), ("val", "eval_resolution")):
        words = stages[f"extract {split}"].command
        assert f"--resolution {TINY['recipe'][key]}" in shlex.join(words), words
        assert main.commands["extract"].make_context("extract", words[2:]).params["resolution"] == TINY["recipe"][key]


# --------------------------------------------------------------------------------------------------
# The whole recipe on the fixtures
# --------------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
pytest.importorskip("onnx")


def _random_dino(path):
    """A random-init DINO ViT-S/8 state dict saved as a .pth (omh-ref export's model)."""
    mod = recipe.load_exporter()
    torch.manual_seed(0)
    torch.save(mod.build_vit("vit_small", 8).state_dict(), path)
    return path


def _opts(name, root, weights, out, **kw):
    return recipe.RecipeOptions(name=name, root=str(root), weights=tuple(map(str, weights)), out=str(out),
                                seeds=(0, 1), progress=False, overrides=TINY, **kw)


def _numbers(rep):
    return {"runs": rep["runs"], "summary": rep["summary"]}


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """COCO-Stuff fixture, the recipe run once from a .pth: (root, pth, run folder, report, messages)."""
    base = tmp_path_factory.mktemp("coco")
    layouts.coco(base / "data", "train", n=4, seed=1)
    layouts.coco(base / "data", "val", n=3, seed=2)
    pth = _random_dino(base / "dino.pth")
    said = []
    rep = recipe.run(_opts("cocostuff27_vits8", base / "data", [pth], base / "run"), say=said.append)
    return base / "data", pth, base / "run", rep, said


def test_the_recipe_runs_end_to_end_from_a_pth(coco):
    root, pth, run, rep, said = coco
    assert any(m.startswith("[export] omh-ref export --arch vit_small") for m in said)
    manifest = json.loads((run / "weights" / "manifest.json").read_text())
    assert {m["file"] for m in manifest["models"]} == {"dino_vits8_32.onnx", "dino_vits8_48.onnx"}
    train = json.loads((run / "feats" / "train" / "feats.json").read_text())
    val = json.loads((run / "feats" / "val" / "feats.json").read_text())
    assert train["shape"] == [20, 4, 4, 384] and train["crop"] == "five"          # 4 images x 5 crops, 32 px
    assert val["shape"] == [3, 6, 6, 384] and val["flipped"] == "feats_flip.npy"  # 48 px, with flips
    assert (run / "feats" / "train" / "feats.knn.npy").is_file()
    saved = json.loads((run / "results.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1]
    assert set(saved["summary"]) == {"cluster_miou", "cluster_acc", "linear_miou", "linear_acc"}
    for key, s in saved["summary"].items():
        values = [r[key.rsplit("_", 1)[0]][key.rsplit("_", 1)[1]] for r in saved["runs"]]
        assert s["values"] == values
        assert s["mean"] == pytest.approx(np.mean(values)) and s["std"] == pytest.approx(np.std(values, ddof=1))
    md = (run / "results.md").read_text()
    assert "| cluster mIoU | " in md and "| seed 0 | seed 1 |" in md and " ± " in md
    for seed in (0, 1):
        ck = json.loads((run / f"seed{seed}" / "eval.json").read_text())
        assert ck["run"] == saved["runs"][seed]
        assert len(ck["run"]["cluster"]["iou"]) == 27
    assert saved["runs"][0] != saved["runs"][1]          # two seeds, two runs
    assert _numbers(rep) == _numbers(saved)


def test_a_rerun_skips_every_finished_stage(coco, monkeypatch):
    root, pth, run, rep, _ = coco

    def forbidden(*a, **k):
        raise AssertionError("a finished stage ran again")
    monkeypatch.setattr(recipe, "extract", forbidden)
    monkeypatch.setattr(recipe, "build_knn", forbidden)
    monkeypatch.setattr("omh_ref.jobs.seeds.train", forbidden)
    monkeypatch.setattr("omh_ref.jobs.seeds.run_eval", forbidden)
    said = []
    again = recipe.run(_opts("cocostuff27_vits8", root, [pth], run), say=said.append)
    assert _numbers(again) == _numbers(rep)
    assert sum("done already" in m for m in said) == 4          # export, 2 extractions, knn
    assert sum("trained already" in m for m in said) == 2 and sum("evaluated already" in m for m in said) == 2
    stages = recipe.plan(_opts("cocostuff27_vits8", root, [pth], run), say=quiet)
    assert all(st.done for st in stages)


def test_a_crash_mid_training_resumes_to_the_uninterrupted_numbers(coco, tmp_path, monkeypatch):
    """The run is cut by an error at seed 1's third step (its step-2 checkpoint on disk); the same
    command again resumes that run bit-exactly and the results equal the uninterrupted ones."""
    root, pth, run, rep, _ = coco
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("seed*", "results.*", ".omh-ref.lock"))
    from omh_ref.core import model

    real, calls = model.loss_and_grads, {"n": 0}

    def crashing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:          # seed 0 took steps 1-3; this is seed 1's step 3
            raise RuntimeError("simulated crash")
        return real(*a, **k)
    monkeypatch.setattr(model, "loss_and_grads", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        recipe.run(_opts("cocostuff27_vits8", root, [pth], out), say=quiet)
    assert not (out / ".omh-ref.lock").exists()                  # released on the way out
    assert (out / "seed0" / "eval.json").is_file() and not (out / "seed1" / "eval.json").exists()
    from omh_ref.train.checkpoint import step_of

    assert step_of(out / "seed1" / "ckpt.npz") == 2
    monkeypatch.setattr(model, "loss_and_grads", real)
    said = []
    again = recipe.run(_opts("cocostuff27_vits8", root, [pth], out), say=said.append)
    assert any("seed 1: resuming training at step 2 of 3" in m for m in said)
    assert any("seed 0: evaluated already" in m for m in said)
    assert _numbers(again) == _numbers(rep)


@pytest.mark.parametrize("name,build,crf", [
    ("cityscapes27_vits8", lambda root: (layouts.cityscapes(root, "train", seed=1), layouts.cityscapes(root, "val")),
     True),
    ("potsdam3_vits8", lambda root: (layouts.potsdam(root, "train", n=6, seed=1), layouts.potsdam(root, "val", n=3)),
     False),
])
def test_cityscapes_and_potsdam_recipes_run_from_onnx_files(coco, tmp_path, name, build, crf):
    from omh_ref.evaluate import crf as dense_crf

    if crf and not dense_crf.available():
        pytest.skip("pydensecrf2 (omh-ref[crf]) not installed")
    _, _, run, _, _ = coco
    build(tmp_path / "data")
    onnx = [run / "weights" / "dino_vits8_32.onnx", run / "weights" / "dino_vits8_48.onnx"]
    said = []
    rep = recipe.run(_opts(name, tmp_path / "data", onnx, tmp_path / "run", crf=crf), say=said.append)
    assert not any(m.startswith("[export]") for m in said)
    n_classes = recipe.load(name).n_classes
    rows = json.loads((tmp_path / "run" / "feats" / "train" / "feats.json").read_text())["shape"][0]
    assert rows == (15 if name.startswith("cityscapes") else 6)    # 3 images x 5 crops; 6 centre crops
    assert [r["seed"] for r in rep["runs"]] == [0, 1]
    assert all(len(r["cluster"]["iou"]) == n_classes for r in rep["runs"])
    assert set(rep["summary"]) == {"cluster_miou", "cluster_acc", "linear_miou", "linear_acc"} | \
        ({"crf_miou", "crf_acc"} if crf else set())
    if crf:   # the CRF changes predictions, so its scores are its own
        assert "cluster+CRF mIoU" in (tmp_path / "run" / "results.md").read_text()


def test_dry_run_prints_the_commands_and_marks_the_done_ones(coco, tmp_path):
    root, pth, run, _, _ = coco
    args = ["recipe", "cocostuff27_vits8", "--root", str(root), "--weights", str(pth), "--seeds", "0,1"]
    fresh = CliRunner().invoke(main, args + ["--out", str(tmp_path / "new"), "--dry-run"])
    assert fresh.exit_code == 0, fresh.output
    lines = _commands(fresh.output)
    assert lines[0].startswith("omh-ref export --arch vit_small --patch 8 --checkpoint")
    assert "--resolution 224 --resolution 320" in lines[0]
    assert lines[1].startswith("omh-ref extract ") and "--split train --crop five" in lines[1]
    assert "--split val --crop center --flip" in lines[2] and lines[3].startswith("omh-ref knn ")
    assert lines[4].startswith("omh-ref seeds ") and "--probe-epochs 4000" in lines[4]   # 80000 / (4 x 5)
    assert "--steps 5000 --batch-size 16" in lines[4]                # said, not hidden in --config
    why = [ln for ln in fresh.output.splitlines() if ln not in lines]
    assert len(why) == 5 and why[1].startswith("# extract train: 4 images, five crops") and "224 px -> 20 rows" in why[1]
    assert "5000 steps at batch 16" in why[4] and "4000 epoch(s) = round(probe_crops 80000 / 20 training rows)" in why[4]
    assert not (tmp_path / "new").exists()                       # a dry run writes nothing
    no_probe = CliRunner().invoke(main, args + ["--out", str(tmp_path / "new"), "--dry-run", "--no-probe", "--crf"])
    assert _commands(no_probe.output)[4].endswith("--crf --no-probe")
    # the finished run: every stage done; the caller's tiny settings show as the seeds' flags
    done = "\n".join(_commands(recipe.format_plan(recipe.plan(_opts("cocostuff27_vits8", root, [pth], run),
                                                                say=quiet))))
    assert all(ln.startswith("# done: ") for ln in done.splitlines())
    assert "--steps 3 --batch-size 4" in done.splitlines()[-1]
    # every printed command is one the command line takes, with the values the run uses
    import shlex

    from omh_ref.extract import export_dino

    for line in lines + _commands(no_probe.output)[4:5] + done.splitlines():
        words = shlex.split(line.removeprefix("# done: "))
        if words[1] == "export":
            export_dino.parse_args(words[2:])
        else:
            main.commands[words[1]].make_context(words[1], words[2:])
    seeds = main.commands["seeds"].make_context("seeds", shlex.split(done.splitlines()[-1].removeprefix("# done: "))[2:])
    assert (seeds.params["steps"], seeds.params["batch_size"], seeds.params["seed_list"]) == (3, 4, "0,1")


def test_an_hp_recipe_exports_and_extracts_hps_inputs(coco, tmp_path):
    """An HP recipe exports the backbone with its attention output and extracts the training split
    with --attention, and with --augment where its consistency weight is not 0 (Potsdam's is 0);
    the evaluation split needs neither; each printed command parses. A training folder extracted
    without them is not taken as done: it is refused in one line."""
    import shlex

    from omh_ref.extract import export_dino

    assert recipe.hp_inputs(recipe.load("potsdam3_hp")) == {"attention": True, "augment": False}
    assert recipe.hp_inputs(recipe.load("cocostuff27_vits8")) == {"attention": False, "augment": False}
    augment = True
    root, pth, _, _, _ = coco
    args = ["recipe", "cocostuff27_hp", "--root", str(root), "--weights", str(pth), "--seeds", "0", "--out",
            str(tmp_path / "new"), "--dry-run"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = _commands(res.output)
    assert lines[0].startswith("omh-ref export ") and lines[0].endswith("--attention")
    train, val = lines[1], lines[2]
    assert "--split train" in train and "--attention" in train and ("--augment" in train) == augment
    assert "--split val" in val and "--attention" not in val and "--augment" not in val
    assert "HP's attention window weights (attn.npy)" in res.output
    for line in lines:
        words = shlex.split(line)
        if words[1] == "export":
            export_dino.parse_args(words[2:])
        else:
            main.commands[words[1]].make_context(words[1], words[2:])
    # an export of the same weights made without the attention output (a STEGO recipe's) is not HP's
    run = tmp_path / "exported"
    (run / "weights").mkdir(parents=True)
    rec = recipe.load("cocostuff27_hp")
    entries = []
    for r, p in recipe._exported(rec, run).items():
        p.write_bytes(b"an export %d" % r)
        entries.append({"file": p.name, "checkpoint_sha256": recipe._sha256(pth), "sha256": recipe._sha256(p)})
    (run / "weights" / "manifest.json").write_text(json.dumps({"models": entries}))
    assert not recipe._export_done(rec, run, pth)
    for e in entries:
        e["attention"] = {"output": "attention"}
    (run / "weights" / "manifest.json").write_text(json.dumps({"models": entries}))
    assert recipe._export_done(rec, run, pth)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "feats.json").write_text(json.dumps({"dataset": "cocostuff27", "split": "train"}))
    with pytest.raises(InputError, match="attention"):
        recipe._extracted(folder, {"dataset": "cocostuff27"}, ["attention"])
    assert recipe._extracted(folder, {"dataset": "cocostuff27"})


def _commands(output) -> list:
    """The command lines of a dry run (each stage's comment saying what it does left out)."""
    return [ln for ln in output.splitlines() if ln.removeprefix("# done: ").startswith("omh-ref ")]


def test_the_readmes_by_hand_block_is_the_dry_run_of_its_recipe_command(tmp_path, monkeypatch):
    """The README's "same by hand" commands are what ``--dry-run`` prints for the README's own
    recipe command, run where the README says (paths as written; only the probe's epochs, which
    follow the data set's size, and the recipe file's place differ on this tiny layout)."""
    import re
    import shlex

    text = (REPO / "README.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith(".venv/bin/omh-ref recipe "))
    args = shlex.split(line)[1:]
    block = text[text.index("The same by hand"):]
    block = block[block.index("```bash\n") + 8:block.index("```", block.index("```bash\n") + 8)]
    shown = [ln for ln in block.splitlines() if ln.startswith("omh-ref ")][:5]
    monkeypatch.chdir(tmp_path)
    root, weights = args[args.index("--root") + 1], args[args.index("--weights") + 1]
    layouts.coco(tmp_path / root, "train", n=2, seed=1)
    layouts.coco(tmp_path / root, "val", n=2, seed=2)
    _random_dino(tmp_path / weights)
    res = CliRunner().invoke(main, args + ["--dry-run"])
    assert res.exit_code == 0, res.output
    got = [ln.replace(str(recipe.configs_dir()), "configs") for ln in _commands(res.output)]
    norm = lambda ls: [re.sub(r"--probe-epochs \d+", "--probe-epochs N", x) for x in ls]   # noqa: E731
    assert norm(shown) == norm(got)


def test_bad_arguments_are_one_line_errors(coco, tmp_path):
    root, pth, run, _, _ = coco
    base = ["recipe", "cocostuff27_vits8", "--root", str(root), "--out", str(tmp_path / "o"), "--dry-run"]
    cases = [
        (["--weights", str(pth), "--backbone", "vit_base"], "--backbone vit_base: recipe cocostuff27_vits8 is for vit_small"),
        (["--weights", str(tmp_path / "nope.pth")], "nope.pth: no such file"),
        (["--weights", str(run / "weights" / "dino_vits8_32.onnx")], "--weights: no model takes 224 px inputs"),
        (["--weights", str(pth), "--seeds", "0,0"], "--seeds: expected distinct"),
    ]
    for extra, message in cases:
        res = CliRunner().invoke(main, base + extra)
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
        assert res.output.startswith("error: ") and res.output.count("\n") == 1
    res = CliRunner().invoke(main, ["recipe", "cocostuff27_vits8", "--root", str(tmp_path / "none"), "--weights",
                                    str(pth), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--root" in res.output and "no such folder" in res.output
    # a .pth without torch: the error says what to do, before anything was written
    import sys

    import omh_ref.extract

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "torch", None)                    # `import torch` fails
        mp.delitem(sys.modules, "omh_ref.extract.export_dino")
        mp.delattr(omh_ref.extract, "export_dino")
        with pytest.raises(InputError, match=r"exporting a .pth needs torch .*pip install 'omh-ref\[torch\]'"):
            recipe.run(_opts("cocostuff27_vits8", root, [pth], tmp_path / "o2"), say=quiet)
    assert not (tmp_path / "o2").exists()


def test_features_of_other_settings_are_refused_not_mixed(coco, tmp_path):
    root, pth, run, _, _ = coco
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("seed*", "results.*", ".omh-ref.lock"))
    meta = json.loads((out / "feats" / "val" / "feats.json").read_text())
    meta["flipped"] = None
    (out / "feats" / "val" / "feats.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"feats/val: holds features of other settings \(flipped differ\)"):
        recipe.run(_opts("cocostuff27_vits8", root, [pth], out), say=quiet)
