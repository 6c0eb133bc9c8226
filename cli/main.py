"""``omh-ref``: the click command line. Each command is a thin edge over the library.

Bad input (an :class:`omh_ref.errors.InputError` or a config ValueError) is printed as one line
``error: ...`` and exits with status 2, never a traceback.
"""
import functools
import json
import sys
import time
from pathlib import Path

import click
import numpy as np

from omh_ref import __version__
from omh_ref.errors import InputError


def friendly_errors(fn):
    """Turn bad-input errors into one line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (InputError, OSError) as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="omh-ref")
def main():
    """omh-ref: the reference implementation of OMH for unsupervised semantic segmentation."""


@main.command()
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the random shapes and values.")
@click.option("--only", default=None, help="Run only the checks whose name contains this text.")
def gradcheck(seed, only):
    """Check every hand-written backward pass against finite differences (float64).

    Prints one row per check (name, shapes, max relative error, tolerance, pass) and exits 1 if
    any check fails.
    """
    from omh_ref.checks import cases

    t0 = time.perf_counter()
    click.echo(f"{'check':<40} {'shapes':<34} {'max rel err':>10} {'tol':>8}  pass")
    failed = 0
    n = 0
    for name, check in cases(seed):
        if only is not None and only not in name:
            continue
        rep = check()
        n += 1
        failed += not rep.passed
        click.echo(rep.row())
    if n == 0:
        raise click.UsageError(f"--only {only!r} matches no check")
    click.echo(f"{n - failed} passed, {failed} failed in {time.perf_counter() - t0:.1f} s (seed {seed})")
    sys.exit(1 if failed else 0)


@main.command()
@click.option("--features", required=True, type=click.Path(), help="feats.npy (N, h, w, C).")
@click.option("--out", default=None, type=click.Path(), help="Output table [default: knn.npy beside the features].")
@click.option("--k", "k", default=7, show_default=True, help="Neighbours per image (besides itself).")
@click.option("--batch-size", default=256, show_default=True, help="Images pooled per read.")
@click.option("--scheduler", default=None, help="Run on Dask: local:N (N worker processes) or a scheduler address.")
@click.option("--rows-per-task", default=8192, show_default=True, help="Images per Dask task (whole 1024-row blocks).")
@friendly_errors
def knn(features, out, k, batch_size, scheduler, rows_per_task):
    """Build the KNN table of images (cosine of mean-pooled features; column 0 = self)."""
    from tqdm import tqdm

    from omh_ref.data.knn import build_knn
    from omh_ref.data.store import FeatureStore

    store = FeatureStore(features)
    out = Path(out) if out else store.path.with_name("knn.npy")
    if k < 1:
        raise InputError(f"--k: expected a positive integer, got {k}")
    with tqdm(total=store.N, unit="img", desc="knn") as bar:
        table = build_knn(store, out, k=k, batch_size=batch_size, progress=bar.update, scheduler=scheduler,
                          rows_per_task=rows_per_task)
    click.echo(f"wrote {out} {table.shape}")


# Model flags: (option, config field, type). Only flags the user gives override the config.
MODEL_FLAGS = [
    ("--levels", "levels", str), ("--dim", "dim", int), ("--tau", "tau", float),
    ("--eps", "eps", float), ("--sinkhorn-iters", "sinkhorn_iters", int),
    ("--sinkhorn-backward", "sinkhorn_backward", click.Choice(["unrolled", "implicit"])),
    ("--marginals", "marginals", click.Choice(["uniform", "usage"])),
    ("--cluster-target", "cluster_target", click.Choice(["balanced", "soft", "hard"])),
    ("--eps-q", "eps_q", float), ("--sinkhorn-iters-q", "sinkhorn_iters_q", int),
    ("--lam-clu", "lam_clu", float), ("--lam-hier", "lam_hier", float), ("--lam-w", "lam_w", float),
    ("--weight-neg", "weight_neg", float), ("--weight-inter", "weight_inter", float),
    ("--weight-intra", "weight_intra", float), ("--dropout", "dropout", float),
    ("--feature-samples", "feature_samples", int), ("--neg-samples", "neg_samples", int),
    ("--baseline", "baseline", click.Choice(["omh", "stego"])), ("--eval-level", "eval_level", int),
]


def model_options(fn):
    for flag, field, typ in reversed(MODEL_FLAGS):
        fn = click.option(flag, field, type=typ, default=None, help=f"Config field {field}.")(fn)
    return click.option("--shifts", default=None,
                        help="'auto' or three numbers neg,inter,intra (STEGO shifts).")(fn)


def parse_levels(text):
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise InputError(f"--levels: expected comma-separated integers like 108,54,27, got {text!r}") from None


def read_config_file(path):
    """A TOML or JSON file: model fields (flat, or under a [model] table) and optionally a
    [train] table of loop options (steps, batch_size, lr, lr_clusters, seed, ckpt_every,
    log_every). -> (model fields, train fields)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file (expected a TOML or JSON config)")
    try:
        if p.suffix == ".toml":
            import tomllib

            data = tomllib.loads(p.read_text())
        else:
            data = json.loads(p.read_text())
    except ImportError:
        raise InputError(f"{p}: TOML configs need Python >= 3.11; use JSON") from None
    except Exception as e:
        raise InputError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'} ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: expected a table of config fields at the top level, got {type(data).__name__}")
    if "model" in data or "train" in data:
        extra = sorted(set(data) - {"model", "train"})
        if extra:
            raise InputError(f"{p}: with [model]/[train] tables, top-level keys are not read; move "
                             f"{', '.join(map(repr, extra))} into one of them")
        tables = data.get("model", {}), data.get("train", {})
        for name, table in zip(("model", "train"), tables):
            if not isinstance(table, dict):
                raise InputError(f"{p}: [{name}] must be a table of fields, got {type(table).__name__}")
        return tables
    return data, {}


