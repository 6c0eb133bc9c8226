"""Every command the README shows is one the tool takes: each ``omh-ref CMD`` names a command,
every ``--flag`` written after it is one of that command's flags, and the whole lines (code
blocks and table rows without placeholders) parse as given."""
import re
import shlex
from pathlib import Path

import pytest

from omh_ref_cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"
PLACEHOLDERS = ("[", "|", "...", "…", "\\")


def _mentions():
    """(text, whole): each `omh-ref ...` in backticks, and each command line of a code block."""
    text = README.read_text()
    out = [(m.group(1), False) for m in re.finditer(r"`(omh-ref [^`]+)`", text)]
    block, cont = False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            block = not block
            continue
        if block and (line.startswith("omh-ref ") or cont):
            cur = f"{cont} {line.strip()}" if cont else line.strip()
            if cur.endswith("\\"):
                cont = cur[:-1]
                continue
            cont = ""
            out.append((cur.split("  #")[0].strip(), True))
    return out


def _flags(name):
    if name == "export":
        pytest.importorskip("torch")
        from omh_ref.extract import export_dino

        return {o for action in export_dino.parser()._actions for o in action.option_strings}
    cmd = main.commands[name]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def test_the_readme_shows_commands():
    assert len(_mentions()) > 15


@pytest.mark.parametrize("text,whole", _mentions(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_readme_command_is_one_the_tool_takes(text, whole):
    words = text.split()
    assert words[1] in main.commands, f"no command {words[1]!r}: {text}"
    flags = _flags(words[1])
    for w in words[2:]:
        flag = w.split("=")[0]
        if flag.startswith("--"):
            assert flag in flags, f"{words[1]} has no {flag}: {text}"
    if whole and words[1] != "export" and not any(t in text for t in PLACEHOLDERS):
        main.commands[words[1]].make_context(words[1], shlex.split(text)[2:])


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readmes_python_that_needs_no_files_runs():
    """Each Python block that reads no file (no path in it) runs as written."""
    runnable = [b for b in _python_blocks() if not re.search(r"\.(onnx|npz|jpg|png|npy)\b", b)]
    assert runnable
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {})


def _help(name):
    """``omh-ref NAME --help`` as the tool prints it, unwrapped."""
    import click

    cmd = main.commands[name]
    return cmd.get_help(click.Context(cmd, info_name=name, terminal_width=10_000, max_content_width=10_000))


def _option_help(name, flag):
    """The help row of ``flag`` of command ``name``: its spelling, choices, help and default."""
    import click

    cmd = main.commands[name]
    (p,) = [p for p in cmd.params if flag in (*p.opts, *p.secondary_opts)]
    return "  ".join(p.get_help_record(click.Context(cmd, info_name=name)))


def _command_rows():
    """(command, row) of each row of the README's command tables whose first cell is `omh-ref CMD ...`."""
    found = re.finditer(r"^\| `omh-ref (\w+)[^`]*` \|.*$", README.read_text(), flags=re.M)
    return [(m.group(1), m.group(0)) for m in found if m.group(1) != "export"]


def test_the_readme_has_command_rows():
    assert {cmd for cmd, _ in _command_rows()} >= {"train", "eval", "segment", "extract", "seeds", "recipe", "knn"}


@pytest.mark.parametrize("cmd,row", _command_rows(), ids=lambda v: v if len(v) < 20 else "")
def test_every_flag_a_command_row_names_is_in_that_commands_help(cmd, row):
    """Every `--flag` in a row's backticks, the description's included (`--crop five`, `--on-error
    skip|fail`), is in the command's printed help; a span that starts with another command's
    name (`segment --match`) is checked against that one."""
    for span in re.findall(r"`([^`]+)`", row):
        first = span.split()[0]
        name = span.split()[1] if first == "omh-ref" else first if first in main.commands else cmd
        for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", _help(name)), f"{name} --help has no {flag}: {span}"


# What the README states about a flag, and what that flag's help says: the two must agree.
FACTS = [
    ("`--levels 108,54,27 --eps 0.2", "train", "--levels", "[default: 108,54,27]"),
    ("`--levels 108,54,27 --eps 0.2", "train", "--eps", "[default: 0.2]"),
    ("`--on-error skip\\|fail`", "extract", "--on-error", "--on-error [skip|fail]"),
    ("seeds 0, 1, 2 (`--seeds`)", "recipe", "--seeds", "[default: 0,1,2]"),
    ("The linear probe streams: its codes go to a temporary file", "recipe", "--probe", "temporary file"),
    ("or are recomputed every epoch\n(`omh-ref eval --probe-cache`)", "eval", "--probe-cache", "recompute them every epoch"),
    ("a\nshort side of `--resolution` (default: the backbone's export size)", "segment", "--resolution",
     "[default: the model's input size"),
    ("(`feats.knn.npy`, column 0 = self", "knn", "--out", "[default: <features stem>.knn.npy"),
]


@pytest.mark.parametrize("readme,cmd,flag,helps", FACTS, ids=[f"{c} {f}" for _, c, f, _ in FACTS])
def test_what_the_readme_says_of_a_flag_its_help_says_too(readme, cmd, flag, helps):
    assert " ".join(readme.split()) in " ".join(README.read_text().split()), readme
    assert helps in _option_help(cmd, flag), (cmd, flag, _option_help(cmd, flag))


def test_no_probe_help_says_it_holds_the_codes_in_memory():
    """The README says the probe streams its codes (a temporary file, or recomputed every epoch)."""
    for name in ("recipe", "seeds"):
        assert "in memory" not in _option_help(name, "--probe"), name
