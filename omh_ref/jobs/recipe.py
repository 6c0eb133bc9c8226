"""``omh-ref recipe``: a benchmark run end to end from a recipe file (``configs/<name>.toml``).

A recipe holds three tables: ``[model]`` (Config fields), ``[train]`` (the loop's settings) and
``[recipe]`` (the data set, the backbone, crops, resolutions, the probe budget), each value with
its source in a comment. :func:`run` carries it out under one folder ``RUN``, held locked:

=====================  ==========================================================================
stage                  output, and when it counts as done (a rerun skips it)
=====================  ==========================================================================
export (a ``.pth``)    ``RUN/weights/<family>_<arch><patch>_<res>.onnx`` per resolution (e.g.
                       ``dino_vits8_224.onnx``, ``dinov2_vitb14_322.onnx``), each recorded in
                       ``RUN/weights/manifest.json`` with its sha256 after its onnxruntime check
extract train          ``RUN/feats/train``: ``feats.json`` written (extraction resumes by chunks)
extract val            ``RUN/feats/val`` at the evaluation resolution, with flips when the recipe
                       says so
knn                    ``RUN/feats/train/feats.knn.npy`` whose sidecar names these features
train, eval per seed   ``RUN/seed<N>/`` (:mod:`omh_ref.jobs.seeds`: a checkpoint at the last
                       step; ``eval.json`` of this checkpoint and these settings)
results                ``RUN/results.json``, ``RUN/results.md``: mean ± std per metric, per seed;
                       ``RUN/report.html`` (the seeds job writes it, with omh-ref[report])
=====================  ==========================================================================

A stage whose folder holds output of other settings (another backbone file, crop, data root,
config) is refused in one line rather than mixed. :func:`plan` lists the stages as the
``omh-ref`` commands that do the same work (``--dry-run``).

The export runs :mod:`omh_ref.extract.export_dino` (``omh-ref export``; it needs torch:
``omh-ref[torch]``). Without torch, export the ``.onnx`` files where it is installed and pass them
instead of the ``.pth``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..core import options
from ..core.config import Config, merge, read_file, with_base_defaults
from ..core.errors import InputError
from ..core.files import file_sha256, write_json
from ..core.lock import FolderLock
from ..extract import archs
from ..extract.backbone import inspect_model, session
from ..extract.classes import CLASS_NAMES
from ..extract.datasets import READERS, open_dataset
from ..extract.job import PROGRESS, ExtractOptions, extract
from ..features.knn import build_knn, cached_table, default_path
from ..features.store import FeatureStore
from ..train.loop import FILE_KEYS, TrainOptions, loop_settings
from . import seeds as seeds_job

ARCH_DIMS = {"vit_small": 384, "vit_base": 768}          # export_dino.ARCHS: the sizes a recipe names
ARCH_SHORT = {"vit_small": "vits", "vit_base": "vitb"}    # its file names: dino_vits8_224.onnx
CROPS = ("center", "five")
PATCHES = sorted({p for f in archs.FAMILIES.values() for p in f.patches})
# [recipe] keys: (type, check, what the check wants)
RECIPE_KEYS = {
    "dataset": (str, lambda v: v in READERS, f"one of {', '.join(READERS)}"),
    "arch": (str, lambda v: v in ARCH_DIMS, f"one of {', '.join(ARCH_DIMS)}"),
    "patch": (int, lambda v: v in PATCHES, " or ".join(map(str, PATCHES))),
    "train_resolution": (int, lambda v: v >= 1, "a positive number of pixels"),
    "train_crop": (str, lambda v: v in CROPS, "center or five"),
    "knn_k": (int, lambda v: v >= 1, "a positive integer"),
    "eval_resolution": (int, lambda v: v >= 1, "a positive number of pixels"),
    "eval_flip": (bool, lambda v: True, "true or false"),
    "probe_crops": (int, lambda v: v >= 1, "a positive integer"),
}
# [recipe] keys a recipe may leave out (the DINO recipes do): the backbone's family and its register
# (DINOv3: storage) tokens, default the family's own (extract/archs.py)
OPTIONAL_KEYS = {
    "family": (str, lambda v: v in archs.FAMILIES, f"one of {', '.join(archs.FAMILIES)}"),
    "registers": (int, lambda v: 0 <= v <= archs.MAX_REGISTERS, f"0 to {archs.MAX_REGISTERS}"),
}


def configs_dir() -> Path:
    """The recipes of the checkout this package runs from (``<repository>/configs``)."""
    return Path(__file__).resolve().parents[2] / "configs"


def names() -> list:
    """The recipe names that :func:`find` resolves without a path."""
    d = configs_dir()
    return sorted(p.stem for p in d.glob("*.toml")) if d.is_dir() else []


def find(name) -> Path:
    """A recipe's file: ``name`` itself when it is a file, else ``configs/<name>.toml``."""
    p = Path(name)
    if p.suffix in (".toml", ".json") and p.is_file():
        return p
    cand = configs_dir() / f"{name}.toml"
    if cand.is_file():
        return cand
    known = names()
    raise InputError(f"recipe {name!r}: not a recipe file and not one of "
                     + (", ".join(known) if known else f"the recipes (no {configs_dir()} here: this omh-ref is "
                        "installed outside its checkout; pass the .toml's path)"))