def resolve_config(base, overrides, shifts):
    """base Config + explicitly given flags -> (Config, shifts_auto)."""
    import dataclasses

    from omh_ref.model import Config

    fields = dataclasses.asdict(base)
    for field, value in overrides.items():
        if value is not None:
            fields[field] = parse_levels(value) if field == "levels" else value
    auto = False
    if shifts is not None:
        if shifts == "auto":
            auto = True
        else:
            try:
                neg, inter, intra = (float(x) for x in shifts.split(","))
            except ValueError:
                raise InputError(f"--shifts: expected 'auto' or three numbers neg,inter,intra, got {shifts!r}") from None
            fields.update(shift_neg=neg, shift_inter=inter, shift_intra=intra)
    try:
        return Config.from_dict(fields), auto
    except ValueError as e:
        raise InputError(str(e)) from None


TRAIN_FILE_KEYS = ("steps", "batch_size", "lr", "lr_clusters", "seed", "ckpt_every", "log_every")


@main.command()
@click.option("--model", required=True, type=click.Path(), help="ONNX backbone (weights/export_dino.py).")
@click.option("--images", default=None, type=click.Path(), help="A folder of images (searched recursively).")
@click.option("--labels", default=None, type=click.Path(),
              help="With --images: a folder of label PNGs at the images' relative paths (255 = ignore).")
@click.option("--dataset", default=None, type=click.Choice(["cocostuff27", "cityscapes27", "potsdam3"]),
              help="A STEGO-layout data set under --root.")
@click.option("--root", default=None, type=click.Path(), help="The data set's folder (or STEGO's data dir).")
@click.option("--split", default="val", type=click.Choice(["train", "val"]), show_default=True)
@click.option("--resolution", default=None, type=int, help="Crop size in px [default: the model's input size].")
@click.option("--crop", default="center", type=click.Choice(["center", "five"]), show_default=True,
              help="center: one crop per image; five: STEGO's five half-size crops (training sets).")
@click.option("--flip", is_flag=True, help="Also write features of the flipped crops (feats_flip.npy).")
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--batch-size", default=16, show_default=True, help="Crops per forward pass.")
@click.option("--chunk-size", default=64, show_default=True, help="Images per recorded unit of progress / Dask task.")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), show_default=True)
@click.option("--on-error", default="skip", type=click.Choice(["skip", "fail"]), show_default=True,
              help="An unreadable image: leave it out (named in the log and feats.json) or stop.")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "gpu"]), show_default=True)
