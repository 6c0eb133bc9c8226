"""The house rules of the layout (docs/ARCHITECTURE.md), checked on the source:

* imports run downward only, over four floors: core <- features <- {extract, train, evaluate}
  <- jobs; the three rooms of the third floor import nothing from each other (scoring reads no
  images and no checkpoints: the jobs hand it those), and no import cycle between modules
  (function-level imports included);
* the package never imports the tests, the benchmarks or the command line, nor edits sys.path;
* every op and loss has ``backward(d<out>, cache)``, the upstream gradient first;
* no file cites a document that is not in the repository;
* the tests mirror the package (a folder per room) and no test module imports another one.
"""
import ast
import inspect
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "features": 1, "extract": 2, "train": 2, "evaluate": 2, "jobs": 3}


def _modules(repo=REPO):
    """{dotted name: path} of every module of the package under ``repo``."""
    out = {}
    for p in sorted((repo / "omh_ref").rglob("*.py")):
        parts = list(p.relative_to(repo).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name, path, modules):
    """Every omh_ref module ``name`` imports (anywhere in the file), and every other top-level
    package it imports."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found, other = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                (found if a.name.split(".")[0] == "omh_ref" else other).add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module
            if mod.split(".")[0] != "omh_ref":
                other.add(mod)
                continue
            for a in node.names:   # `from pkg import submodule` is an edge to the submodule
                found.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
    return {m for m in found if m in modules}, other


def _layer(name):
    parts = name.split(".")
    return LAYERS.get(parts[1], -1) if len(parts) > 1 else -1   # omh_ref itself: the version only


def _room(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_imports(modules):
    """Every import of a module on a higher floor, or of another room on the same floor."""
    return sorted(f"{name} imports {dep}" for name, path in modules.items()
                  for dep in _imports(name, path, modules)[0]
                  if _layer(dep) > _layer(name) or (_layer(dep) == _layer(name) and _room(dep) != _room(name)))


def import_cycle(modules):
    """One import cycle as a list of modules, or None."""
    graph = {name: _imports(name, path, modules)[0] - {name} for name, path in modules.items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_imports_run_downward_only():
    assert upward_imports(_modules()) == []


def test_no_import_cycles():
    assert import_cycle(_modules()) is None


def test_the_package_never_imports_tests_benchmarks_or_the_cli():
    modules = _modules()
    for name, path in modules.items():
        other = _imports(name, path, modules)[1]
        assert not {m.split(".")[0] for m in other} & {"tests", "benchmarks", "omh_ref_cli", "cli"}, name
        assert "sys.path" not in path.read_text(), f"{name} edits sys.path"


def test_the_checks_catch_an_upward_import_a_sideways_one_and_a_cycle(tmp_path):
    """The checker itself can fail: a core module importing evaluation, scoring importing the
    training room beside it, and two modules importing each other through a function-level
    import; a job importing all of them is fine."""
    files = {"omh_ref/__init__.py": "", "omh_ref/core/__init__.py": "", "omh_ref/evaluate/__init__.py": "",
             "omh_ref/train/__init__.py": "", "omh_ref/jobs/__init__.py": "",
             "omh_ref/core/a.py": "def f():\n    from ..evaluate import metrics\n",
             "omh_ref/evaluate/metrics.py": "from ..core import a\nfrom ..train.checkpoint import load\n",
             "omh_ref/train/checkpoint.py": "from ..core import b\n",
             "omh_ref/jobs/run.py": "from ..evaluate import metrics\nfrom ..train import checkpoint\n",
             "omh_ref/core/b.py": "from .a import f\n"}
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    modules = _modules(tmp_path)
    assert upward_imports(modules) == ["omh_ref.core.a imports omh_ref.evaluate.metrics",
                                       "omh_ref.evaluate.metrics imports omh_ref.train.checkpoint"]
    assert import_cycle(modules) == ["omh_ref.core.a", "omh_ref.evaluate.metrics", "omh_ref.core.a"]


def _backwards():
    from omh_ref.core import head, losses, ops

    mods = [getattr(ops, n) for n in ops.__all__] + [getattr(losses, n) for n in losses.__all__] + [head]
    return [(m.__name__, m.backward) for m in mods]


@pytest.mark.parametrize("name,fn", _backwards())
def test_every_backward_takes_the_upstream_gradient_first(name, fn):
    params = list(inspect.signature(fn).parameters)
    assert params[:2] != [] and params[0].startswith("d") and params[1] == "cache", (name, params)


def _tracked_text_files():
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        files = [REPO / f for f in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):   # not a checkout: every file
        files = [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]
    return [p for p in files if p.suffix in (".py", ".md", ".toml", ".txt", ".json", ".sh", "") and p.is_file()]


def test_no_file_cites_a_document_outside_the_repository():
    outside = re.compile(r"\b(DESIGN\.md|ECOSYSTEM\.md|STYLE\.md|DEVELOPERS\.md|shared/)|\bissue \d+|\bissue #\d+")
    cited = re.compile(r"\b((?:docs|weights|benchmarks|configs)/[\w./-]+\.(?:md|py|json|toml))")
    bad = []
    for p in _tracked_text_files():
        if p.name == "test_layout.py":
            continue
        text = p.read_text(errors="replace")
        for m in outside.finditer(text):
            bad.append(f"{p.relative_to(REPO)}: {m.group(0)}")
        for m in cited.finditer(text):
            if not (REPO / m.group(1)).exists():
                bad.append(f"{p.relative_to(REPO)}: {m.group(1)} does not exist")
    assert not bad, bad



def test_the_tool_never_calls_itself_the_papers_implementation():
    """The method is a reconstruction from the abstract: wherever the tool names itself (the
    README's opening, the package docstring, the CLI's help, the install's description) it says
    so, and no tracked file calls omh-ref *the* reference implementation."""
    from omh_ref_cli.main import main

    import omh_ref

    said = "as reconstructed from the paper's abstract"
    readme = (REPO / "README.md").read_text()
    places = {"README.md's opening": " ".join(readme.split("\n\n")[1].split()),
              "omh_ref's docstring": " ".join(omh_ref.__doc__.split()),
              "omh-ref --help": " ".join(main.help.split()),
              "pyproject.toml": (REPO / "pyproject.toml").read_text()}
    assert not [where for where, text in places.items() if said not in text]
    claim = re.compile(r"\bthe reference implementation of OMH", re.I)
    assert not [p.name for p in _tracked_text_files() if p.name != "test_layout.py"
                and claim.search(" ".join(p.read_text(errors="replace").split()))]

def test_the_tests_mirror_the_package_and_import_no_other_test_module():
    tests = REPO / "tests"
    rooms = {p.name for p in (REPO / "omh_ref").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    folders = {p.name for p in tests.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == rooms, (folders, rooms)
    bad = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.rsplit(".", 1)[-1].startswith("test_") for n in names):
                bad.append(f"{path.relative_to(REPO)} imports {names[0]}")
    assert not bad, bad


def test_the_install_lists_every_package():
    """pyproject.toml names the packages explicitly; a folder left out installs without it (a
    pip install, not an editable one, then fails at import)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "omh_ref").rglob("__init__.py")}
    assert found | {"omh_ref_cli"} == listed, (found - listed, listed - found - {"omh_ref_cli"})