@dataclass(frozen=True)
class Recipe:
    """A recipe file, checked: its three tables (after any overrides) and the model Config."""

    name: str
    path: str
    model: dict
    train: dict          # [train] over the loop defaults: steps, batch_size, lr, lr_clusters, ...
    settings: dict       # [recipe]
    config: Config

    @property
    def n_classes(self) -> int:
        return len(CLASS_NAMES[self.settings["dataset"]])

    @property
    def resolutions(self) -> tuple:
        s = self.settings
        return tuple(sorted({s["train_resolution"], s["eval_resolution"]}))


def backbone_spec(settings: dict) -> archs.Spec:
    """The backbone a recipe's [recipe] table names (:mod:`omh_ref.extract.archs`)."""
    return archs.Spec(settings["family"], settings["arch"], settings["patch"], settings["registers"])


def _loop_defaults() -> dict:
    d = {f.name: f.default for f in dataclasses.fields(TrainOptions)}
    return {k: d[k] for k in FILE_KEYS}


def load(name, overrides=None) -> Recipe:
    """Read and check a recipe (:func:`find`), with ``overrides`` ({'model'|'train'|'recipe':
    {key: value}}) laid over its tables. Every problem is an InputError naming the file and key."""
    path = find(name)
    tables = read_file(path)
    overrides = overrides or {}
    unknown = sorted(set(overrides) - {"model", "train", "recipe"})
    if unknown:
        raise InputError(f"recipe overrides: unknown table(s) {', '.join(unknown)} (model, train, recipe)")
    if "recipe" not in tables:
        raise InputError(f"{path}: has no [recipe] table (the data set, backbone, crops and resolutions); "
                         "see configs/ for the form")
    settings = {**tables["recipe"], **overrides.get("recipe", {})}
    for key in sorted(set(settings) - set(RECIPE_KEYS) - set(OPTIONAL_KEYS)):
        raise InputError(f"{path}: unknown [recipe] key {key!r} (known: {', '.join([*RECIPE_KEYS, *OPTIONAL_KEYS])})")
    settings.setdefault("family", "dino")
    if settings["family"] in archs.FAMILIES:
        settings.setdefault("registers", archs.family(settings["family"]).registers)
    for key, (typ, ok, want) in {**RECIPE_KEYS, **OPTIONAL_KEYS}.items():
        if key not in settings:
            raise InputError(f"{path}: [recipe] needs {key!r} ({want})")
        v = settings[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)) or not ok(v):
            raise InputError(f"{path}: [recipe] {key}: expected {want}, got {v!r}")
    spec = backbone_spec(settings)
    if archs.hub_name(spec.family, spec.size, spec.patch, spec.registers) not in archs.hub_names():
        f = archs.family(spec.family)
        raise InputError(f"{path}: [recipe] names {f.title} {spec.size} at patch {spec.patch} with {spec.registers} "
                         f"registers, which {f.title} did not release (patches {', '.join(map(str, f.patches))}; "
                         f"the released models: {', '.join(archs.hub_names_of(spec.family))})")
    for key in ("train_resolution", "eval_resolution"):
        if settings[key] % settings["patch"]:
            raise InputError(f"{path}: [recipe] {key} {settings[key]} is not a multiple of patch {settings['patch']}")
    model = {**tables["model"], **overrides.get("model", {})}
    config = merge(with_base_defaults({"base": model.get("base", "stego")}), model, source=path)
    want_dim = ARCH_DIMS[settings["arch"]]
    if "in_dim" not in model or config.in_dim != want_dim:
        raise InputError(f"{path}: [model] in_dim should be {want_dim}, the size of {settings['arch']}'s features, "
                         f"got {model.get('in_dim')!r}")
    train = loop_settings(_loop_defaults(), {**tables["train"], **overrides.get("train", {})}, set(), path,
                          base_name=config.base)
    rec = Recipe(Path(path).stem, str(path), model, train, settings, config)
    if config.eval_k != rec.n_classes:
        raise InputError(f"{path}: the eval level has {config.eval_k} clusters but {settings['dataset']} has "
                         f"{rec.n_classes} classes (levels {list(config.levels)}, eval_level {config.eval_level})")
    return rec


