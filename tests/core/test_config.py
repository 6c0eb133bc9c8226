"""The config module: each field declared once (default, help, rule) gives its validation and its
``omh-ref train`` flag; config files and flags merge in a fixed order."""
import dataclasses
import math

import pytest
from click.testing import CliRunner

from omh_ref.core.config import Config, flag_specs, merge, parse_shifts, read_file
from omh_ref.core.errors import InputError
from omh_ref_cli.main import main


def test_every_field_has_help_and_all_but_in_dim_and_extra_a_train_flag():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert all(f.metadata["help"] for f in fields.values())
    assert {s.name for s in flag_specs()} == set(fields) - {"in_dim", "extra"}
    helptext = CliRunner().invoke(main, ["train", "--help"], terminal_width=200).output
    for spec in flag_specs():
        assert spec.flag in helptext, spec.flag


@pytest.mark.parametrize("name,value,want", [
    ("rho_q", 0.0, "a positive finite number"), ("tau", math.inf, "a positive finite number"),
    ("dropout", 1.0, "a probability in [0, 1)"), ("neg_samples", -1, "an integer >= 0"),
    ("lam_w", -0.1, "a finite number >= 0"), ("shift_neg", math.nan, "a finite number"),
    ("marginals", "both", "one of ('uniform', 'usage')"), ("dim", 2.5, "an integer"),
])
def test_each_rule_names_its_field(name, value, want):
    with pytest.raises(ValueError, match=f"config field {name!r}: expected {want}".replace("(", r"\(")
                       .replace(")", r"\)").replace("[", r"\[")):
        Config(**{name: value})


def test_merge_layers_parse_levels_and_skip_unset_flags():
    cfg = merge(Config(), {"rho_q": 0.5, "levels": "9,3", "eps": None})
    assert cfg.levels == (9, 3) and cfg.rho_q == 0.5 and cfg.eps == Config().eps


def test_merge_names_the_source_and_the_field():
    with pytest.raises(InputError, match=r"^cfg.toml: config field 'eps': expected a positive finite number"):
        merge({}, {"eps": -1.0}, source="cfg.toml")
    with pytest.raises(InputError, match=r"^--levels: expected comma-separated integers"):
        merge({}, {"levels": "9,x"})
    with pytest.raises(InputError, match=r"^config: unknown field\(s\) epz"):
        merge({}, {"epz": 1.0})


def test_shifts_and_config_files(tmp_path):
    assert parse_shifts("auto") == ({}, True) and parse_shifts(None) == ({}, False)
    assert parse_shifts("0.1,0.2,0.3")[0] == {"shift_neg": 0.1, "shift_inter": 0.2, "shift_intra": 0.3}
    with pytest.raises(InputError, match="--shifts"):
        parse_shifts("0.1,0.2")
    (tmp_path / "flat.json").write_text('{"eps": 0.3}')
    assert read_file(tmp_path / "flat.json") == {"model": {"eps": 0.3}, "train": {}}
    (tmp_path / "t.toml").write_text("[model]\neps = 0.3\n[train]\nsteps = 5\n")
    assert read_file(tmp_path / "t.toml") == {"model": {"eps": 0.3}, "train": {"steps": 5}}


def test_target_names_say_what_they_do_and_the_old_meaning_is_refused_with_a_hint():
    assert Config().cluster_target == "relaxed" and Config(cluster_target="balanced").cluster_target == "balanced"
    with pytest.raises(ValueError, match=r"'rho_q': expected a positive finite number \(strict balance, rho_q = inf, "
                                         r"is cluster_target = 'balanced'\)"):
        Config(rho_q=math.inf)
    with pytest.raises(InputError, match=r"^cfg.toml: cluster_target 'balanced' is strict equipartition and takes no "
                                         r"rho_q \(got 0.1\); for targets relaxed by rho_q use cluster_target 'relaxed'"):
        merge({}, {"cluster_target": "balanced", "rho_q": 0.1}, source="cfg.toml")
    assert merge({}, {"cluster_target": "balanced"}).cluster_target == "balanced"   # rho_q left at its default


@pytest.mark.parametrize("old,want", [({"cluster_target": "balanced", "rho_q": 0.1}, ("relaxed", 0.1)),
                                      ({"cluster_target": "balanced", "rho_q": math.inf}, ("balanced", 0.1)),
                                      ({"cluster_target": "hard", "rho_q": 0.3}, ("hard", 0.3))])
def test_a_format_1_checkpoint_is_read_in_todays_terms(tmp_path, old, want):
    """Format 1 said 'balanced' for the relaxed targets (finite rho_q) and for the strict ones
    (rho_q = inf); loading one gives the same model under today's names."""
    from omh_ref.core import fixtures
    from omh_ref.train import checkpoint

    got = checkpoint.load(_rewritten_checkpoint(tmp_path, fixtures.small_config(), 1, lambda c: c.update(old)))
    assert (got["config"].cluster_target, got["config"].rho_q) == want