@click.option("--threads", default=None, type=int, help="onnxruntime threads per process [default: all cores; 1 with local:N].")
@click.option("--scheduler", default=None, help="Run on Dask: local:N (N worker processes) or a scheduler address.")
@click.option("--overwrite", is_flag=True, help="Replace finished features or an unfinished run with other settings.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@friendly_errors
def extract(model, images, labels, dataset, root, split, resolution, crop, flip, out, batch_size, chunk_size,
            dtype, on_error, device, threads, scheduler, overwrite, quiet):
    """Images -> DINO patch features (feats.npy, labels.npy, feats.json) with onnxruntime.

    Interrupted runs continue where they stopped when started again with the same arguments.
    """
    from omh_ref.data import datasets
    from omh_ref.extract import ExtractOptions, extract as run_extract

    if (images is None) == (dataset is None):
        raise InputError("give either --images DIR or --dataset NAME --root DIR")
    if dataset is not None:
        if root is None:
            raise InputError(f"--dataset {dataset}: needs --root, the data set's folder")
        if labels is not None:
            raise InputError("--labels goes with --images; a --dataset brings its own labels")
        ds = datasets.open_dataset(dataset, root, split)
    else:
        ds = datasets.folder(images, labels)
    opts = ExtractOptions(model=model, out=out, resolution=resolution, crop=crop, flip=flip,
                          batch_size=batch_size, chunk_size=chunk_size, dtype=dtype, on_error=on_error,
                          device=device, threads=threads, overwrite=overwrite, progress=not quiet,
                          scheduler=scheduler)
    click.echo(f"{ds.name}{'' if ds.split is None else ' ' + ds.split}: {len(ds)} images from {ds.root}"
               + (" with labels" if ds.has_labels else ""))
    meta = run_extract(ds, opts, log=click.echo)
    click.echo(f"done: {meta['shape'][0]} rows, grid {meta['grid'][0]}x{meta['grid'][1]}, dim {meta['dim']}, "
               f"{len(meta['skipped'])} skipped -> {Path(out) / 'feats.json'}")


@main.command()
@click.option("--features", default=None, type=click.Path(), help="feats.npy [default: the embedded demo data].")
@click.option("--knn", default=None, type=click.Path(), help="KNN table [default: knn.npy beside the features, built if missing].")
@click.option("--out", default="runs/train", show_default=True, type=click.Path(), help="Output folder.")
@click.option("--steps", default=300, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", default=5e-4, show_default=True, help="Learning rate of the projection head.")
@click.option("--lr-clusters", default=5e-3, show_default=True, help="Learning rate of the centroids.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--device", default="cpu", type=click.Choice(["cpu", "gpu"]), show_default=True)
@click.option("--resume", default=None, type=click.Path(), help="Checkpoint to continue from (bit-exact).")
@click.option("--ckpt-every", default=100, show_default=True)
@click.option("--log-every", default=10, show_default=True)
@click.option("--config", "config_file", default=None, type=click.Path(), help="TOML/JSON config; flags override it.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out folder that already holds a checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@model_options
@friendly_errors
def train(features, knn, out, steps, batch_size, lr, lr_clusters, seed, device, resume, ckpt_every,
          log_every, config_file, overwrite, quiet, shifts, **model_flags):
    """Train OMH (or --baseline stego) on memory-mapped features."""
    import dataclasses

    from omh_ref import checkpoint
    from omh_ref.data.store import FeatureStore
    from omh_ref.model import Config
    from omh_ref.train import TrainOptions, train as run_train

    if features is None:
        from omh_ref.demo import prepare_data

        features = str(prepare_data(Path(out) / "data", say=click.echo)["train"] / "feats.npy")
        click.echo(f"no --features: training on the embedded demo data ({features})")
    store = FeatureStore(features)
    fields, train_fields = read_config_file(config_file) if config_file else ({}, {})
    # The file's [train] table sets loop options; flags given on the command line win.
    given = dict(steps=steps, batch_size=batch_size, lr=lr, lr_clusters=lr_clusters, seed=seed,
                 ckpt_every=ckpt_every, log_every=log_every)
    ctx = click.get_current_context()
    for key, value in train_fields.items():
        if key not in TRAIN_FILE_KEYS:
            raise InputError(f"{config_file}: unknown [train] field {key!r} (known: {', '.join(TRAIN_FILE_KEYS)})")
        if ctx.get_parameter_source(key) == click.core.ParameterSource.DEFAULT:
            given[key] = value
    steps, batch_size, lr, lr_clusters, seed, ckpt_every, log_every = (given[k] for k in TRAIN_FILE_KEYS)
    if "in_dim" in fields and fields["in_dim"] != store.C:
        raise InputError(f"{config_file}: in_dim {fields['in_dim']!r} but {store.path} has C={store.C} channels "
                         "(in_dim comes from the features; leave it out)")
    if resume:
        # the checkpoint's config, with the file's fields as overrides: train() then refuses any
        # that differ from the checkpoint (as it does for flags)
        base = checkpoint.load(resume)["config"]
        if fields:
            try:
                base = Config.from_dict({**dataclasses.asdict(base), **fields, "in_dim": base.in_dim})
            except ValueError as e:
                raise InputError(f"{config_file}: {e}") from None
    else:
        try:
            base = Config.from_dict({**fields, "in_dim": store.C})
        except ValueError as e:
            raise InputError(f"{config_file or 'config'}: {e}") from None
    cfg, auto = resolve_config(base, model_flags, shifts)
    opts = TrainOptions(features=features, out=out, knn=knn, steps=steps, batch_size=batch_size, lr=lr,
                        lr_clusters=lr_clusters, seed=seed, device=device, resume=resume,
                        ckpt_every=ckpt_every, log_every=log_every, shifts_auto=auto and not resume,
                        progress=not quiet, overwrite=overwrite)
    res = run_train(cfg, opts, say=click.echo)
    click.echo(f"step {res['step']}: checkpoint {res['checkpoint']}, log {res['log']}")
    sys.exit(130 if res["interrupted"] else 0)


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(), help="Report folder.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated training seeds.")
@click.option("--steps", default=300, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--n-train", default=600, show_default=True, type=click.IntRange(min=1), help="Synthetic training images.")
@click.option("--n-val", default=200, show_default=True, type=click.IntRange(min=1), help="Synthetic validation images.")
@click.option("--probe-epochs", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", type=click.Choice(["cpu", "gpu"]), show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def demo(out, seeds, steps, batch_size, n_train, n_val, probe_epochs, device, quiet):
    """Synthetic data -> OMH, OMH without hierarchy, STEGO baseline -> side-by-side table + report."""
    from omh_ref import demo as demo_mod

    try:
        parsed = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        parsed = ()
    if not parsed or min(parsed) < 0:
        raise InputError(f"--seeds: expected comma-separated integers >= 0, got {seeds!r}")
    seeds = parsed
    opts = demo_mod.DemoOptions(out=out, seeds=seeds, steps=steps, batch_size=batch_size, n_train=n_train,
                                n_val=n_val, probe_epochs=probe_epochs, device=device, progress=not quiet)
    rep = demo_mod.run(opts, say=click.echo)
    click.echo(demo_mod.table(rep))
    click.echo(f"report: {Path(out) / 'report.json'} and PNGs in {out}")


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Output folder (feats.npy, labels.npy, feats.json).")
@click.option("--split", default="train", type=click.Choice(["train", "val"]), show_default=True)
@click.option("--n-images", default=600, show_default=True)
@click.option("--grid", default=16, show_default=True, help="Feature grid side (h = w).")
@click.option("--dim", default=384, show_default=True, help="Feature channels C.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), show_default=True)
@friendly_errors
def synth(out, split, n_images, grid, dim, seed, dtype):
    """Write the synthetic DINO-like demo data (a superclass -> class -> part hierarchy)."""
    from omh_ref.data import synthetic

    try:
        spec = synthetic.SynthSpec(n_images=n_images, grid=grid, dim=dim, seed=seed)
    except ValueError as e:
        raise InputError(str(e)) from None
    paths = synthetic.write(spec, out, dtype=dtype, split=split)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="ckpt.npz from omh-ref train.")
@click.option("--features", required=True, type=click.Path(), help="Evaluation feats.npy.")
@click.option("--labels", default=None, type=click.Path(),
              help="Evaluation labels.npy (N, H, W). [default: the one feats.json names]")
@click.option("--flipped-features", default=None, type=click.Path(), help="Horizontally flipped features (averaged).")
@click.option("--train-features", default=None, type=click.Path(), help="Features for the linear probe.")
@click.option("--train-labels", default=None, type=click.Path(),
              help="Labels for the linear probe. [default: the one the train feats.json names]")
@click.option("--n-classes", default=None, type=click.IntRange(min=1), help="[default: feats.json's n_classes, else the eval level's K].")
@click.option("--class-names", default=None, help="cocostuff27, cityscapes27, potsdam3, or a text file (one per line).")
@click.option("--probe-epochs", default=10, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the linear probe.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Write the scores as JSON.")
@click.option("--out", default=None, type=click.Path(), help="Folder for PNGs (confusion, predictions, hierarchy).")
@click.option("--crf", is_flag=True, help="Refine cluster predictions with a dense CRF (needs the images, omh-ref[crf]).")
@click.option("--crf-workers", default=1, show_default=True, type=click.IntRange(min=1), help="Processes for the CRF (1 = serial).")
@click.option("--crf-timeout", default=600.0, show_default=True, help="Seconds a CRF batch may take before it is stopped.")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "gpu"]), show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def eval_cmd(checkpoint, features, labels, flipped_features, train_features, train_labels, n_classes, class_names,
             probe_epochs, batch_size, seed, json_out, out, crf, crf_workers, crf_timeout, device, quiet):
    """Score a checkpoint: cluster (Hungarian) and linear-probe mIoU / accuracy, per-class IoU,
    the cluster->class matching and the learned hierarchy."""
    from omh_ref import evaluate, report
    from omh_ref.backend import resolve_device
    from omh_ref.data.images import image_paths
    from omh_ref.data.store import FeatureStore, listed_labels
    from omh_ref.train import load_params

    try:
        resolve_device(device)
    except ValueError as e:
        raise InputError(str(e)) from None
    # output paths are checked before minutes of evaluation, not after
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"{out}: is a file (expected --out to be a folder for the pictures)")
    if json_out is not None and (Path(json_out).is_dir() or Path(json_out).parent.is_file()):
        raise InputError(f"{json_out}: cannot write the --json file there (expected a file path)")
    params, cfg = load_params(checkpoint, device)
    labels = labels or listed_labels(features)
    if labels is None:
        raise InputError(f"--labels: not given, and {Path(features).with_suffix('.json')} names no labels file "
                         "(expected --labels labels.npy)")
    store = FeatureStore(features, labels=labels)
    flipped = FeatureStore(flipped_features) if flipped_features else None
    if flipped is not None and (flipped.N, flipped.h, flipped.w, flipped.C) != (store.N, store.h, store.w, store.C):
        raise InputError(f"{flipped_features}: shape {flipped.feats.shape} differs from {features} {store.feats.shape}")
    K = cfg.effective().levels[cfg.effective().eval_level]
    n_classes = n_classes or int(store.meta.get("n_classes") or K)
    names = resolve_class_names(class_names, store, n_classes)
    if K < n_classes:
        raise InputError(f"{checkpoint}: the eval level has {K} clusters, fewer than the {n_classes} classes")
    clu, preds = evaluate.cluster_eval(params, cfg, store, n_classes, batch_size, flipped, device, keep=4,
                                       crf_workers=max(crf_workers, 1) if crf else None, crf_timeout=crf_timeout)
    result = {"cluster": evaluate.scores_json(clu), "crf": bool(crf)}
    if train_features or train_labels:
        train_labels = train_labels or (listed_labels(train_features) if train_features else None)
        if not (train_features and train_labels):
            raise InputError("--train-features and --train-labels: give both for the linear probe")
        tr = FeatureStore(train_features, labels=train_labels)
        probe = evaluate.linear_probe(params, tr, n_classes, probe_epochs, batch_size, seed=seed, device=device,
                                      progress=not quiet)
        lin = evaluate.linear_eval(params, probe, store, n_classes, batch_size, flipped, device)
        result["linear"] = evaluate.scores_json(lin)
    plans = evaluate.hierarchy_plans(params, cfg)
    tree = evaluate.hierarchy_text(plans, clu["match"].cluster_to_class, names,
                                   named_level=cfg.effective().eval_level)
    result["hierarchy"] = {"plans": [p.round(4).tolist() for p in plans], "text": tree}
    click.echo(format_eval(result, names))
    if tree:
        click.echo("hierarchy (child clusters absorbed by each parent, share of the child's mass):")
        click.echo("\n".join("  " + t for t in tree))
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(result, indent=1))
        click.echo(f"wrote {json_out}")
    if out:
        o = Path(out)
        o.mkdir(parents=True, exist_ok=True)
        report.confusion_png(o / "confusion_cluster.png", clu["confusion"][clu["match"].class_to_cluster],
                             row_names=[f"c{c}" for c in clu["match"].class_to_cluster], col_names=names)
        lab = store.read_labels(np.arange(len(preds)))
        rows = [[report.colorize(lab[i], n_classes), report.colorize(clu["match"].cluster_to_class[preds[i]], n_classes)]
                for i in range(len(preds))]
        titles = ["labels", "clusters (matched)"]
        paths = image_paths(store.meta, store.path)
        if paths is not None:   # overlays where the listed images can be read
            from omh_ref.data.images import load_rgb

            for i, row in enumerate(rows):
                img = load_rgb(paths[i], lab.shape[1])
                if img is not None and img.shape[:2] == lab.shape[1:]:
                    row.insert(0, img)
                    row.append(report.overlay(img, row[-1]))
            titles = ["image", *titles, "overlay"] if all(len(r) == 4 for r in rows) else titles
        report.grid_png(o / "predictions.png", rows, titles=titles)
        for lvl, A in enumerate(plans):
            report.confusion_png(o / f"hierarchy_L{lvl}_L{lvl + 1}.png", A.T, cell=10)
        (o / "hierarchy.txt").write_text("\n".join(tree) + "\n")
        click.echo(f"pictures in {o}")


def resolve_class_names(spec, store, n_classes):
    from omh_ref.data.classes import CLASS_NAMES

    if spec is None:
        names = store.meta.get("class_names")
    elif spec in CLASS_NAMES:
        names = CLASS_NAMES[spec]
    else:
        p = Path(spec)
        if not p.is_file():
            raise InputError(f"--class-names {spec!r}: not a built-in ({', '.join(CLASS_NAMES)}) nor a file")
        names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if names is not None and len(names) != n_classes:
        source = "--class-names" if spec is not None else f"{store.path.with_suffix('.json')} class_names"
        raise InputError(f"{source}: {len(names)} names for {n_classes} classes (--n-classes or the data's "
                         "n_classes); pass --class-names to name them")
    return names or [str(i) for i in range(n_classes)]


def format_eval(result, names):
    lines = [f"{'probe':<10} {'mIoU':>7} {'acc':>7}"]
    for probe in ("cluster", "linear"):
        if probe in result:
            lines.append(f"{probe:<10} {result[probe]['miou']:7.2f} {result[probe]['acc']:7.2f}")
    lines.append("")
    head = f"{'class':<24} {'cluster IoU':>11}" + (f" {'linear IoU':>11}" if "linear" in result else "")
    lines.append(head + f" {'cluster':>8}")
    c2k = result["cluster"]["match"]["class_to_cluster"]
    for c, name in enumerate(names):
        row = f"{name:<24} {_fmt(result['cluster']['iou'][c]):>11}"
        if "linear" in result:
            row += f" {_fmt(result['linear']['iou'][c]):>11}"
        lines.append(row + f" {c2k[c]:>8}")
    unmatched = result["cluster"]["match"]["unmatched"]
    if unmatched:
        lines.append(f"unmatched clusters: {unmatched}")
    return "\n".join(lines)


def _fmt(v):
    return "n/a" if v is None else f"{v:.2f}"


@main.command()
@click.option("--json", "json_out", default=None, type=click.Path(), help="Write every number as JSON.")
@click.option("--quick", is_flag=True, help="Fewer repeats: a few minutes on 2 cores.")
@click.option("--tiny", is_flag=True, hidden=True, help="Tiny shapes, one repeat (for tests).")
def bench(json_out, quick, tiny):
    """Speed against peers measured in the same run: the training step vs torch autograd, Sinkhorn
    vs POT, confusion accumulation vs bincount, scaling, GPU. Each ratio is printed beside its goal."""
    from omh_ref import bench as bench_mod
    from omh_ref.model import small_config

    settings = None
    if tiny:
        settings = {"cfg": small_config(), "batch_size": 3, "grid": (5, 4), "threads": (1,), "repeats": 1,
                    "warmup": 0, "sinkhorn_repeats": 1, "hier": ((7, 5),), "targets": (60, 7),
                    "eval_pixels": 1e5, "eval_repeats": 1, "scaling_repeats": 1, "batch_sizes": (2, 3),
                    "levels": ((6,), (6, 4))}
    res = bench_mod.run_all(quick=quick or tiny, settings=settings, say=lambda m: click.echo(m, err=True))
    click.echo(bench_mod.format_report(res))
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=1))
        click.echo(f"wrote {json_out}")


if __name__ == "__main__":
    main()
