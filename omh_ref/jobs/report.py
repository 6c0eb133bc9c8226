"""``omh-ref report``: one self-contained HTML page for one run, a ``seeds`` or ``recipe`` folder, a
``demo`` folder, or several of them side by side, to look at, send or attach.

What a folder holds, and what the page shows of it (:func:`read` tells the kinds apart):

=========================  ========================================================================
folder                     read from it
=========================  ========================================================================
``omh-ref seeds``          ``results.json`` (every seed's scores, the config, the options);
                           ``seed<N>/eval.json`` (class names, every level's scores, the plans'
                           parents, the checkpoint's sha256 and the splits' paths),
                           ``seed<N>/log.jsonl``, ``seed<N>/ckpt.npz``
``omh-ref recipe``         the same, with ``recipe.json`` and ``weights/manifest.json``
``omh-ref demo``           ``report.json`` (one row per method, every seed's scores and levels),
                           ``runs/<method>-seed<N>/{log.jsonl,ckpt.npz}``, ``data/val``
``omh-ref train``          ``ckpt.npz`` and ``log.jsonl``; scores where an ``eval.json`` lies beside
                           them (``omh-ref eval --json DIR/eval.json``)
=========================  ========================================================================

Sections, each an ``<section id=...>``: ``settings`` (settings and provenance: backbone, features,
checkpoint sha256s, the configs side by side), ``results`` (mean ± std and per-seed values, sortable
tables), ``per-class`` (IoU bars per class for the cluster, linear and CRF scores), ``levels``
(every level against its label granularity, the consistency of each plan, and the hierarchy drawn
as a tree whose nodes name their matched classes), ``curves`` (every seed's training and validation
curves on shared axes) and ``qualitative`` (the same validation images for every run: image, label,
each level's mask, overlay, under one legend).

Plots are drawn by matplotlib (the ``report`` extra) as inline SVG with text kept as text, masks
are inline PNGs, the tables sort with a few lines of inline JavaScript: the file loads nothing
from anywhere. The masks are computed here, for a few rows of the validation split, from the first
seed's checkpoint (its levels' clusters shown as their majority class at the level's granularity,
the many-to-one matching that the levels' scores computed over the whole split).
"""
from __future__ import annotations

import base64
import dataclasses
import html
import importlib.util
import io
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .. import __version__
from ..core import bases, options
from ..core.config import Config
from ..core.errors import InputError
from ..core.files import file_sha256, write_text
from ..core.lock import FolderLock
from ..evaluate import pictures
from ..evaluate.granular import load_granularities
from ..evaluate.predict import level_predictions
from ..extract.datasets import label_hierarchy
from ..extract.images import image_paths, load_rgb
from ..features import provenance
from ..features.meta import listed_labels
from ..features.store import FeatureStore
from ..train import checkpoint

NAME = "report.html"
EXTRA = "report"
PROBES = ("cluster", "linear", "crf")                 # as omh_ref.jobs.seeds reports them
PROBE_TITLES = {"cluster": "cluster", "linear": "linear", "crf": "cluster+CRF"}
SCORE_TITLES = {"miou": "mIoU", "acc": "acc"}
SECTIONS = {"settings": "Settings and provenance", "results": "Results", "per-class": "Per-class IoU",
            "levels": "Levels and hierarchy", "curves": "Training and validation curves",
            "qualitative": "Qualitative grid"}
WHY_CHARS = 300                  # the most of an error's message a "not drawn"/"not written" line shows
NOT_A_RUN = ("expected results.json of omh-ref seeds or recipe, report.json of omh-ref demo, or ckpt.npz and "
             "log.jsonl of omh-ref train")


@dataclass
class ReportOptions:
    """What ``omh-ref report`` takes."""

    runs: tuple                  # folders: one run, a seeds/recipe folder, a demo folder; several side by side
    out: str | None = None       # the HTML file [default: RUN/report.html for one folder]
    images: int = 4              # rows of the qualitative grid
    title: str | None = None


@dataclass
class SeedRun:
    """One seed of one row: its scores as ``omh-ref eval --json`` writes them."""

    seed: int
    scores: dict                          # {'cluster': ..., 'linear': ..., 'crf': ...}: those it has
    levels: dict | None = None            # every level against its granularity (evaluate.granular)
    log: Path | None = None
    checkpoint: Path | None = None
    checkpoint_sha256: str | None = None


@dataclass
class Entry:
    """One row of the report: one config (or method) over its seeds."""

    name: str
    folder: Path
    kind: str                             # seeds | recipe | demo | train
    runs: list
    class_names: list
    config: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    provenance: list = field(default_factory=list)    # [(what, value)]
    val_features: Path | None = None
    flipped_features: Path | None = None
    notes: list = field(default_factory=list)


def available() -> bool:
    """Whether the report's plotting library (omh-ref[report]) is installed."""
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except (ImportError, ValueError):
        return False


def missing_extra() -> str:
    return f"omh-ref report needs matplotlib, which the core install leaves out: pip install 'omh-ref[{EXTRA}]'"


# --------------------------------------------------------------------------------------------------
# Reading the folders
# --------------------------------------------------------------------------------------------------
def _json(path: Path, what: str) -> dict:
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable as {what} ({type(e).__name__}: {e})") from None
    if not isinstance(rec, dict):
        raise InputError(f"{path}: not {what} (expected a JSON object)")
    return rec


