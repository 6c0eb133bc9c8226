"""STEGO's names (omh_ref.core.stego_names): its train_config.yml, as it is, reads as omh-ref's
config and loop settings with a note per renamed key; its other keys are named as not read, or
refused in one line where their value asks for a model omh-ref does not train."""
import json
import re
from pathlib import Path

import pytest

from omh_ref.core import stego_names
from omh_ref.core.config import Config, merge, read_file
from omh_ref.core.errors import InputError
from tests.stego_files import TRAIN_CONFIG   # STEGO's train_config.yml, verbatim

pytest.importorskip("yaml")

READ = {"model": {"dim": 70, "zero_clamp": True, "pointwise": True, "feature_samples": 11, "neg_samples": 5,
                  "weight_neg": 0.63, "weight_inter": 0.25, "weight_intra": 0.67,
                  "shift_neg": 0.46, "shift_inter": 0.12, "shift_intra": 0.18},
        "train": {"steps": 5000, "batch_size": 16, "lr": 5e-4, "log_every": 10, "val_every": 100}}


def _keys():
    """The top-level keys of the real file, in order."""
    return re.findall(r"^(\w+):", TRAIN_CONFIG, flags=re.M)


def _write(tmp_path, text, name="train_config.yml"):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def test_stegos_real_train_config_reads_as_omh_refs_settings(tmp_path):
    notes = []
    got = read_file(_write(tmp_path, TRAIN_CONFIG), say=notes.append)
    assert got == READ
    assert type(got["train"]["lr"]) is float          # 5e-4 is a number (YAML 1.1 alone reads a string)
    src = tmp_path / "train_config.yml"
    assert f"note: {src}: neg_inter_shift is STEGO's name for omh-ref's shift_neg" in notes
    assert f"note: {src}: max_steps is STEGO's name for omh-ref's steps" in notes
    renamed = {k for k, (_, name) in stego_names.NAMES.items() if name != k}
    assert {re.match(r"note: .*: (\w+) is STEGO's name", n).group(1) for n in notes[:-1]} == renamed  # one each
    ignored = notes[-1].split("why each): ")[1].split(", ")
    assert set(ignored) == set(_keys()) - set(stego_names.NAMES)   # every other key named, once
    cfg = merge({}, got["model"], {"in_dim": 384}, source=str(src))
    assert (cfg.dim, cfg.weight_neg, cfg.shift_neg, cfg.shift_intra) == (70, 0.63, 0.46, 0.18)


def test_every_key_of_the_real_file_is_classified_and_no_name_is_invented():
    keys = set(_keys())
    known = set(stego_names.NAMES) | set(stego_names.ONLY_AT) | set(stego_names.IGNORED) | {"dropout"}
    assert keys == known


def test_each_cited_line_of_train_config_holds_its_key():
    """Every NAMES and ONLY_AT entry cites 'T <line>': that line of the real file sets that key."""
    source = Path(stego_names.__file__).read_text()
    lines = TRAIN_CONFIG.splitlines()
    for key in [*stego_names.NAMES, *stego_names.ONLY_AT]:
        m = re.search(rf'^    "{key}": (?:(?!\n    ").)*?# T (\d+)', source, flags=re.M | re.S)  # in its entry
        assert m, key
        assert lines[int(m.group(1)) - 1].startswith(f"{key}:"), (key, m.group(1))


@pytest.mark.parametrize("line,want", [
    ("rec_weight: 0.5", r"rec_weight = 0.5: the feature-reconstruction loss .* not in omh-ref; set it to 0.0"),
    ("extra_clusters: 5", r"extra_clusters = 5: omh-ref sets the eval level's cluster count in levels"),
    ("num_neighbors: 5", r"num_neighbors = 5: .*omh-ref seeds --knn-k"),
    ("correspondence_weight: 2.0", r"correspondence_weight = 2.0: .*multiply neg_inter_weight"),
    ("projection_type: linear", r"projection_type = 'linear': omh-ref's head is STEGO's linear \+ nonlinear"),
    ("continuous: 1", r"continuous = 1: "),
])
def test_a_switch_at_another_value_than_omh_refs_is_refused_in_one_line(tmp_path, line, want):
    text = re.sub(rf"^{line.split(':')[0]}:.*$", line, TRAIN_CONFIG, flags=re.M)
    with pytest.raises(InputError, match=rf"^{re.escape(str(tmp_path))}/train_config.yml: {want}") as e:
        read_file(_write(tmp_path, text), say=lambda s: None)
    assert "\n" not in str(e.value)


def test_stego_keys_in_an_omh_ref_file_and_tables(tmp_path):
    notes = []
    flat = _write(tmp_path, json.dumps({"neg_inter_shift": 0.5, "eps": 0.3, "max_steps": 7, "dropout": True}), "f.json")
    assert read_file(flat, say=notes.append) == {"model": {"shift_neg": 0.5, "eps": 0.3}, "train": {"steps": 7}}
    assert notes[-1].endswith("why each): dropout")                # STEGO's switch, not omh-ref's probability
    assert read_file(_write(tmp_path, '{"dropout": 0.2}', "d.json"))["model"] == {"dropout": 0.2}
    tables = _write(tmp_path, "[model]\npos_intra_weight = 0.5\n[train]\nmax_steps = 9\n", "t.toml")
    assert read_file(tables, say=notes.append) == {"model": {"weight_intra": 0.5}, "train": {"steps": 9}}
    wrong = _write(tmp_path, "[model]\nmax_steps = 9\n", "w.toml")
    with pytest.raises(InputError, match=r"w.toml: \[model\] max_steps: a training-loop setting \(omh-ref's steps\); "
                                         r"put it in \[train\]$"):
        read_file(wrong)
    both = _write(tmp_path, '{"shift_neg": 0.1, "neg_inter_shift": 0.5}', "b.json")
    with pytest.raises(InputError, match=r"b.json: neg_inter_shift is STEGO's name for shift_neg, which the file "
                                         r"also gives; keep one$"):
        read_file(both)


def test_hydra_interpolations_of_the_same_file_resolve_others_are_refused(tmp_path):
    text = TRAIN_CONFIG.replace("pos_inter_shift: 0.12", "pos_inter_shift: ${pos_intra_shift}")
    assert read_file(_write(tmp_path, text), say=lambda s: None)["model"]["shift_inter"] == 0.18
    text = TRAIN_CONFIG.replace("dim: 70", "dim: ${oc.env:DIM}")
    with pytest.raises(InputError, match=r"train_config.yml: dim: '\$\{oc.env:DIM\}' is an interpolation omh-ref "
                                         r"does not resolve"):
        read_file(_write(tmp_path, text), say=lambda s: None)
    text = TRAIN_CONFIG.replace("log_dir: \"cocostuff27\"", "log_dir: ${oc.env:LOGS}")   # an ignored key: not read
    assert read_file(_write(tmp_path, text), say=lambda s: None) == READ


def test_unknown_fields_name_omh_refs_name_for_a_stego_one_and_flags_have_stego_spellings():
    with pytest.raises(InputError, match=r"unknown field\(s\) pos_inter_weight \(pos_inter_weight is STEGO's name "
                                         r"for weight_inter\)"):
        merge({}, {"pos_inter_weight": 0.3})
    with pytest.raises(ValueError, match=r"unknown field\(s\) epz$"):
        Config.from_dict({"epz": 1})
    assert stego_names.flag_aliases("shift_neg") == ("--neg-inter-shift",)
    assert stego_names.flag_aliases("steps") == ("--max-steps",) and stego_names.flag_aliases("dim") == ()