# --------------------------------------------------------------------------------------------------
# Options and the stages
# --------------------------------------------------------------------------------------------------
@dataclass
class RecipeOptions:
    """What ``omh-ref recipe`` takes."""

    name: str                              # a recipe name (configs/<name>.toml) or a file
    root: str                              # the data set's folder
    weights: tuple                         # one DINO .pth, or .onnx files covering both resolutions
    out: str                               # RUN
    backbone: str | None = None            # vit_small | vit_base: checked against the recipe's
    seeds: tuple = (0, 1, 2)
    crf: bool = False
    probe: bool = True                     # the linear probe on the training crops
    scheduler: str | None = None           # Dask: extraction, the KNN table and the seeds' runs
    device: str = "cpu"
    progress: bool = True
    overrides: dict = field(default_factory=dict)   # laid over the recipe's tables (:func:`load`)


@dataclass
class Stage:
    name: str
    command: list                          # the equivalent command line
    done: bool                             # its output is complete (the run skips it)
    run: object = None                     # () -> None
    why: str = ""                          # what it does with which settings, and where each comes from


_SHA: dict = {}       # (path, size, mtime) -> sha256: the run plans again after every stage


def _sha256(path) -> str:
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA:
        _SHA[key] = file_sha256(path)
    return _SHA[key]


def _check_weights(rec: Recipe, opts: RecipeOptions):
    """-> ('pth', path) or ('onnx', [paths]) after checking the files exist and are of one kind."""
    if opts.backbone is not None and opts.backbone != rec.settings["arch"]:
        raise InputError(f"--backbone {opts.backbone}: recipe {rec.name} is for {rec.settings['arch']} "
                         f"(choose the {ARCH_SHORT[opts.backbone]}{rec.settings['patch']} recipe)")
    paths = [Path(w) for w in opts.weights]
    if not paths:
        raise InputError("--weights: give a DINO checkpoint (.pth) or the exported .onnx files")
    if len(paths) == 1 and paths[0].is_dir():          # a Hugging Face model folder (save_pretrained's)
        return "pth", paths[0]
    for p in paths:
        if not p.is_file():
            raise InputError(f"--weights {p}: no such file (expected a DINO .pth, a Hugging Face .safetensors or "
                             "model folder, or an .onnx from omh-ref export)")
    kinds = {p.suffix for p in paths}
    if len(kinds) == 1 and kinds <= set(archs.CHECKPOINT_SUFFIXES) and len(paths) == 1:
        return "pth", paths[0]
    if kinds == {".onnx"}:
        return "onnx", paths
    raise InputError(f"--weights {' '.join(map(str, paths))}: expected one checkpoint (.pth, .safetensors or a "
                     "Hugging Face folder), or .onnx files (one per resolution, or one taking any size)")