def _maybe_json(path: Path):
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def read(folder) -> list:
    """The rows (:class:`Entry`) of one folder; a folder that is no run is an InputError naming it
    and what was expected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder ({NOT_A_RUN})")
    if (folder / "results.json").is_file():
        return [_seeds_entry(folder)]
    if (folder / "report.json").is_file():
        return _demo_entries(folder)
    if (folder / "ckpt.npz").is_file() and (folder / "log.jsonl").is_file():
        return [_train_entry(folder)]
    raise InputError(f"{folder}: not an omh-ref run ({NOT_A_RUN})")


def _scores(run: dict, path) -> dict:
    """The probes' scores of one run read from ``path``: mIoU, accuracy and the IoU per class must
    be numbers (NaN allowed) or null; anything else is an InputError naming the file."""
    out = {p: run[p] for p in PROBES if isinstance(run.get(p), dict)}
    for p, sc in out.items():
        fields = [(k, sc.get(k)) for k in SCORE_TITLES] + [(f"iou[{c}]", v) for c, v in enumerate(
            sc.get("iou") if isinstance(sc.get("iou"), list) else [])]
        for k, v in fields:
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise InputError(f"{path}: {p}.{k} is {json.dumps(v)[:60]}, expected a number")
        if "iou" in sc and not isinstance(sc["iou"], list):
            raise InputError(f"{path}: {p}.iou is not a list")
    return out


def _existing(path) -> Path | None:
    return Path(path) if path and Path(path).is_file() else None


def _int(value, path, what, none=False):
    """``value`` (a JSON field of ``path``) as an int: an int, a float or a string that is one; None
    where ``none``; anything else an InputError naming the file and the field."""
    if value is None and none:
        return None
    if not isinstance(value, bool):
        try:
            out = int(value)
            if out == float(value):
                return out
        except (TypeError, ValueError, OverflowError):
            pass
    raise InputError(f"{path}: {what} is {json.dumps(value)[:60]}, expected an integer")


def _levels(levels, path):
    """The ``levels`` record of an evaluation (``evaluate.granular``) as read from ``path``, its
    integer fields (level, clusters, n_classes, a plan's child and parent) checked and made ints:
    they go into the page's tables, its sort keys and the tree's layout; anything else in them is
    an InputError naming the file. None where there is none."""
    if not levels:
        return None
    if not isinstance(levels, dict) or not isinstance(levels.get("levels"), list):
        raise InputError(f"{path}: 'levels' is not the levels of an evaluation (expected a 'levels' list)")
    out = dict(levels, levels=[], consistency=[])
    for i, lv in enumerate(levels["levels"]):
        if not isinstance(lv, dict):
            raise InputError(f"{path}: levels[{i}] is not an object")
        out["levels"].append(dict(lv, level=_int(lv.get("level"), path, f"levels[{i}].level"),
                                  clusters=_int(lv.get("clusters"), path, f"levels[{i}].clusters"),
                                  n_classes=_int(lv.get("n_classes"), path, f"levels[{i}].n_classes", none=True)))
    for i, c in enumerate(levels.get("consistency") or []):
        if not isinstance(c, dict):
            raise InputError(f"{path}: consistency[{i}] is not an object")
        out["consistency"].append(dict(c, child=_int(c.get("child"), path, f"consistency[{i}].child"),
                                       parent=_int(c.get("parent"), path, f"consistency[{i}].parent")))
    return out


def _seeds_entry(folder: Path) -> Entry:
    rep = _json(folder / "results.json", "the results of omh-ref seeds")
    if not isinstance(rep.get("runs"), list) or not rep["runs"] or "summary" not in rep:
        raise InputError(f"{folder / 'results.json'}: not the results of omh-ref seeds (expected 'runs' and "
                         "'summary')")
    opts = rep.get("options") or {}
    runs, names, val, flipped = [], None, None, None
    for r in rep["runs"]:
        if not isinstance(r, dict):
            raise InputError(f"{folder / 'results.json'}: a run is not an object")
        d = folder / f"seed{r.get('seed')}"
        ev = _maybe_json(d / "eval.json") or {}
        key = ev.get("key") or {}
        names = names or ev.get("class_names")
        val = val or _existing(key.get("features"))
        flipped = flipped or _existing(key.get("flipped_features"))
        results = folder / "results.json"
        runs.append(SeedRun(_int(r.get("seed", len(runs)), results, "a run's seed"), _scores(r, results),
                            _levels(ev.get("levels"), d / "eval.json"), _existing(d / "log.jsonl"),
                            _existing(d / "ckpt.npz"), key.get("checkpoint_sha256")))
    recipe = _maybe_json(folder / "recipe.json")
    val = val or _existing(opts.get("val_features")) or _existing(folder / "feats" / "val" / "feats.npy")
    if recipe and not flipped:
        flipped = _existing(folder / "feats" / "val" / "feats_flip.npy")
    entry = Entry(name=(recipe or {}).get("recipe") or folder.resolve().name, folder=folder,
                  kind="recipe" if recipe else "seeds", runs=runs, class_names=names or [],
                  config=rep.get("config") or {}, settings=dict(opts), val_features=val, flipped_features=flipped,
                  notes=list(rep.get("notes") or []))
    if recipe:
        entry.provenance += [("recipe", f"{recipe.get('recipe')} ({recipe.get('file')})")]
        entry.provenance += [(f"[recipe] {k}", v) for k, v in (recipe.get("settings") or {}).items()]
        entry.provenance += [("data root", (recipe.get("options") or {}).get("root"))]
        manifest = _maybe_json(folder / "weights" / "manifest.json") or {}
        for m in manifest.get("models") or []:
            entry.provenance.append((f"weights/{m.get('file')}", f"sha256 {m.get('sha256')}; from checkpoint "
                                                                 f"sha256 {m.get('checkpoint_sha256')}"))
    _common_provenance(entry, opts.get("features"))
    return entry


def _demo_entries(folder: Path) -> list:
    rep = _json(folder / "report.json", "the report of omh-ref demo")
    if not isinstance(rep.get("runs"), dict) or "methods" not in rep:
        raise InputError(f"{folder / 'report.json'}: not the report of omh-ref demo (expected 'runs' and 'methods')")
    val = _existing(folder / "data" / "val" / "feats.npy")
    entries = []
    for method, rs in rep["runs"].items():
        sub = method.replace(" ", "_").replace("/", "")
        runs = []
        for r in rs:
            src = folder / "report.json"
            seed = _int(r.get("seed") if isinstance(r, dict) else None, src, f"a seed of {method!r}")
            d = folder / "runs" / f"{sub}-seed{seed}"
            ck = _existing(d / "ckpt.npz")
            runs.append(SeedRun(seed, _scores(r, src), _levels(r.get("levels"), src), _existing(d / "log.jsonl"), ck,
                                file_sha256(ck) if ck else None))
        e = Entry(name=method, folder=folder, kind="demo", runs=runs,
                  class_names=rep.get("class_names") or [str(c) for c in range(
                      _int(rep.get("n_classes") or 0, folder / "report.json", "n_classes"))],
                  settings={k: v for k, v in (rep.get("options") or {}).items() if k not in ("methods", "progress")},
                  val_features=val)
        if not any(r.checkpoint for r in runs):
            e.notes.append(f"no run folder runs/{sub}-seed<N>: this row is scored from another row's trained code "
                           "(its clusters are not saved), so it has no curves and no masks of its own")
        _common_provenance(e, folder / "data" / "train" / "feats.npy")
        entries.append(e)
    return entries


def _train_entry(folder: Path) -> Entry:
    ck = checkpoint.load(folder / "ckpt.npz")
    info = ck["info"] or {}
    seed = int((info.get("options") or {}).get("seed", 0))
    ev = _maybe_json(folder / "eval.json") or {}
    run = ev.get("run") if isinstance(ev.get("run"), dict) else ev       # a seeds eval.json, or eval --json's
    key = ev.get("key") or {}
    entry = Entry(name=folder.resolve().name, folder=folder, kind="train",
                  runs=[SeedRun(seed, _scores(run, folder / "eval.json"),
                                _levels(ev.get("levels") or run.get("levels"), folder / "eval.json"),
                                folder / "log.jsonl",
                                folder / "ckpt.npz", key.get("checkpoint_sha256") or file_sha256(folder / "ckpt.npz"))],
                  class_names=ev.get("class_names") or run.get("class_names") or [],
                  config=dataclasses.asdict(ck["config"]), settings=dict(info.get("options") or {}, step=ck["step"]),
                  val_features=_existing(key.get("features")), flipped_features=_existing(key.get("flipped_features")))
    if not entry.runs[0].scores:
        entry.notes.append(f"no scores: {folder / 'eval.json'} is missing (omh-ref eval --checkpoint "
                           f"{folder / 'ckpt.npz'} ... --json {folder / 'eval.json'})")
    _common_provenance(entry, info.get("features"))
    return entry


def _common_provenance(entry: Entry, train_features) -> None:
    """The backbone (from the checkpoint and the validation features' ``feats.json``), the splits,
    and every checkpoint's sha256; the config from the first checkpoint where the folder has none."""
    first = next((r.checkpoint for r in entry.runs if r.checkpoint), None)
    if first is not None:
        ck = checkpoint.load(first)
        if not entry.config:
            entry.config = dataclasses.asdict(ck["config"])
        trained = (ck["info"] or {}).get("backbone")
        if trained:
            entry.provenance.insert(0, ("backbone (training features)", provenance.describe(trained)))
        entry.provenance.append((f"checkpoint seed {entry.runs[0].seed} step", ck["step"]))
    if train_features:
        entry.provenance.append(("training features", str(train_features)))
    if entry.val_features is not None:
        store = FeatureStore(entry.val_features)
        m = store.meta or {}
        entry.provenance.append(("validation features", f"{entry.val_features} ({store.N} rows, grid "
                                                        f"{store.h}x{store.w}, dim {store.C})"))
        entry.provenance.append(("backbone (validation features)", provenance.describe(provenance.of_meta(m))))
        for k in ("onnx", "onnx_sha256", "backbone_weights_sha256", "resolution", "dataset", "split"):
            if m.get(k) is not None:
                entry.provenance.append((f"feats.json {k}", m[k]))
        if not entry.class_names and m.get("class_names"):
            entry.class_names = list(m["class_names"])
    if entry.flipped_features is not None:
        entry.provenance.append(("flipped validation features", str(entry.flipped_features)))
    for r in entry.runs:
        entry.provenance.append((f"checkpoint seed {r.seed}", f"{r.checkpoint or '(none)'}"
                                 + (f" sha256 {r.checkpoint_sha256}" if r.checkpoint_sha256 else "")))
    if not entry.class_names:
        n = max((len(r.scores["cluster"]["iou"]) for r in entry.runs if "cluster" in r.scores), default=0)
        entry.class_names = [str(c) for c in range(n)]


def _named_apart(entries) -> None:
    """Rows of the same name (two folders called ``run``) get their folder's parent in the name."""
    seen = {}
    for e in entries:
        seen.setdefault(e.name, []).append(e)
    for name, es in seen.items():
        if len(es) > 1:
            for i, e in enumerate(es):
                e.name = f"{name} ({e.folder.resolve().parent.name}/{e.folder.name} #{i + 1})"


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------
def _stat(values) -> dict:
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    ok = np.isfinite(v)
    return {"mean": float(v[ok].mean()) if ok.any() else None,
            "std": float(v[ok].std(ddof=1)) if ok.sum() > 1 else 0.0, "values": [None if not f else float(x)
                                                                             for x, f in zip(v, ok)]}


def metric_keys(entries) -> list:
    keys = []
    for p in PROBES:
        for s in SCORE_TITLES:
            if any(p in r.scores and r.scores[p].get(s) is not None for e in entries for r in e.runs):
                keys.append((p, s))
    return keys


def metric_title(probe, score) -> str:
    return f"{PROBE_TITLES[probe]} {SCORE_TITLES[score]}"


def summary(entry: Entry, probe, score) -> dict | None:
    vals = [r.scores[probe].get(score) if probe in r.scores else None for r in entry.runs]
    return _stat(vals) if any(v is not None for v in vals) else None


def _pm(stat, digits=1) -> str:
    """``mean ± std``; where some seeds' values are missing or not finite (NaN), ``(mean of k of N
    seeds)`` after it: the mean leaves them out (results.json's, over every seed, is NaN)."""
    if stat is None or stat["mean"] is None:
        return "n/a"
    text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    k, n = sum(v is not None for v in stat["values"]), len(stat["values"])
    return text if k == n else f"{text} (mean of {k} of {n} seeds)"


def _partial(stat) -> bool:
    return stat is not None and stat["mean"] is not None and any(v is None for v in stat["values"])


# --------------------------------------------------------------------------------------------------
# Plots: matplotlib, SVG inline
# --------------------------------------------------------------------------------------------------
class _Plots:
    """Figures as inline SVG (text kept as text, ids prefixed so that many figures share a page)."""

    def __init__(self):
        import matplotlib
        from matplotlib.figure import Figure

        self.matplotlib, self.Figure, self.n = matplotlib, Figure, 0
        self.failed = []                 # one line per figure that could not be drawn
        # text.parse_math off: class, run and folder names are text, never TeX: "$5 or $6" is not drawn
        # as maths, and a "$" that is no maths is no ValueError
        self.style = {"svg.fonttype": "none", "svg.hashsalt": "omh-ref", "font.size": 9, "axes.titlesize": 10,
                      "font.family": "sans-serif", "axes.spines.top": False, "axes.spines.right": False,
                      "text.parse_math": False}

    def context(self):
        """The style, for as long as figures are drawn in it: a text takes ``text.parse_math`` when it
        is made, so every text of every figure must be made inside."""
        return self.matplotlib.rc_context(self.style)

    def drawn(self, what, draw, *args):
        """``draw(self, *args)``: a figure's SVG (or None: nothing to draw). Where drawing it raises
        anything (a record it cannot draw, matplotlib's own errors), a note in its place and in
        :attr:`failed`, one line with the error's type and message: the rest of the page stands."""
        try:
            return draw(self, *args)
        except Exception as e:          # noqa: BLE001: one figure lost, not the page
            return self.failure(what, e)

    def failure(self, what, error) -> str:
        line = f"{what} not drawn ({_why(error)})"
        self.failed.append(line)
        return f'<p class="note">{html.escape(line)}</p>'

    def colours(self, n):
        cmap = self.matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
        return [cmap(i % cmap.N) for i in range(n)]

    def figure(self, w, h, **margins):
        """A figure of ``w`` x ``h`` inches, its subplots' margins given in inches (left, right,
        top, bottom; a fixed layout: matplotlib's constrained layout doubles the drawing time)."""
        with self.matplotlib.rc_context(self.style):
            fig = self.Figure(figsize=(w, h))
        m = {"left": 0.6, "right": 0.2, "top": 0.4, "bottom": 0.5, **margins}
        fig.subplots_adjust(left=m["left"] / w, right=1 - m["right"] / w, top=1 - m["top"] / h,
                            bottom=m["bottom"] / h)
        return fig

    def svg(self, fig, label, cls="plot") -> str:
        self.n += 1
        buf = io.StringIO()
        with self.matplotlib.rc_context(self.style):
            fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
        text = buf.getvalue()
        text = text[text.index("<svg"):]
        text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)
        text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
        p = f"f{self.n}"
        text = re.sub(r'\bid="([^"]+)"', rf'id="{p}-\1"', text)
        text = re.sub(r"url\(#([^)]+)\)", rf"url(#{p}-\1)", text)
        text = re.sub(r'href="#([^"]+)"', rf'href="#{p}-\1"', text)
        text = text.replace("<svg", f'<svg role="img" aria-label="{html.escape(label)}" class="{cls}"', 1)
        return text


def _per_class_svg(plots: _Plots, entries, names, probe) -> str | None:
    have = [e for e in entries if any(probe in r.scores for r in e.runs)]
    if not have:
        return None
    n = len(names)
    cols = plots.colours(len(entries))
    colour = {e.name: cols[i] for i, e in enumerate(entries)}
    band = 0.8 / len(have)
    fig = plots.figure(10, 1.0 + n * max(0.22, 0.15 * len(have)), left=0.3 + 0.07 * max(len(str(c)) for c in names),
                       top=0.3, bottom=0.6)
    ax = fig.add_subplot()
    y = np.arange(n)
    for j, e in enumerate(have):
        per_seed = [[np.nan if v is None else v for v in r.scores[probe]["iou"]] for r in e.runs if probe in r.scores]
        stats = [_stat(col) for col in zip(*per_seed)]
        mean = np.array([s["mean"] or 0.0 for s in stats])
        std = np.array([s["std"] for s in stats])
        off = y - 0.4 + band * (j + 0.5)
        ax.barh(off, mean, height=band * 0.9, xerr=std, color=colour[e.name], label=e.name,
                error_kw={"elinewidth": 0.8, "capsize": 1.5, "ecolor": "0.25"})
        for row in per_seed:
            ax.plot(row, off, "o", ms=2.2, color="0.1", alpha=0.7, lw=0)
    ax.set_yticks(y, [str(c) for c in names])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (×100): bars the mean over seeds, whiskers ± std, dots each seed")
    ax.set_title(f"{PROBE_TITLES[probe]} IoU per class")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, frameon=True)
    return plots.svg(fig, f"{PROBE_TITLES[probe]} IoU per class")