def _rewritten_checkpoint(tmp_path, cfg, fmt, change):
    """A checkpoint of ``cfg`` saved today, then its format set to ``fmt`` and its config dict
    changed in place by ``change`` (as an older version wrote it). -> its path."""
    import json

    import numpy as np

    from omh_ref.core import model
    from omh_ref.core.optim import adam_init
    from omh_ref.train import checkpoint

    params = model.init_params(cfg, np.random.default_rng(0))
    checkpoint.save(tmp_path / "c.npz", params, adam_init(params), 3, np.random.default_rng(0), cfg)
    with np.load(tmp_path / "c.npz") as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(bytes(data["meta"]).decode())
    meta["format"] = fmt
    change(meta["config"])
    data["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    path = tmp_path / f"old-{len(list(tmp_path.iterdir()))}.npz"
    np.savez(path, **data)
    return path


def test_a_recipe_table_is_returned_when_present_and_train_ignores_it(tmp_path):
    (tmp_path / "r.toml").write_text("[model]\neps = 0.3\n[recipe]\ndataset = 'potsdam3'\n")
    assert read_file(tmp_path / "r.toml") == {"model": {"eps": 0.3}, "train": {}, "recipe": {"dataset": "potsdam3"}}
    (tmp_path / "only.toml").write_text("[recipe]\narch = 'vit_small'\n")
    assert read_file(tmp_path / "only.toml") == {"model": {}, "train": {}, "recipe": {"arch": "vit_small"}}
    (tmp_path / "bad.toml").write_text("eps = 0.3\n[recipe]\narch = 'vit_small'\n")
    with pytest.raises(InputError, match=r"bad.toml: with \[model\]/\[train\]/\[recipe\] tables, top-level keys"):
        read_file(tmp_path / "bad.toml")
    (tmp_path / "bad2.toml").write_text("recipe = 3\n")
    with pytest.raises(InputError, match=r"bad2.toml: \[recipe\] must be a table"):
        read_file(tmp_path / "bad2.toml")


def _format_2_checkpoint(tmp_path, cfg, **old_fields):
    """A checkpoint as format 2 wrote it: its config with 'baseline' for base/omh and the fields
    retired since (at ``old_fields``' values, else the values that meant today's method)."""
    def to_format_2(old):
        omh = old.pop("omh")
        old.pop("base")
        old.update({"baseline": "omh" if omh else "stego", "hier_form": "kl", "lam_sparse": 0.0,
                    "predict_through_plan": False, **old_fields})
        if not omh:             # format 2 kept the config as given and resolved it on every use
            old.update(levels=[6, 4, 3], cluster_target="relaxed", lam_hier=1.3)
    return _rewritten_checkpoint(tmp_path, cfg, 2, to_format_2)


def test_old_checkpoints_and_config_files_load_as_base_and_omh(tmp_path):
    """'baseline' became base + omh and three fields were retired: a format-2 checkpoint of each
    kind loads as the same model, and so does a config file that still says baseline."""
    from omh_ref.core import fixtures
    from omh_ref.train import checkpoint

    cfg = fixtures.small_config()
    got = checkpoint.load(_format_2_checkpoint(tmp_path, cfg))["config"]
    assert got == cfg and got.omh and got.base == "stego"
    alone = fixtures.small_config(omh=False, levels=(6, 4, 3))
    got = checkpoint.load(_format_2_checkpoint(tmp_path, alone))["config"]
    assert got == alone and got.levels == (3,) and got.cluster_target == "hard" and got.lam_hier == 0
    (tmp_path / "old.toml").write_text('[model]\nbaseline = "stego"\nlevels = [8, 4]\nhier_form = "kl"\n')
    f = read_file(tmp_path / "old.toml")
    got = merge(Config(), f["model"], source="old.toml")
    assert not got.omh and got.levels == (4,) and got.cluster_target == "hard"


@pytest.mark.parametrize("field,value", [("hier_form", "centroids"), ("hier_form", "targets"), ("lam_sparse", 0.1),
                                         ("predict_through_plan", True), ("cluster_target", "soft")])
def test_a_retired_variant_is_refused_naming_the_commit_that_has_it(tmp_path, field, value):
    from omh_ref.core import fixtures
    from omh_ref.core.config import STUDY_COMMIT
    from omh_ref.train import checkpoint

    with pytest.raises(InputError, match=rf"{field}.*rejected, retired .*commit {STUDY_COMMIT} still has it"):
        checkpoint.load(_format_2_checkpoint(tmp_path, fixtures.small_config(), **{field: value}))
    with pytest.raises(InputError, match=rf"^cfg.toml: config field '{field}' = .*commit {STUDY_COMMIT}"):
        merge(Config(), {field: value}, source="cfg.toml")
    with pytest.raises(InputError, match=rf"{field}.*commit {STUDY_COMMIT}"):
        merge({}, {field: value})


def test_omh_is_resolved_once_and_stays_resolved():
    cfg = Config(omh=False, levels=(12, 6, 3), eval_level=1)
    assert (cfg.levels, cfg.eval_level, cfg.eval_index, cfg.eval_k) == ((6,), -1, 0, 6)
    assert dataclasses.replace(cfg) == cfg and Config.from_dict(dataclasses.asdict(cfg)) == cfg
    assert Config(levels=(12, 6, 3), eval_level=1).eval_k == 6


def test_yaml_configs_read_like_toml_and_fail_in_one_line(tmp_path, monkeypatch):
    """.yml/.yaml files are YAML (PyYAML, omh-ref[yaml]), tables or not; a broken one is one line,
    and without PyYAML the line says what to install."""
    import sys

    pytest.importorskip("yaml")
    (tmp_path / "t.yaml").write_text("model:\n  eps: 0.3\n  rho_q: 5e-2\ntrain:\n  steps: 5\n")
    assert read_file(tmp_path / "t.yaml") == {"model": {"eps": 0.3, "rho_q": 0.05}, "train": {"steps": 5}}
    (tmp_path / "bad.yml").write_text("eps: [0.3\nsteps: 2\n")
    with pytest.raises(InputError, match=r"bad.yml: not valid YAML \(.*line \d+") as e:
        read_file(tmp_path / "bad.yml")
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(InputError, match=r"t.yaml: YAML configs need PyYAML: pip install 'omh-ref\[yaml\]'$"):
        read_file(tmp_path / "t.yaml")
    with pytest.raises(InputError, match=r"nope.yml: no such file \(expected a TOML, JSON or YAML config\)"):
        read_file(tmp_path / "nope.yml")
