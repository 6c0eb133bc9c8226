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