def _levels_svg(plots: _Plots, entries) -> str | None:
    have = [e for e in entries if any(r.levels for r in e.runs)]
    if not have:
        return None
    fig = plots.figure(10, 3.0, left=0.7, top=0.35, bottom=0.55)
    axes = fig.subplots(1, 2, sharey=True, gridspec_kw={"wspace": 0.06})
    cols = plots.colours(len(entries))
    for i, e in enumerate(entries):
        if e not in have:
            continue
        rows = level_rows(e)
        xs = [r["level"] for r in rows if r["miou"]]
        for ax, key in zip(axes, ("miou", "many_to_one")):
            st = [r[key] for r in rows if r["miou"]]
            ax.errorbar(xs, [s["mean"] for s in st], yerr=[s["std"] for s in st], marker="o", ms=4, capsize=2,
                        color=cols[i], label=e.name)
    for ax, t in zip(axes, ("one-to-one (strict) mIoU", "many-to-one mIoU")):
        ax.set_title(t)
        ax.set_xlabel("level (finest first)")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].set_ylabel("mIoU (×100) at the level's granularity")
    axes[1].legend(fontsize=8)
    return plots.svg(fig, "every level's mIoU against its granularity")


def level_rows(e: Entry) -> list:
    """Every level of ``e`` over its seeds: clusters, granularity, strict and many-to-one mIoU (stats)."""
    runs = [r.levels for r in e.runs if r.levels]
    if not runs:
        return []
    out = []
    for i, lv in enumerate(runs[0]["levels"]):
        scored = [r["levels"][i]["scores"] for r in runs if i < len(r["levels"]) and r["levels"][i]["scores"]]
        out.append({"level": lv["level"], "clusters": lv["clusters"], "granularity": lv["granularity"],
                    "n_classes": lv.get("n_classes"),
                    "miou": _stat([s["miou"] for s in scored]) if scored else None,
                    "many_to_one": _stat([s["many_to_one"]["miou"] for s in scored]) if scored else None})
    return out