def _exported(rec: Recipe, out: Path) -> dict:
    """{resolution: .onnx path} the export stage writes under RUN/weights."""
    spec = backbone_spec(rec.settings)
    return {r: out / "weights" / f"{archs.model_name(spec, r)}.onnx" for r in rec.resolutions}


def _export_done(rec, out, pth) -> bool:
    manifest = out / "weights" / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        entries = {m.get("file"): m for m in json.loads(manifest.read_text()).get("models", [])}
    except (OSError, ValueError):
        return False
    want = archs.checkpoint_sha256(pth) if Path(pth).is_dir() else _sha256(pth)
    attention = hp_inputs(rec)["attention"]     # an export made without the attention output is not HP's
    for path in _exported(rec, out).values():
        m = entries.get(path.name)
        if not (path.is_file() and m and m.get("checkpoint_sha256") == want and m.get("sha256") == _sha256(path)
                and (m.get("attention") or not attention)):
            return False
    return True


def load_exporter():
    """:mod:`omh_ref.extract.export_dino`, imported on first use (it needs torch)."""
    try:
        from ..extract import export_dino
    except ImportError as e:
        raise InputError(f"--weights: exporting a .pth needs torch ({e}); pip install 'omh-ref[torch]', or "
                         "pass exported .onnx files instead") from None
    return export_dino


def _models(rec: Recipe, opts: RecipeOptions, out: Path) -> tuple:
    """(export stage or None, {resolution: .onnx path})."""
    kind, given = _check_weights(rec, opts)
    s = rec.settings
    if kind == "pth":
        models = _exported(rec, out)
        argv = options.command("export", **archs.export_args(backbone_spec(s)), checkpoint=str(given))[2:]
        for r in rec.resolutions:                                  # the export takes one flag per size
            argv += options.argv("resolution", r)
        argv += options.argv("out", str(out / "weights")) + options.argv("manifest", str(out / "weights" / "manifest.json"))
        if hp_inputs(rec)["attention"]:            # HP's local positives: the attention logits, a second output
            argv += ["--attention"]

        def run():
            if load_exporter().main(argv) != 0:
                raise InputError(f"--weights {given}: export failed (omh-ref export said why above); "
                                 "nothing after it ran")
        done = _export_done(rec, out, given)
        if not done:
            load_exporter()                        # without torch: the one-line error, before anything runs
        why = (f"export: {archs.describe(backbone_spec(s))} at {' and '.join(map(str, rec.resolutions))} px "
               f"(training crops {s['train_resolution']}, evaluation {s['eval_resolution']}: [recipe] "
               "train_resolution, eval_resolution)")
        return Stage("export", ["omh-ref", "export", *argv], done, run, why), models
    models = {}
    for p in given:
        key = (_sha256(p), opts.device)
        if key not in _INSPECTED:     # a forward of two images: once per file, not once per plan
            fixed = isinstance(session(p, opts.device).get_inputs()[0].shape[2], int)
            _INSPECTED[key] = inspect_model(p, device=opts.device), fixed
        bb, fixed = _INSPECTED[key]
        if bb.dim != ARCH_DIMS[s["arch"]] or (fixed and bb.patch != s["patch"]):
            raise InputError(f"--weights {p}: gives {bb.dim}-channel features with patch {bb.patch}; recipe "
                             f"{rec.name} needs {s['arch']} ({ARCH_DIMS[s['arch']]} channels), patch {s['patch']}")
        stated = bb.provenance()
        for key in ("family", "registers"):      # what an export states of itself, where it does
            if stated.get(key) is not None and stated[key] != s[key]:
                raise InputError(f"--weights {p}: is a {key} {stated[key]} backbone; recipe {rec.name} needs "
                                 f"{key} {s[key]} ({archs.describe(backbone_spec(s))})")
        for r in rec.resolutions:
            if r not in models and (not fixed or bb.resolution == r):
                models[r] = p
    missing = [r for r in rec.resolutions if r not in models]
    if missing:
        raise InputError(f"--weights: no model takes {missing[0]} px inputs (recipe {rec.name} extracts at "
                         f"{' and '.join(map(str, rec.resolutions))} px); export one with omh-ref export "
                         f"--resolution {missing[0]}, or pass the .pth")
    return None, models


