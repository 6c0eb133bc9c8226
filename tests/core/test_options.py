"""Options that several commands take are declared once (omh_ref.core.options): every command's
flag, every options dataclass's default, and every command line a job prints come from it."""
import dataclasses

import pytest

from omh_ref.core import options
from omh_ref.jobs.demo import DemoOptions
from omh_ref.jobs.evaluate import EvalOptions
from omh_ref.jobs.seeds import SeedsOptions
from omh_ref.train.loop import TrainOptions
from omh_ref_cli.main import main

SHARED = {**options.LOOP, **options.DEVICE, **options.OUTPUT, **options.CRF, **options.DASK, **options.PROBE,
          **options.PROVENANCE}


# the shared options each command takes (a command's own --batch-size or --seed means something else)
TAKES = {"train": {"steps", "batch_size", "lr", "lr_clusters", "weight_decay", "grad_clip", "seed", "device",
                   "ckpt_every", "log_every", "val_every", "quiet", "allow_backbone_mismatch"},
         "seeds": {"steps", "batch_size", "lr", "lr_clusters", "weight_decay", "grad_clip", "probe", "knn_k", "crf",
                   "scheduler", "device", "quiet", "allow_backbone_mismatch"},
         "demo": {"steps", "batch_size", "device", "quiet"},
         "recipe": {"crf", "probe", "scheduler", "device", "quiet"},
         "eval": {"crf", "crf_workers", "crf_timeout", "device", "quiet", "allow_backbone_mismatch", "stored_probe"},
         "segment": {"crf", "crf_workers", "crf_timeout", "device", "quiet", "allow_backbone_mismatch"},
         "extract": {"device", "scheduler", "quiet"},
         "knn": {"scheduler"}}


@pytest.mark.parametrize("cmd_name", sorted(TAKES))
def test_every_command_takes_its_shared_options_as_declared(cmd_name):
    params = {p.name: p for p in main.commands[cmd_name].params}
    declared = {n for n, p in params.items() if getattr(p, "declared", None) is not None}
    assert declared == TAKES[cmd_name]
    for n in declared:
        o, p = options.get(n), params[n]
        assert p.declared is o and o.flag in p.opts and p.default == o.default, (cmd_name, n)
        if o.choices:
            assert tuple(p.type.choices) == o.choices, (cmd_name, n)


@pytest.mark.parametrize("cls,command", [(TrainOptions, "train"), (SeedsOptions, "seeds"), (DemoOptions, "demo"),
                                         (EvalOptions, "eval")])
def test_options_dataclasses_take_their_defaults_from_the_declarations(cls, command):
    """The shared options a command takes have the declared default in its options dataclass too
    (eval's own --batch-size and --seed mean something else and are its own)."""
    fields = {f.name: f.default for f in dataclasses.fields(cls)}
    shared = [n for n in fields if n in TAKES[command]]
    assert shared
    for n in shared:
        assert fields[n] == options.default(n), (cls.__name__, n)
    if command in ("train", "seeds"):    # and the loop options they take from a config file only
        for n in set(fields) & set(options.LOOP):
            assert fields[n] == options.default(n), (cls.__name__, n)


def test_argv_spells_what_the_command_parses_back():
    seeds = main.commands["seeds"]
    words = ["--features", "a.npy", "--val-features", "b.npy", "--out", "o"]
    for name, value in (("steps", 7), ("lr", 0.001), ("knn_k", 3), ("crf", True), ("probe", False),
                        ("scheduler", "local:2"), ("device", "gpu")):
        words += options.argv(name, value)
    ctx = seeds.make_context("seeds", words)
    got = {k: ctx.params[k] for k in ("steps", "lr", "knn_k", "crf", "probe", "scheduler", "device")}
    assert got == {"steps": 7, "lr": 0.001, "knn_k": 3, "crf": True, "probe": False, "scheduler": "local:2",
                   "device": "gpu"}
    assert options.argv_if_changed("probe", True) == [] and options.argv_if_changed("probe", False) == ["--no-probe"]
    assert options.argv("crf", False) == [] and options.argv("scheduler", None) == []


def test_every_flag_of_every_command_is_spelled_as_flag_of_says():
    """So a job that prints a command (recipe --dry-run) spells its flags from the same place the
    command line takes them: options.flag_of (a declared option's flag, else --name-with-dashes,
    else SPELLINGS); and omh-ref export's own parser follows the same rule."""
    for cmd_name, cmd in main.commands.items():
        for p in cmd.params:
            if p.param_type_name == "option" and p.opts:
                assert options.flag_of(p.name) in p.opts, (cmd_name, p.name, p.opts)
    pytest.importorskip("torch")
    from omh_ref.extract import export_dino

    for action in export_dino.parser()._actions:
        if action.option_strings and action.dest != "help":
            assert options.flag_of(action.dest) in action.option_strings, action.option_strings


def test_command_spells_values_in_order():
    assert options.command("knn", features="f.npy", k=5, scheduler=None) == ["omh-ref", "knn", "--features", "f.npy",
                                                                              "--k", "5"]
    assert options.command("seeds", seed_list=(0, 1), config_file="c.toml", flip=True, probe=False) == [
        "omh-ref", "seeds", "--seeds", "0,1", "--config", "c.toml", "--flip", "--no-probe"]