def consistency_rows(e: Entry) -> list:
    runs = [r.levels for r in e.runs if r.levels]
    if not runs:
        return []
    out = []
    for i, c in enumerate(runs[0]["consistency"]):
        got = [r["consistency"][i] for r in runs if i < len(r["consistency"])]
        out.append({"child": c["child"], "parent": c["parent"],
                    **{k: _stat([g.get(k) for g in got]) for k in ("consistency", "consistency_soft",
                                                                   "consistency_chance")}})
    return out


def _tree_svg(plots: _Plots, e: Entry, grans: dict) -> str | None:
    """The hierarchy of ``e``'s first seed with levels: the coarsest level on top, one box per
    cluster named by its majority class at the level's granularity and coloured by that class's
    many-to-one IoU, a line from each child to its parent in the plan (green: the parent has the
    child's class, red: not, grey: not judged)."""
    run = next((r for r in e.runs if r.levels), None)
    if run is None:
        return None
    lv = run.levels
    entries = lv["levels"]
    L = len(entries)
    cmap = plots.matplotlib.colormaps["RdYlGn"]
    cls = [np.asarray(x["scores"]["many_to_one"]["cluster_to_class"]) if x["scores"] else
           -np.ones(x["clusters"], int) for x in entries]
    parents = [np.asarray(c["parents"]) if c.get("parents") is not None else None for c in lv["consistency"]]
    order = [None] * L
    order[L - 1] = sorted(range(entries[-1]["clusters"]), key=lambda k: (cls[-1][k] < 0, cls[-1][k], k))
    for l in range(L - 2, -1, -1):
        pos = {k: i for i, k in enumerate(order[l + 1])}
        par = parents[l] if parents[l] is not None else np.zeros(entries[l]["clusters"], int)
        order[l] = sorted(range(entries[l]["clusters"]), key=lambda k: (pos[int(par[k])], cls[l][k] < 0, cls[l][k], k))
    kmax = max(x["clusters"] for x in entries)
    width = min(max(10.0, 0.17 * kmax + 2.5), 30)
    height = 1.25 * L + 0.9
    fig = plots.figure(width, height)
    ax = fig.add_axes((0, 0.02, 1 - 0.9 / width, 1 - 0.75 / height))
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.2, L)
    ax.axis("off")
    xy = {}
    label_w = 1.9 / width
    for l, x in enumerate(entries):
        y = l                                 # the finest at the bottom
        K = x["clusters"]
        span = (1 - label_w) / K
        names = grans.get(x["granularity"]) if x["granularity"] else None
        fs = max(4.0, min(8.0, span * width * 72 / 10))
        for i, k in enumerate(order[l]):
            x0 = label_w + i * span
            c = int(cls[l][k])
            iou = x["scores"]["many_to_one"]["iou"][c] if (x["scores"] and c >= 0) else None
            fill = "0.85" if iou is None else cmap(iou / 100)
            ax.add_patch(plots.matplotlib.patches.Rectangle((x0 + span * 0.06, y), span * 0.88, 0.45, facecolor=fill,
                                                            edgecolor="0.35", lw=0.5))
            name = (names[c] if names and 0 <= c < len(names) else str(c)) if c >= 0 else "—"
            ax.text(x0 + span / 2, y + 0.5, name, rotation=90, ha="center", va="bottom", fontsize=fs)
            xy[(l, k)] = (x0 + span / 2, y, y + 0.45)
        score = "" if x["scores"] is None else (f"\nmIoU {x['scores']['miou']:.1f} strict, "
                                                f"{x['scores']['many_to_one']['miou']:.1f} m-to-1")
        ax.text(0.005, y + 0.22, f"L{l}: {K} clusters\n→ {x['granularity'] or '(not scored)'}{score}", va="center",
                fontsize=7.5)
    for l in range(L - 1):
        if parents[l] is None:
            continue
        judged = lv["consistency"][l].get("consistent") or [None] * entries[l]["clusters"]
        for k in range(entries[l]["clusters"]):
            j = int(parents[l][k])
            cx, _, ctop = xy[(l, k)]
            px, pbottom, _ = xy[(l + 1, j)]
            col = "0.7" if judged[k] is None else ("#2a9d2a" if judged[k] else "#d62828")
            ax.plot([cx, px], [ctop, pbottom], color=col, lw=0.7)
    handles = [plots.matplotlib.lines.Line2D([], [], color=c, lw=1.5, label=t) for c, t in
               (("#2a9d2a", "child → parent: same class"), ("#d62828", "child → parent: another class"),
                ("0.7", "not judged"))]
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.01, 1 - 0.3 / height), fontsize=7,
               frameon=False, ncol=3)
    sm = plots.matplotlib.cm.ScalarMappable(cmap=cmap, norm=plots.matplotlib.colors.Normalize(0, 100))
    cax = fig.add_axes((1 - 0.75 / width, 0.12, 0.12 / width, 0.7))
    cb = fig.colorbar(sm, cax=cax)
    cb.set_label("many-to-one IoU of the node's class", fontsize=7)
    fig.text(0.01, 1 - 0.08 / height, f"{e.name}, seed {run.seed}", fontsize=10, va="top", weight="bold")
    return '<div class="scroll">' + plots.svg(fig, f"hierarchy tree of {e.name}", "plot tree") + "</div>"


def _base_name(entry: Entry) -> str:
    """The base whose loss trained ``entry``'s runs: its config's ``base`` (results.json's, or the
    first checkpoint's where the folder records none); a config from before the bases is STEGO's,
    :class:`~omh_ref.core.config.Config`'s default, as loading such a checkpoint makes it."""
    base = entry.config.get("base")
    return Config.base if base is None or base == "" else str(base)


