"""``omh-ref``: the click command line. Each command is a thin edge: parse the flags, call the
library, print.

Bad input (an :class:`omh_ref.core.errors.InputError`) is printed as one line ``error: ...`` and
exits with status 2, never a traceback.
"""
import functools
import sys
import time
from pathlib import Path

import click

from omh_ref import __version__
from omh_ref.core.errors import InputError
from omh_ref.extract.datasets import READERS


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
    from omh_ref.core.checks import cases

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
@click.option("--out", default=None, type=click.Path(), help="Output table [default: <features stem>.knn.npy beside them].")
@click.option("--k", "k", default=7, show_default=True, help="Neighbours per image (besides itself).")
@click.option("--batch-size", default=256, show_default=True, help="Images pooled per read.")
@click.option("--scheduler", default=None, help="Run on Dask: local:N (N worker processes) or a scheduler address.")
@click.option("--rows-per-task", default=8192, show_default=True, help="Images per Dask task (whole 1024-row blocks).")
@friendly_errors
def knn(features, out, k, batch_size, scheduler, rows_per_task):
    """Build the KNN table of images (cosine of mean-pooled features; column 0 = self)."""
    from tqdm import tqdm

    from omh_ref.core.lock import FolderLock
    from omh_ref.features.knn import build_knn, default_path
    from omh_ref.features.store import FeatureStore

    store = FeatureStore(features)
    out = Path(out) if out else default_path(store)
    if k < 1:
        raise InputError(f"--k: expected a positive integer, got {k}")
    with FolderLock(out.parent, "knn", say=click.echo), tqdm(total=store.N, unit="img", desc="knn") as bar:
        try:
            table = build_knn(store, out, k=k, batch_size=batch_size, progress=bar.update, scheduler=scheduler,
                              rows_per_task=rows_per_task)
        except OSError as e:
            raise InputError(f"{e.filename or out}: cannot write the KNN table ({e.strerror}); the features "
                             "are untouched; run the command again once the folder takes it") from None
    click.echo(f"wrote {out} {table.shape}")


def model_options(fn):
    """One flag per config field (omh_ref.core.config), help and choices from its declaration;
    only flags the user gives override the config."""
    from omh_ref.core.config import flag_specs

    for spec in reversed(flag_specs()):
        if spec.kind is bool:
            opt = click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.name, default=None, help=spec.help)
        else:
            typ = click.Choice(spec.choices) if spec.choices else {tuple: str}.get(spec.kind, spec.kind)
            opt = click.option(spec.flag, spec.name, type=typ, default=None, help=spec.help)
        fn = opt(fn)
    return click.option("--shifts", default=None,
                        help="'auto' or three numbers neg,inter,intra (STEGO shifts).")(fn)


@main.command()
@click.option("--model", required=True, type=click.Path(), help="ONNX backbone (weights/export_dino.py).")
@click.option("--images", default=None, type=click.Path(), help="A folder of images (searched recursively).")
@click.option("--labels", default=None, type=click.Path(),
              help="With --images: a folder of label PNGs at the images' relative paths (255 = ignore).")
@click.option("--dataset", default=None, type=click.Choice(sorted(READERS)),
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
    from omh_ref.extract import datasets
    from omh_ref.extract.job import ExtractOptions, extract as run_extract

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
@click.option("--knn", default=None, type=click.Path(), help="KNN table [default: <features stem>.knn.npy beside them, built if missing].")
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
    from omh_ref.core.config import read_file
    from omh_ref.features.store import FeatureStore
    from omh_ref.train.loop import FILE_KEYS, TrainOptions, loop_settings, model_config, train as run_train

    if features is None:
        from omh_ref.demo import prepare_data

        features = str(prepare_data(Path(out) / "data", say=click.echo)["train"] / "feats.npy")
        click.echo(f"no --features: training on the embedded demo data ({features})")
    store = FeatureStore(features)
    tables = read_file(config_file) if config_file else {"model": {}, "train": {}}
    ctx = click.get_current_context()
    given = dict(steps=steps, batch_size=batch_size, lr=lr, lr_clusters=lr_clusters, seed=seed,
                 ckpt_every=ckpt_every, log_every=log_every)
    explicit = {k for k in FILE_KEYS if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    loop = loop_settings(given, tables["train"], explicit, config_file)
    cfg, auto = model_config(store, tables["model"], model_flags, shifts, resume, source=config_file or "config")
    opts = TrainOptions(features=features, out=out, knn=knn, device=device, resume=resume,
                        shifts_auto=auto and not resume, progress=not quiet, overwrite=overwrite, **loop)
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
    from omh_ref.features import synthetic

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
@click.option("--probe-cache", default="auto", show_default=True, type=click.Choice(["auto", "memmap", "none"]),
              help="Linear probe: cache the training codes in a temporary file (memmap) or recompute them every "
                   "epoch (none); auto caches when the file fits in half the free temporary space.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the linear probe.")
@click.option("--json", "json_out", default=None, type=click.Path(), help="Write the scores as JSON.")
@click.option("--out", default=None, type=click.Path(), help="Folder for PNGs (confusion, predictions, hierarchy).")
@click.option("--crf", is_flag=True, help="Refine cluster predictions with a dense CRF (needs the images, omh-ref[crf]).")
@click.option("--crf-workers", default=1, show_default=True, type=click.IntRange(min=1), help="Processes for the CRF (1 = serial).")
@click.option("--crf-timeout", default=600.0, show_default=True, help="Seconds a CRF batch may take before it is stopped.")
@click.option("--level-labels", default=None,
              help="Label granularity of each level, finest first, '-' to skip one (e.g. parts,classes,superclasses) "
                   "[default: the granularity with the closest number of classes <= the level's clusters].")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "gpu"]), show_default=True)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@friendly_errors
def eval_cmd(checkpoint, features, labels, flipped_features, train_features, train_labels, n_classes, class_names,
             probe_epochs, probe_cache, batch_size, seed, json_out, out, crf, crf_workers, crf_timeout, level_labels,
             device, quiet):
    """Score a checkpoint: cluster (Hungarian) and linear-probe mIoU / accuracy, per-class IoU,
    the cluster->class matching, every level against its label granularity, and the learned
    hierarchy with its consistency."""
    from omh_ref.evaluate.job import EvalOptions, format_table, run

    opts = EvalOptions(checkpoint=checkpoint, features=features, labels=labels, flipped_features=flipped_features,
                       train_features=train_features, train_labels=train_labels, n_classes=n_classes,
                       class_names=class_names, probe_epochs=probe_epochs, probe_cache=probe_cache,
                       batch_size=batch_size, seed=seed,
                       json=json_out, out=out, crf=crf, crf_workers=crf_workers, crf_timeout=crf_timeout,
                       level_labels=level_labels, device=device, progress=not quiet)
    result = run(opts, say=click.echo)
    click.echo(format_table(result))
    if json_out:
        click.echo(f"wrote {json_out}")
    if out:
        click.echo(f"pictures in {out}")


if __name__ == "__main__":
    main()