_INSPECTED: dict = {}   # (sha256, device) -> (Backbone, whether its input size is fixed)


def _extract_stage(rec, opts, out, split, model, ds, say):
    """One split's extraction: done when its ``feats.json`` is there (and of these settings)."""
    s = rec.settings
    train = split == "train"
    folder = out / "feats" / split
    crop = s["train_crop"] if train else "center"
    flip = False if train else s["eval_flip"]
    res = s["train_resolution"] if train else s["eval_resolution"]
    # a model of one input size is chosen for this size (_models); one that takes any size is told it
    any_size = Path(model).is_file() and not _INSPECTED.get((_sha256(model), opts.device), (None, True))[1]
    hp = hp_inputs(rec) if train else {"attention": False, "augment": False}
    cmd = options.command("extract", model=str(model), dataset=s["dataset"], root=opts.root, split=split, crop=crop,
                          flip=flip, resolution=res if any_size else None, out=str(folder))
    cmd += ["--attention"] * hp["attention"] + ["--augment"] * hp["augment"]
    cmd += options.argv_if_changed("scheduler", opts.scheduler) + options.argv_if_changed("device", opts.device)
    want = {"dataset": ds.name, "split": split, "crop": crop, "flipped": "feats_flip.npy" if flip else None,
            "image_root": str(ds.root.resolve()), "resolution": res}
    if Path(model).is_file():
        want["onnx_sha256"] = _sha256(model)

    def run():
        eo = ExtractOptions(model=str(model), out=str(folder), resolution=res, crop=crop, flip=flip,
                            device=opts.device, progress=opts.progress, scheduler=opts.scheduler, **hp)
        extract(ds, eo, log=say)
    what = ("five crops of half the image's height and width (STEGO's training crops)" if crop == "five"
            else "one centre crop")
    why = (f"extract {split}: {len(ds)} images, {what} at {res} px"
           + (", and the mirrored crop (feats_flip.npy, averaged at evaluation)" if flip else "")
           + (", HP's attention window weights (attn.npy)" if hp["attention"] else "")
           + (", the features of one photometric augmentation per crop (feats_aug.npy)" if hp["augment"] else "")
           + f" -> {len(ds) * (5 if crop == 'five' else 1)} rows")
    return Stage(f"extract {split}", cmd, _extracted(folder, want, [k for k, v in
                                                                  (("attention", hp["attention"]),
                                                                   ("augmented", hp["augment"])) if v]), run, why)


def hp_inputs(rec: Recipe) -> dict:
    """What the training split's extraction adds for the recipe's base: HP reads attn.npy (always)
    and feats_aug.npy (where its consistency weight is not 0: Potsdam's is); the other bases
    neither. -> ExtractOptions fields {"attention": bool, "augment": bool}."""
    hp = rec.config.base == "hp"
    return {"attention": hp, "augment": hp and rec.config.consistency_weight > 0}


def _extracted(folder: Path, want: dict, companions=()) -> bool:
    """Whether ``folder`` holds a finished extraction with the fields ``want``s (and the row files
    ``companions`` names: attention, augmented); an InputError when it holds one of other settings."""
    meta = folder / "feats.json"
    if not meta.is_file() or (folder / PROGRESS).exists():
        return False
    m = json.loads(meta.read_text())
    diff = [k for k, v in want.items() if v is not None and m.get(k) != v] + [k for k in companions if not m.get(k)]
    if diff:
        raise InputError(f"{folder}: holds features of other settings ({', '.join(diff)} differ); choose another "
                         "--out, or remove that folder to extract again")
    return True