def _curves_svg(plots: _Plots, entries) -> tuple:
    """(SVG or None, whether any log holds validation scores): one panel per logged quantity,
    every seed of every row in it (colour: the row, line style: the seed), shared step axis.

    The base's loss is each run's own base's part (its ``LOSS_PART``: STEGO's ``corr``, SmooSeg's
    ``smooth``), named by the base: a panel per base among the rows, each holding its own rows'
    runs only. A base this omh-ref does not know draws every base part its logs hold."""
    logs = {(e.name, r.seed): pictures.read_log(r.log) for e in entries for r in e.runs if r.log}
    if not logs:
        return None, False
    recs = [x for v in logs.values() for x in v]
    base_of = {e.name: _base_name(e) for e in entries}
    part_of = {name: getattr(bases.BASES.get(b), "LOSS_PART", None) for name, b in base_of.items()}
    base_parts = {b.LOSS_PART for b in bases.BASES.values()}
    logged = list(dict.fromkeys(n for n, _ in logs))                       # the rows with logs
    named = {}                                                             # base part -> the bases it is of
    for name in logged:
        if part_of[name] is not None:
            named.setdefault(part_of[name], []).append(base_of[name])
    unknown = any(part_of[name] is None for name in logged)
    found = pictures.loss_keys(recs)
    keys = [k for k in found if k == "loss"] + [p for p in named if p in found]
    keys += [k for k in found if k not in keys and (k not in base_parts or unknown)]
    keys += [k for k in ("val_miou", "val_acc") if any(k in x for x in recs)]
    if not keys:
        return None, False
    ncol = 2
    nrow = -(-len(keys) // ncol)
    fig = plots.figure(10, 1.9 * nrow + 0.9, top=0.75, left=0.7, bottom=0.55)
    axes = np.atleast_1d(fig.subplots(nrow, ncol, sharex=True, squeeze=False,
                                      gridspec_kw={"hspace": 0.45, "wspace": 0.18})).ravel()
    cols = plots.colours(len(entries))
    colour = {e.name: cols[i] for i, e in enumerate(entries)}
    seeds = sorted({s for _, s in logs})
    styles = ["-", "--", ":", "-."]
    style = {s: styles[i % len(styles)] for i, s in enumerate(seeds)}
    titles = {"loss": "loss (total)", "val_miou": "validation cluster mIoU (×100)",
              "val_acc": "validation cluster accuracy (×100)"}
    titles.update((p, " / ".join(dict.fromkeys(bs)) + f" base loss ({p})") for p, bs in named.items())
    for ax, key in zip(axes, keys):
        for (name, seed), rs in logs.items():
            if key in base_parts and part_of[name] not in (None, key):      # another base's loss
                continue
            pts = [(x["step"], x[key]) for x in rs if x.get(key) is not None and "step" in x]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, style[seed], color=colour[name], lw=1.1, marker="o" if len(pts) < 12 else None,
                        ms=2.5)
        level = key.rsplit("_", 1)[-1]
        ax.set_title(titles.get(key) or (f"cluster loss, level {level}" if key.startswith("clu_")
                                         else f"hierarchy loss, levels {level}→{int(level) + 1}"
                                         if key.startswith("hier_") and level.isdigit() else key))
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.axis("off")
    for ax in axes[max(len(keys) - ncol, 0):len(keys)]:
        ax.set_xlabel("step")
    Line2D = plots.matplotlib.lines.Line2D
    handles = [Line2D([], [], color=colour[e.name], lw=2, label=e.name) for e in entries if any(r.log for r in e.runs)]
    handles += [Line2D([], [], color="0.3", ls=style[s], lw=1.2, label=f"seed {s}") for s in seeds]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(handles), 6), fontsize=8,
               frameon=False)
    return plots.svg(fig, "training and validation curves"), any(k.startswith("val_") for k in keys)


# --------------------------------------------------------------------------------------------------
# The qualitative grid: masks computed here for a few validation rows
# --------------------------------------------------------------------------------------------------
class _Palettes:
    """One palette per granularity (its name and class names); the labels' own granularity takes
    :func:`omh_ref.evaluate.pictures.palette`, as every PNG of omh-ref does; a finer one shades of
    its classes' colours; any other a palette of its own. ``used`` lists what the legend shows."""

    def __init__(self):
        self.known, self.used = {}, {}

    def add(self, grans, main) -> None:
        mi = next((i for i, g in enumerate(grans) if g.name == main), None)
        for i, g in enumerate(grans):
            key = (g.name, tuple(g.class_names))
            if key in self.known:
                continue
            pal = None
            if mi is not None and i == mi:
                pal = pictures.palette(g.n_classes)
            elif mi is not None and i < mi:
                idx = np.arange(g.n_classes)
                for gg in grans[i:mi]:
                    idx = None if idx is None or gg.parent is None else np.asarray(gg.parent)[idx]
                if idx is not None:
                    n_main = grans[mi].n_classes
                    onehot = np.zeros((g.n_classes, n_main))
                    onehot[np.arange(g.n_classes), idx] = 1
                    pal = pictures.hierarchy_palettes([g.n_classes, n_main], [onehot])[0]
            self.known[key] = pal if pal is not None else pictures.palette(g.n_classes, seed=3 + i)

    def colour(self, gran, ids):
        key = (gran.name, tuple(gran.class_names))
        self.used.setdefault(key, gran)
        return pictures.colorize(ids, gran.n_classes, self.known[key])

    def legend_html(self) -> str:
        parts = []
        for key, g in self.used.items():
            pal = self.known[key]
            items = "".join(f'<li><span class="swatch" style="background:{_hex(pal[c])}"></span>'
                            f"{html.escape(str(n))}</li>" for c, n in enumerate(g.class_names))
            parts.append(f'<div class="legend-group"><h4>{html.escape(g.name)} ({g.n_classes})</h4><ul>{items}</ul></div>')
        parts.append('<div class="legend-group"><h4>other</h4><ul><li><span class="swatch" style="background:#000">'
                     "</span>ignore / no pixels matched</li></ul></div>")
        return '<div class="legend" id="legend" role="list" aria-label="legend">' + "".join(parts) + "</div>"


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(int(v) for v in rgb[:3])