def _knn_stage(rec, opts, out):
    feats = out / "feats" / "train" / "feats.npy"
    k = rec.settings["knn_k"]
    cmd = options.command("knn", features=str(feats), k=k) + options.argv_if_changed("scheduler", opts.scheduler)
    done = feats.is_file() and cached_table(FeatureStore(feats), k, say=lambda *a: None) is not None

    def run():
        from ..core.progress import bar as progress_bar

        store = FeatureStore(feats)
        with FolderLock(feats.parent, "knn"), progress_bar(store.N, "knn", opts.progress, unit="img") as bar:
            build_knn(store, default_path(store), k=k, progress=bar.update, scheduler=opts.scheduler)
    why = f"knn: each training crop's {k} nearest crops by pooled feature (its partners; [recipe] knn_k)"
    return Stage("knn", cmd, done, run, why)


def probe_epochs(rec: Recipe, rows: int) -> int:
    """Epochs of the linear probe: about ``probe_crops`` training crops, at least one epoch."""
    return max(1, round(rec.settings["probe_crops"] / max(rows, 1)))


def _seeds_options(rec, opts, out, rows) -> seeds_job.SeedsOptions:
    val = out / "feats" / "val"
    s = rec.settings
    notes = [f"recipe {rec.name} ({rec.path}); data {opts.root}; weights {', '.join(map(str, opts.weights))}",
             f"{s['dataset']}, {archs.describe(backbone_spec(s))}: training crops {s['train_crop']} at "
             f"{s['train_resolution']} px, "
             f"evaluation at {s['eval_resolution']} px" + (" with flips" if s["eval_flip"] else ""),
             "cluster: Hungarian-matched clusters of the eval level; linear: the supervised linear probe "
             f"({probe_epochs(rec, rows)} epoch(s) on the training crops); cluster+CRF: the cluster predictions "
             "after a dense CRF",
             "OMH settings in this recipe are untested on real data (the recipe file says which values are ours)"]
    return seeds_job.SeedsOptions(
        features=str(out / "feats" / "train" / "feats.npy"), val_features=str(val / "feats.npy"), out=str(out),
        config=rec.config, seeds=tuple(opts.seeds), knn_k=s["knn_k"],
        flipped_features=str(val / "feats_flip.npy") if s["eval_flip"] else None, probe=opts.probe,
        probe_epochs=probe_epochs(rec, rows), crf=opts.crf, scheduler=opts.scheduler, device=opts.device,
        crf_workers=1 if opts.scheduler else max(1, os.cpu_count() or 1),   # on Dask a worker is one run
        progress=opts.progress, title=f"{rec.name}: {s['dataset']}, {len(opts.seeds)} seed(s)", notes=tuple(notes),
        **{k: rec.train[k] for k in ("steps", "batch_size", "lr", "lr_clusters", "ckpt_every", "log_every")},
        **{k: rec.train.get(k) for k in ("weight_decay", "grad_clip")})


def _seeds_command(rec, opts, so: seeds_job.SeedsOptions) -> list:
    cmd = options.command("seeds", features=so.features, val_features=so.val_features,
                          flipped_features=so.flipped_features, out=so.out, seed_list=so.seeds,
                          config_file=_shown(rec.path), steps=so.steps, batch_size=so.batch_size,
                          probe_epochs=so.probe_epochs, knn_k=so.knn_k)
    file_tables = read_file(rec.path)
    from_file = loop_settings(_loop_defaults(), file_tables["train"], set(), rec.path, base_name=rec.config.base)
    for key in ("lr", "lr_clusters", "weight_decay", "grad_clip"):   # what the run changes, as flags (steps and
        if rec.train.get(key) != from_file.get(key):                    # batch always said)
            cmd += options.argv(key, rec.train.get(key))
    for key, value in rec.model.items():
        if file_tables["model"].get(key) != value:
            cmd += options.argv(key, value, negatable=True)   # every config field flag is --x/--no-x
    for name in ("crf", "probe", "scheduler", "device"):
        cmd += options.argv_if_changed(name, getattr(so, name))
    return cmd