def _png(arr) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(arr, np.uint8)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pca_rgb(feats, size) -> np.ndarray:
    """Features (k, h, w, C) as colours: their first three principal components over the k rows,
    each scaled to 0..255, upsampled (nearest) to ``size``."""
    k, h, w, C = feats.shape
    x = feats.reshape(-1, C).astype(np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    y = x @ vt[:3].T
    if y.shape[1] < 3:
        y = np.pad(y, ((0, 0), (0, 3 - y.shape[1])))
    lo, hi = y.min(axis=0), y.max(axis=0)
    y = (y - lo) / np.where(hi > lo, hi - lo, 1)
    img = (y * 255).round().astype(np.uint8).reshape(k, h, w, 3)
    H, W = size
    return np.stack([np.asarray(Image.fromarray(im).resize((W, H), Image.NEAREST)) for im in img])


@dataclass
class _Masks:
    entry: Entry
    seed: int
    rows: np.ndarray
    levels: list          # [(title, coloured (k, H, W, 3))]
    overlay: list         # k coloured overlays (of the eval level), or None
    note: str = ""


def _granularities(store, entry):
    n = len(entry.class_names) or None
    try:
        return load_granularities(store, n, [], entry.class_names or None, known=label_hierarchy)
    except InputError:
        return []


def _open_val(entry: Entry):
    labels = listed_labels(str(entry.val_features))
    if labels is None:
        raise InputError(f"{entry.val_features}: its feats.json names no labels file")
    return FeatureStore(entry.val_features, labels=labels)


def _reference_rows(store: FeatureStore, n) -> np.ndarray:
    """``n`` rows spread over the split (the first and the last among them)."""
    n = min(n, store.N)
    return np.unique(np.linspace(0, store.N - 1, n).round().astype(int)) if n > 0 else np.zeros(0, int)


def _rows_in(store: FeatureStore, names, fallback) -> tuple:
    """The rows of ``store`` holding the images ``names`` (the same pictures in another run's
    split), else ``fallback`` with a note."""
    listed = store.meta.get("images") or []
    where = {n: i for i, n in enumerate(listed)}
    if names and all(n in where for n in names):
        return np.array([where[n] for n in names]), ""
    return fallback, "its split does not hold the same images: rows of its own split at the same positions"


def _masks(entry: Entry, rows, palettes: _Palettes, main_name) -> _Masks | str:
    run = next((r for r in entry.runs if r.checkpoint), None)
    if run is None:
        return "no checkpoint of its own in the folder"
    if entry.val_features is None:
        return "its validation features are not where the folder's records say"
    try:
        store = _open_val(entry)
    except InputError as e:
        return str(e)
    params, cfg = checkpoint.load_params(run.checkpoint)
    flipped = FeatureStore(entry.flipped_features) if entry.flipped_features else None
    grans = {g.name: g for g in _granularities(store, entry)}
    preds = level_predictions(params, cfg, store, rows, flipped)
    levels = (run.levels or {}).get("levels") or []
    out, eval_mapped, eval_gran = [], None, None
    for lvl, pred in enumerate(preds):
        info = levels[lvl] if lvl < len(levels) else None
        K = cfg.levels[lvl]
        if info and info.get("scores") and info["granularity"] in grans:
            g = grans[info["granularity"]]
            m = np.asarray(info["scores"]["many_to_one"]["cluster_to_class"])
            title = f"L{lvl} · {K} clusters → {g.name}"
        elif lvl == cfg.eval_index and "cluster" in run.scores and main_name in grans:
            g = grans[main_name]
            m = np.asarray(run.scores["cluster"]["match"]["cluster_to_class"])
            title = f"L{lvl} · {K} clusters → {g.name} (Hungarian)"
        else:
            out.append((f"L{lvl} · {K} clusters (not scored)", pictures.colorize(pred, K)))
            continue
        mapped = np.where(pred < len(m), m[np.clip(pred, 0, len(m) - 1)], -1)
        out.append((title, palettes.colour(g, mapped)))
        if lvl == cfg.eval_index:
            eval_mapped, eval_gran = mapped, g
    ov = None
    if eval_mapped is not None:
        ov = (eval_mapped, eval_gran)
    return _Masks(entry, run.seed, rows, out, ov)


def _qualitative_html(entries, n_images) -> str:
    if n_images <= 0:
        return "<p>No images asked for (<code>--images 0</code>).</p>"
    if not any(e.val_features is not None for e in entries):
        return "<p>No validation features found in the folders: nothing to draw.</p>"
    ref, store, unlabelled = None, None, []
    for e in entries:                      # the first run whose validation split has labels
        if e.val_features is not None:
            try:
                ref, store = e, _open_val(e)
                break
            except InputError as err:
                ref = None
                unlabelled.append(str(err))
    if ref is None:
        return ("<p class=\"note\">No qualitative grid: it draws each image's label and every level's clusters as "
                "their matched classes, and the validation split has no labels ("
                + html.escape("; ".join(dict.fromkeys(unlabelled))) + ").</p>")
    rows = _reference_rows(store, n_images)
    names = [(store.meta.get("images") or [None] * store.N)[i] for i in rows]
    names = names if all(names) else None
    palettes = _Palettes()
    H, W = store.labels.shape[1:]
    main = _main_granularity(store, ref)
    palettes.add(_granularities(store, ref), main)
    paths = image_paths(store.meta, store.path)
    images = [load_rgb(paths[i], H) if paths is not None else None for i in rows]
    if all(im is not None and im.shape[:2] == (H, W) for im in images):
        image_title, image_note = "image", ""
    else:
        images = list(_pca_rgb(store.read(rows), (H, W)))
        image_title, image_note = "features (PCA)", (" The data list no readable images: the first column shows "
                                                     "the features' first three principal components as colours.")
    grans = {g.name: g for g in _granularities(store, ref)}
    labels = store.read_labels(rows)
    label_cells = [palettes.colour(grans[main], labels[i]) if main in grans else pictures.colorize(labels[i], 1)
                   for i in range(len(rows))]
    drawn, notes = [], []
    for e in entries:
        e_rows, note = rows, ""
        if e.val_features is not None and e is not ref and Path(e.val_features).resolve() != Path(ref.val_features).resolve():
            try:
                other = _open_val(e)
            except InputError as err:
                notes.append(f"{e.name}: no masks ({err})")
                continue
            palettes.add(_granularities(other, e), _main_granularity(other, e))
            e_rows, note = _rows_in(other, names, rows)
        got = _masks(e, e_rows, palettes, _main_granularity(store, e))
        if isinstance(got, str):
            notes.append(f"{e.name}: no masks ({got})")
            continue
        got.note = note
        drawn.append(got)
    nlev = max((len(m.levels) for m in drawn), default=0)
    head = ("<tr><th>" + html.escape(image_title) + "</th><th>label</th><th>run</th>"
            + "".join(f"<th>level {i}</th>" for i in range(nlev)) + "<th>overlay (eval level)</th></tr>")
    body = []
    for i, r in enumerate(rows):
        for j, m in enumerate(drawn):
            cells = []
            if j == 0:
                cap = html.escape(str(names[i])) if names else f"row {int(r)}"
                span = f' rowspan="{len(drawn)}"'
                cells.append(f'<td{span}><figure><img src="{_png(images[i])}" alt="{image_title} {cap}">'
                             f"<figcaption>{cap}</figcaption></figure></td>")
                cells.append(f'<td{span}><figure><img src="{_png(label_cells[i])}" alt="label {cap}">'
                             f"<figcaption>{html.escape(main)}</figcaption></figure></td>")
            cells.append(f'<th scope="row" class="run">{html.escape(m.entry.name)}<br><small>seed {m.seed}'
                         + (f"; {html.escape(m.note)}" if m.note else "") + "</small></th>")
            for t, arr in m.levels:
                cells.append(f'<td><figure><img src="{_png(arr[i])}" alt="{html.escape(t)}">'
                             f"<figcaption>{html.escape(t)}</figcaption></figure></td>")
            cells += ["<td></td>"] * (nlev - len(m.levels))
            if m.overlay is not None:
                mapped, g = m.overlay
                colours = palettes.colour(g, mapped[i])
                ov = pictures.overlay(images[i], colours, ids=mapped[i]) if image_title == "image" else \
                    pictures.overlay(images[i], colours, alpha=0.6, ids=mapped[i])
                cells.append(f'<td><figure><img src="{_png(ov)}" alt="overlay"><figcaption>{html.escape(g.name)}'
                             "</figcaption></figure></td>")
            else:
                cells.append("<td></td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
    legend = palettes.legend_html()
    text = [f"<p>The same {len(rows)} validation image(s) for every run (rows spread over the split), each run's "
            "first seed with a checkpoint. Each level's clusters are shown as their majority class at the level's "
            "granularity (the many-to-one matching of the levels' scores, over the whole split); the overlay is "
            "the eval level's mask over the picture." + image_note + "</p>", legend]
    if drawn:
        text.append(f'<div class="scroll"><table class="grid"><thead>{head}</thead><tbody>{"".join(body)}</tbody>'
                    "</table></div>")
    text += [f"<p class=\"note\">{html.escape(n)}</p>" for n in notes]
    return "\n".join(text)


def _main_granularity(store: FeatureStore, entry: Entry) -> str:
    """The name of the granularity of the labels file evaluation scored (``labels.npy``'s)."""
    grans = _granularities(store, entry)
    for g in grans:
        if store.labels_path is not None and Path(g.labels).resolve() == Path(store.labels_path).resolve() \
                and g.lut is None:
            return g.name
    for g in grans:
        if g.n_classes == len(entry.class_names):
            return g.name
    return grans[0].name if grans else "classes"


# --------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1b1b1b;background:#fafafa}
header,main{max-width:1200px;margin:0 auto;padding:0 20px}
header{padding-top:16px}
h1{font-size:22px;margin:8px 0}h2{font-size:18px;border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:18px 0 6px}h4{font-size:12px;margin:4px 0}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:6px 16px}
section{background:#fff;border:1px solid #e4e4e4;border-radius:6px;padding:4px 16px 16px;margin:16px 0}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
thead th{background:#f1f3f5}
table.sortable thead th{cursor:pointer;user-select:none}
table.sortable thead th::after{content:" \\2195";color:#aaa}
table.sortable thead th[aria-sort=ascending]::after{content:" \\25B2";color:#333}
table.sortable thead th[aria-sort=descending]::after{content:" \\25BC";color:#333}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.differs td,tr.differs th{background:#fff6d6}
table.settings td,table.config td{max-width:360px;overflow-wrap:anywhere}
table.settings th,table.config th{white-space:nowrap}
.scroll{overflow-x:auto}
svg.plot{max-width:100%;height:auto;display:block;margin:8px 0}
svg.tree{max-width:none}
figure{margin:0;text-align:center}
figure img{width:112px;height:112px;image-rendering:pixelated;display:block;margin:0 auto}
figcaption{font-size:11px;color:#555;max-width:130px}
table.grid th.run{white-space:nowrap;font-weight:600}
.legend{display:flex;flex-wrap:wrap;gap:4px 24px;margin:8px 0;padding:8px;border:1px solid #ddd;background:#fcfcfc}
.legend ul{list-style:none;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:2px 12px}
.legend li{font-size:12px;white-space:nowrap}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #666;margin-right:4px;vertical-align:-2px}
.note{color:#555;font-size:13px}
code{background:#f1f3f5;padding:0 3px;border-radius:3px}
"""

# Sortable tables: a click on a column's header sorts the body's rows by that column (numbers by
# the cell's data-v value, else its text; a second click reverses; empty cells last).
SCRIPT = """
(function () {
  function key(row, i) {
    var c = row.cells[i];
    if (!c) return null;
    var v = c.hasAttribute('data-v') ? c.getAttribute('data-v') : c.textContent.trim();
    if (v === '' || v === 'n/a') return null;
    var n = Number(v);
    return isNaN(n) ? v.toLowerCase() : n;
  }
  document.querySelectorAll('table.sortable thead th').forEach(function (th) {
    th.addEventListener('click', function () {
      var table = th.closest('table'), body = table.tBodies[0], i = th.cellIndex;
      var asc = th.getAttribute('aria-sort') !== 'ascending';
      table.querySelectorAll('thead th').forEach(function (h) { h.removeAttribute('aria-sort'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = key(a, i), y = key(b, i);
        if (x === null || y === null) return (x === null) - (y === null);
        var t = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
        return asc ? t : -t;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
})();
"""


def _cell(v, num=None) -> str:
    """A table cell showing ``v``; with ``num``, a number cell sorted by ``num`` (its data-v)."""
    if num is None:
        return f"<td>{html.escape(str(v))}</td>"
    return f'<td class="num" data-v="{html.escape(str(num), quote=True)}">{html.escape(str(v))}</td>'


def _num(stat):
    return "" if stat is None or stat["mean"] is None else f"{stat['mean']:.6g}"


def _table(head, rows, sortable=True, cls="") -> str:
    c = " ".join(x for x in ("sortable" if sortable else "", cls) if x)
    return (f'<div class="scroll"><table class="{c}"><thead><tr>' + "".join(f"<th>{html.escape(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join("<tr>" + "".join(r) + "</tr>" for r in rows) + "</tbody></table></div>")


def _side_by_side(entries, records, cls) -> str:
    """A table of ``records`` ([{what: value}] per entry), a column per entry; a row whose values
    differ between the entries that have it is highlighted."""
    keys = list(dict.fromkeys(k for r in records for k in r))
    rows = []
    for k in keys:
        vals = [_shown(r[k]) if k in r else "" for r in records]
        known = {v for v, r in zip(vals, records) if k in r}
        differs = len(known) > 1
        mark = ' class="differs"' if differs else ""
        rows.append(f"<tr{mark}><th>{html.escape(k)}</th>"
                    + "".join(_cell(v) for v in vals) + "</tr>")
    return (f'<div class="scroll"><table class="{cls}"><thead><tr><th>what</th>'
            + "".join(f"<th>{html.escape(e.name)}</th>" for e in entries)
            + f"</tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _shown(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _settings_html(entries) -> str:
    records = []
    for e in entries:
        rec = {"kind": f"omh-ref {e.kind}", "folder": str(e.folder),
               "seeds in the report": ", ".join(str(r.seed) for r in e.runs)}
        rec.update(e.settings)
        rec.update((k, v) for k, v in e.provenance if v is not None)
        records.append(rec)
    out = ["<p class=\"note\">What each run was given and what it was made from; a row whose values differ "
           "between the runs is highlighted.</p>", _side_by_side(entries, records, "settings")]
    out += [f'<p class="note">{html.escape(e.name)}: {html.escape(str(n))}</p>' for e in entries for n in e.notes]
    with_config = [e for e in entries if e.config]
    if with_config:
        out.append("<h3>Model config</h3><p class=\"note\">Every field of each run's config (the first "
                   "checkpoint's where the folder records none).</p>"
                   + _side_by_side(with_config, [e.config for e in with_config], "config"))
    return "\n".join(out)


def _results_html(entries) -> str:
    keys = metric_keys(entries)
    if not keys:
        return "<p>No scores in these folders.</p>"
    head = ["run", "seeds"] + [metric_title(*k) + " (mean ± std)" for k in keys]
    rows, partial = [], False
    for e in entries:
        r = [f"<th>{html.escape(e.name)}</th>", _cell(len(e.runs), len(e.runs))]
        for k in keys:
            s = summary(e, *k)
            partial = partial or _partial(s)
            r.append(_cell(_pm(s, 2), _num(s)))
        rows.append(r)
    out = ["<p>Scores ×100 over each run's seeds: mean ± sample standard deviation. Click a column's "
           "header to sort.</p>", _table(head, rows, cls="results")]
    if partial:
        out.append("<p class=\"note\">A value marked <em>mean of k of N seeds</em> leaves out the seeds whose "
                   "score is missing or not a number (NaN in the table per seed): it is the mean of the other k, "
                   "where the summary of <code>results.json</code>, over every seed, says NaN.</p>")
    head = ["run", "seed"] + [metric_title(*k) for k in keys]
    rows = []
    for e in entries:
        for run in e.runs:
            r = [f"<th>{html.escape(e.name)}</th>", _cell(run.seed, run.seed)]
            for p, s in keys:
                v = run.scores.get(p, {}).get(s)
                if v is None:
                    r.append(_cell("n/a", ""))
                else:
                    v = float(v)
                    r.append(_cell(f"{v:.2f}", f"{v:.6g}") if np.isfinite(v) else _cell("NaN" if v != v else v, ""))
            rows.append(r)
    out += ["<h3>Per seed</h3>", _table(head, rows, cls="per-seed")]
    return "\n".join(out)


def _per_class_html(plots, entries) -> str:
    groups = {}
    for e in entries:
        groups.setdefault(tuple(e.class_names), []).append(e)
    out = []
    for names, es in groups.items():
        if len(groups) > 1:
            out.append(f"<h3>{html.escape(', '.join(e.name for e in es))}</h3>")
        for probe in PROBES:
            svg = plots.drawn(f"{PROBE_TITLES[probe]} IoU per class", _per_class_svg, es, names, probe)
            if svg:
                out.append(svg)
        probes = [p for p in PROBES if any(p in r.scores for e in es for r in e.runs)]
        head = ["class"] + [f"{e.name}: {PROBE_TITLES[p]}" for e in es for p in probes]
        rows = []
        for c, n in enumerate(names):
            r = [_cell(n)]
            for e in es:
                for p in probes:
                    s = _stat([r_.scores[p]["iou"][c] if p in r_.scores and c < len(r_.scores[p]["iou"]) else None
                               for r_ in e.runs])
                    r.append(_cell(_pm(s), _num(s)))
            rows.append(r)
        if probes:
            out.append("<details><summary>The same numbers as a table (mean ± std, ×100)</summary>"
                       + _table(head, rows, cls="per-class") + "</details>")
    return "\n".join(out) or "<p>No per-class scores in these folders.</p>"


def _levels_html(plots, entries) -> str:
    have = [e for e in entries if any(r.levels for r in e.runs)]
    if not have:
        return ("<p>No per-level scores in these folders (an <code>eval.json</code> written before they were "
                "recorded: run the seeds' evaluation again).</p>")
    out = ["<p>Every level's clusters scored against the label granularity with the closest number of classes "
           "at or below its cluster count: one-to-one (strict Hungarian, every pixel counted) and many-to-one "
           "(every cluster as its majority class). Consistency: the share of a child level's pixels whose cluster's "
           "parent in the plan has the same class at the parent's granularity; a blind plan's beside it.</p>"]
    svg = plots.drawn("every level's mIoU against its granularity", _levels_svg, have)
    if svg:
        out.append(svg)
    rows = []
    for e in have:
        for r in level_rows(e):
            rows.append([f"<th>{html.escape(e.name)}</th>", _cell(f"L{r['level']}", r["level"]),
                         _cell(r["clusters"], r["clusters"]), _cell(r["granularity"] or "(not scored)"),
                         _cell(r["n_classes"] or "", r["n_classes"] or ""), _cell(_pm(r["miou"], 2), _num(r["miou"])),
                         _cell(_pm(r["many_to_one"], 2), _num(r["many_to_one"])),
                         _cell(", ".join("n/a" if v is None else f"{v:.1f}" for v in (r["miou"] or {}).get("values", [])))])
    out.append(_table(["run", "level", "clusters", "granularity", "classes", "mIoU (strict)", "many-to-one mIoU",
                       "mIoU per seed"], rows, cls="levels"))
    rows = []
    for e in have:
        for c in consistency_rows(e):
            rows.append([f"<th>{html.escape(e.name)}</th>", _cell(f"L{c['child']} → L{c['parent']}", c["child"]),
                         _cell(_pm(c["consistency"], 3), _num(c["consistency"])),
                         _cell(_pm(c["consistency_soft"], 3), _num(c["consistency_soft"])),
                         _cell(_pm(c["consistency_chance"], 3), _num(c["consistency_chance"]))])
    if rows:
        out.append(_table(["run", "levels", "consistency", "soft consistency", "a blind plan's"], rows,
                          cls="consistency"))
    out.append("<h3>The hierarchy</h3><p>Per run (its first seed), the levels as rows, the coarsest on top: one box "
               "per cluster, named by its majority class at the level's granularity (which classes a level merges "
               "shows as several boxes of one name) and coloured by that class's many-to-one IoU; a line from each "
               "child cluster to its parent in the plan, green where the parent has the child's class.</p>")
    for e in have:
        grans = _tree_names(e)
        svg = plots.drawn(f"hierarchy tree of {e.name}", _tree_svg, e, grans)
        if svg:
            out.append(svg)
    return "\n".join(out)


def _tree_names(e: Entry) -> dict:
    """{granularity name: class names} for ``e``'s tree: from its validation features' label
    hierarchy, else its class names for every granularity."""
    if e.val_features is not None:
        try:
            store = _open_val(e)
            return {g.name: list(g.class_names) for g in _granularities(store, e)}
        except InputError:
            pass
    run = next((r for r in e.runs if r.levels), None)
    return {g["name"]: e.class_names for g in (run.levels.get("granularities") or [])} if run else {}


def _curves_html(plots, entries) -> str:
    try:
        svg, has_val = _curves_svg(plots, entries)
    except Exception as e:              # noqa: BLE001: one figure lost, not the page
        return plots.failure("training and validation curves", e)
    if svg is None:
        return "<p>No training logs (<code>log.jsonl</code>) in these folders.</p>"
    note = ("" if has_val else "<p class=\"note\">No validation during training in these runs (<code>omh-ref train "
            "--val-features</code> logs it): the training losses only.</p>")
    return ("<p>Every logged quantity against the step, every seed of every run on the same axes (colour: the "
            "run, line style: the seed).</p>" + note + svg)


def render(entries, images=4, title=None, say=None) -> str:
    """The page of ``entries`` (needs matplotlib). A figure that cannot be drawn is a note in its
    place (a section that cannot be made, in the section's), and a line to ``say``: the rest of the
    page stands."""
    plots = _Plots()
    title = title or "omh-ref report: " + ", ".join(e.name for e in entries)
    build = {"settings": lambda: _settings_html(entries), "results": lambda: _results_html(entries),
             "per-class": lambda: _per_class_html(plots, entries), "levels": lambda: _levels_html(plots, entries),
             "curves": lambda: _curves_html(plots, entries), "qualitative": lambda: _qualitative_html(entries, images)}
    with plots.context():
        parts = {k: plots.drawn(f"section {SECTIONS[k]!r}", lambda _, b=b: b()) for k, b in build.items()}
    for line in plots.failed if say else ():
        say(f"report: {line}")
    nav = "".join(f'<li><a href="#{k}">{html.escape(v)}</a></li>' for k, v in SECTIONS.items())
    body = "".join(f'<section id="{k}"><h2>{html.escape(SECTIONS[k])}</h2>\n{parts[k]}\n</section>\n' for k in SECTIONS)
    folders = ", ".join(dict.fromkeys(str(e.folder) for e in entries))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><p class=\"note\">Written by omh-ref {__version__} from "
            f"{html.escape(folders)}. Self-contained: every picture is inside this file.</p>"
            f"<nav aria-label=\"sections\"><ul>{nav}</ul></nav></header><main>{body}</main>"
            f"<script>{SCRIPT}</script></body></html>\n")


def run(opts: ReportOptions, say=print) -> Path:
    """Read ``opts.runs``, write the page (atomically, its folder held locked) -> its path."""
    if not opts.runs:
        raise InputError("give at least one run folder")
    if not available():
        raise InputError(missing_extra())
    if opts.out is None and len(opts.runs) > 1:
        raise InputError("--out: several folders side by side need the file to write (e.g. --out report.html)")
    out = Path(opts.out) if opts.out is not None else Path(opts.runs[0]) / NAME
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder (expected the HTML file to write)")
    entries = [e for folder in opts.runs for e in read(folder)]
    _named_apart(entries)
    page = render(entries, opts.images, opts.title, say=say)
    out.parent.mkdir(parents=True, exist_ok=True)
    with FolderLock(out.parent, "report", say=say):
        write_text(out, page)
    return out


def _why(error) -> str:
    """``error`` on one line: its type and message, cut to :data:`WHY_CHARS`."""
    why = " ".join(str(error).split())
    return f"{type(error).__name__}: " + (why if len(why) <= WHY_CHARS else why[:WHY_CHARS - 1] + "…")


def write_after(folder, say=print) -> Path | None:
    """The report a job writes when it has finished a folder (``seeds``, ``recipe``, ``demo``):
    ``FOLDER/report.html``. Without matplotlib, or when it cannot be written for any reason (bad
    input, a full disk, a bug here), one line says so, why (the error's type and message, cut short)
    and how to write it later; the job's own results stand either way, so nothing is raised."""
    again = shlex.join(options.command("report") + [str(folder)])
    if not available():
        say(f"report: {Path(folder) / NAME} not written: it needs matplotlib (pip install 'omh-ref[{EXTRA}]', "
            f"then {again})")
        return None
    try:
        path = run(ReportOptions(runs=(str(folder),)), say=say)
    except Exception as e:        # noqa: BLE001: the job is done; its report is an extra
        say(f"report: {Path(folder) / NAME} not written ({_why(e)}); the results are; {again} tries again")
        return None
    say(f"report: wrote {path}")
    return path