def plan(opts: RecipeOptions, say=print) -> list:
    """The recipe's stages, each with its equivalent command and whether it is done; reads only."""
    rec = load(opts.name, opts.overrides)
    seeds_job.parse_seeds(",".join(map(str, opts.seeds)))
    out = Path(opts.out)
    if not Path(opts.root).is_dir():
        raise InputError(f"--root {opts.root}: no such folder (expected the {rec.settings['dataset']} data set)")
    s = rec.settings
    data = {split: open_dataset(s["dataset"], opts.root, split) for split in ("train", "val")}
    export, models = _models(rec, opts, out)
    stages = [export] if export is not None else []
    extract_train = _extract_stage(rec, opts, out, "train", models[s["train_resolution"]], data["train"], say)
    stages += [extract_train, _extract_stage(rec, opts, out, "val", models[s["eval_resolution"]], data["val"], say),
               _knn_stage(rec, opts, out)]
    feats = out / "feats" / "train" / "feats.npy"
    rows = FeatureStore(feats).N if extract_train.done else len(data["train"]) * (5 if s["train_crop"] == "five" else 1)
    so = _seeds_options(rec, opts, out, rows)
    done = (out / "results.json").is_file() and _results_cover(out / "results.json", so)
    why = (f"train + eval per seed: seeds {','.join(map(str, so.seeds))}, {so.steps} steps at batch {so.batch_size} "
           f"([train] of {_shown(rec.path)}), evaluation at {s['eval_resolution']} px"
           + (f"; linear probe: {so.probe_epochs} epoch(s) = round(probe_crops {s['probe_crops']} / {rows} training "
              "rows), at least 1: about as many crops as STEGO's probe sees while it trains" if so.probe else ""))
    stages.append(Stage("train + eval per seed", _seeds_command(rec, opts, so), done, None, why))
    return stages


def _shown(path) -> str:
    """A recipe's path as a command line should say it: relative to here when it lies below."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _results_cover(path, so) -> bool:
    try:
        rep = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    config = json.loads(json.dumps(dataclasses.asdict(so.config)))        # as results.json holds it
    return [r["seed"] for r in rep.get("runs", [])] == list(so.seeds) and rep.get("config") == config


def format_plan(stages) -> str:
    """The dry run: per stage a comment saying what it does with which settings, then its command
    (marked when it is done already)."""
    return "\n".join(f"# {st.why}\n" * bool(st.why) + ("# done: " if st.done else "") + shlex.join(st.command)
                     for st in stages)


def run(opts: RecipeOptions, say=print) -> dict:
    """Every stage not yet done, in order, under ``opts.out`` (held locked). -> the seeds report
    (``results.json``'s content)."""
    plan(opts, say)                              # every input checked before the first write
    with FolderLock(opts.out, "recipe", say=say):
        return _run(opts, say)


def _run(opts, say):
    t0 = time.perf_counter()
    out = Path(opts.out)
    rec = load(opts.name, opts.overrides)
    write_json(out / "recipe.json", {"recipe": rec.name, "file": rec.path, "model": rec.model, "train": rec.train,
                                     "settings": rec.settings,
                                     "options": {k: (list(v) if isinstance(v, tuple) else v)
                                                 for k, v in dataclasses.asdict(opts).items()}})
    said = set()
    while True:       # planned again after every stage: each one's state follows what ran before it
        stages = plan(opts, say)[:-1]
        for stage in stages:
            if stage.done and stage.name not in said:
                say(f"[{stage.name}] done already")
                said.add(stage.name)
        todo = [st for st in stages if not st.done]
        if not todo:
            break
        if todo[0].name in said:      # it ran and is still not complete: say so rather than loop
            raise InputError(f"{out}: the {todo[0].name} stage ran but its output is not complete; run the "
                             "recipe again, or the stage's command above alone to see why")
        say(f"[{todo[0].name}] {shlex.join(todo[0].command)}")
        todo[0].run()
        said.add(todo[0].name)
    rows = FeatureStore(out / "feats" / "train" / "feats.npy").N
    so = _seeds_options(rec, opts, out, rows)
    say(f"[train + eval per seed] {shlex.join(_seeds_command(rec, opts, so))}")
    rep = seeds_job.run(so, say=say)
    say(f"recipe {rec.name}: {time.perf_counter() - t0:.0f} s")
    return rep
