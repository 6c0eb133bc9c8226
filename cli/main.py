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
        except KeyboardInterrupt as e:
            click.echo(f"interrupted: {e}" if str(e) else "interrupted", err=True)
            sys.exit(130)
    return wrapper


def shared_options(*names, **helps):
    """The options ``names`` as declared once in omh_ref.core.options (default, help, choices);
    ``helps`` rewords one for this command."""
    from omh_ref.core import options

    def decorate(fn):
        for name in reversed(names):
            o = options.get(name)
            text = helps.get(name, o.help)
            if o.kind is bool and o.negatable:
                opt = click.option(f"{o.flag}/--no-{o.flag[2:]}", o.name, default=o.default, show_default=True, help=text)
            elif o.kind is bool:
                opt = click.option(o.flag, o.name, is_flag=True, default=o.default, help=text)
            elif o.choices:
                opt = click.option(o.flag, o.name, default=o.default, type=click.Choice(o.choices), show_default=True,
                                   help=text)
            else:
                typ = click.IntRange(min=o.minimum) if o.minimum is not None else o.kind
                text, stego = _stego_spellings(o.name, text)
                opt = click.option(o.flag, o.name, default=o.default, type=typ, show_default=o.default is not None,
                                   help=text, **stego)
            fn = opt(fn)
            fn.__click_params__[-1].declared = o      # what the option was made from (tests/core/test_options.py)
        return fn
    return decorate


class StegoSpelled(click.Option):
    """An option that also takes STEGO's spelling of its flag (omh_ref.core.stego_names:
    ``--neg-inter-shift`` for ``--shift-neg``): the same parameter, so a config file and the
    defaults rank under it as under the flag; its help names it, and using it prints a note."""

    def __init__(self, *decls, aliases=(), **kw):
        super().__init__(*decls, **kw)
        self.aliases = tuple(aliases)

    def add_to_parser(self, parser, ctx):
        super().add_to_parser(parser, ctx)
        for alias in self.aliases:
            parser.add_option(obj=self, opts=[alias], dest=f"{self.name}:{alias}", action="store", nargs=self.nargs)

    def consume_value(self, ctx, opts):
        for alias in self.aliases:
            if f"{self.name}:{alias}" not in opts:
                continue
            if self.name in opts:
                raise click.UsageError(f"{alias} is STEGO's name for {self.opts[0]}: give one of them", ctx)
            if not ctx.resilient_parsing:
                click.echo(f"note: {alias} is STEGO's name for omh-ref's {self.opts[0]}", err=True)
            ctx.meta[f"stego:{self.name}"] = alias
            opts = {**opts, self.name: opts[f"{self.name}:{alias}"]}
        return super().consume_value(ctx, opts)

    def get_error_hint(self, ctx):
        alias = ctx.meta.get(f"stego:{self.name}")
        return f"'{alias}' (STEGO's {self.opts[0]})" if alias else super().get_error_hint(ctx)


def _stego_spellings(name, text):
    """(help, click.option keywords) of option ``name`` taking STEGO's spellings of its flag too."""
    from omh_ref.core.stego_names import flag_aliases

    aliases = flag_aliases(name)
    if not aliases:
        return text, {}
    return f"{text} (STEGO: {', '.join(aliases)})", {"cls": StegoSpelled, "aliases": aliases}


def named(name, **kw):
    """A command's own option, spelled as omh_ref.core.options.flag_of says (the spelling jobs print)."""
    from omh_ref.core.options import flag_of

    return click.option(flag_of(name), name, **kw)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="omh-ref")
def main():
    """omh-ref: a reference implementation of OMH for unsupervised semantic segmentation, as
    reconstructed from the paper's abstract."""


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@friendly_errors
def export(args):
    """Export a DINO, DINOv2 or DINOv3 ViT backbone (a local Meta .pth or Hugging Face .safetensors /
    model folder, --random-init, or --download for DINO) to ONNX, checked against torch with
    onnxruntime and recorded in a manifest; needs torch (omh-ref[torch]).
    ``omh-ref export --help`` lists its flags."""
    try:
        from omh_ref.extract import export_dino
    except ImportError as e:
        raise InputError(f"export needs torch ({e}); pip install 'omh-ref[torch]'") from None
    sys.exit(export_dino.main(list(args)))


@main.command()
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0), help="Seed of the random shapes and values.")
@click.option("--only", default=None, help="Run only the checks whose name contains this text.")
@click.option("--device", default="cpu", type=click.Choice(["cpu", "gpu"]), show_default=True,
              help="Run the checks on NumPy or on CuPy arrays.")
@friendly_errors
def gradcheck(seed, only, device):
    """Check every hand-written backward pass against finite differences (float64).

    Prints one row per check (name, shapes, max relative error, tolerance, pass) and exits 1 if
    any check fails.
    """
    from omh_ref.core.backend import resolve_device
    from omh_ref.core.checks import cases

    try:
        resolve_device(device)
    except ValueError as e:
        raise InputError(str(e)) from None

    t0 = time.perf_counter()
    click.echo(f"{'check':<40} {'shapes':<34} {'max rel err':>10} {'tol':>8}  pass")
    failed = 0
    n = 0
    for name, check in cases(seed, device):
        if only is not None and only not in name:
            continue
        rep = check()
        n += 1
        failed += not rep.passed
        click.echo(rep.row())
    if n == 0:
        raise click.UsageError(f"--only {only!r} matches no check")
    click.echo(f"{n - failed} passed, {failed} failed in {time.perf_counter() - t0:.1f} s (seed {seed}, {device})")
    sys.exit(1 if failed else 0)


@main.command()
@named("features", required=True, type=click.Path(), help="feats.npy (N, h, w, C).")
@named("out", default=None, type=click.Path(), help="Output table [default: <features stem>.knn.npy beside them].")
@named("k", default=7, show_default=True, help="Neighbours per image (besides itself).")
@click.option("--batch-size", default=256, show_default=True, help="Images pooled per read.")
@shared_options("scheduler")
@click.option("--rows-per-task", default=8192, show_default=True, help="Images per Dask task (whole 1024-row blocks).")
@friendly_errors
def knn(features, out, k, batch_size, scheduler, rows_per_task):
    """Build the KNN table of images (cosine of mean-pooled features; column 0 = self)."""
    from omh_ref.core.lock import FolderLock
    from omh_ref.core.progress import bar as progress_bar
    from omh_ref.features.knn import build_knn, default_path
    from omh_ref.features.store import FeatureStore

    store = FeatureStore(features)
    out = Path(out) if out else default_path(store)
    if k < 1:
        raise InputError(f"--k: expected a positive integer, got {k}")
    with FolderLock(out.parent, "knn", say=click.echo), progress_bar(store.N, "knn", unit="img") as bar:
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
        text, stego = _stego_spellings(spec.name, spec.help)
        text = f"{text} [default: {spec.shown_default}]"
        if spec.kind is bool:
            opt = click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.name, default=None, help=text)
        else:
            typ = click.Choice(spec.choices) if spec.choices else {tuple: str}.get(spec.kind, spec.kind)
            opt = click.option(spec.flag, spec.name, type=typ, default=None, help=text, **stego)
        fn = opt(fn)
    return click.option("--shifts", default=None,
                        help="'auto' or three numbers neg,inter,intra (STEGO shifts) "
                             "[default: the config's shift_neg, shift_inter, shift_intra].")(fn)


def _run_settings(features, config_file, given, model_flags, shifts, resume=None):
    """(loop settings, Config, shifts auto) of a training run: a config file's [train] table over the
    loop flags' defaults (flags given explicitly win), its [model] table under the model flags;
    a [recipe] table is not read."""
    from omh_ref.core.config import read_file
    from omh_ref.features.store import FeatureStore
    from omh_ref.train.loop import FILE_KEYS, loop_settings, model_config

    store = FeatureStore(features)
    tables = read_file(config_file) if config_file else {"model": {}, "train": {}}
    ctx = click.get_current_context()
    explicit = {k for k in FILE_KEYS if k in given and ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
    cfg, auto = model_config(store, tables["model"], model_flags, shifts, resume, source=config_file or "config")
    loop = loop_settings(given, tables["train"], explicit, config_file, base_name=None if resume else cfg.base)
    return loop, cfg, auto


@main.command()
@named("model", required=True, type=click.Path(), help="ONNX backbone (omh-ref export).")
@click.option("--images", default=None, type=click.Path(), help="A folder of images (searched recursively).")
@click.option("--labels", default=None, type=click.Path(),
              help="With --images: a folder of label PNGs at the images' relative paths (255 = ignore).")
@named("dataset", default=None, type=click.Choice(sorted(READERS)),
              help="A STEGO-layout data set under --root.")
@named("root", default=None, type=click.Path(), help="The data set's folder (or STEGO's data dir).")
@named("split", default="val", type=click.Choice(["train", "val"]), show_default=True)
@click.option("--resolution", default=None, type=int, help="Crop size in px [default: the model's input size].")
@named("crop", default="center", type=click.Choice(["center", "five"]), show_default=True,
              help="center: one crop per image; five: STEGO's five half-size crops (training sets).")
@named("flip", is_flag=True, help="Also write features of the flipped crops (feats_flip.npy).")
@named("attention", is_flag=True,
       help="Also write HP's attention weights, each patch's 3x3 window (attn.npy, float16), from a model exported "
            "with omh-ref export --attention.")
@named("augment", is_flag=True,
       help="Also write the features of one seeded photometric augmentation of each crop (feats_aug.npy): HP's "
            "colour jitter, grayscale and blur, no geometric change.")
@named("augment_space", default="normalised", type=click.Choice(["normalised", "rgb"]), show_default=True,
       help="Where --augment acts: normalised (HP's code: on the ImageNet-normalised image, clamped there) or rgb "
            "(on the [0, 1] image, normalised after).")
@named("seed", default=0, type=click.IntRange(min=0), show_default=True,
       help="Seed of --augment's draws (one per crop, from the seed and the crop's name).")
@named("out", required=True, type=click.Path(), help="Output folder.")
@click.option("--batch-size", default=16, show_default=True, help="Crops per forward pass.")
@click.option("--chunk-size", default=64, show_default=True, help="Images per recorded unit of progress / Dask task.")
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), show_default=True)
@click.option("--on-error", default=None, type=click.Choice(["skip", "fail"]),
              help="An unreadable image or label map: stop, or leave it out (named in the log and feats.json) "
                   "[default: fail with labels, skip for a bare folder of images].")
@shared_options("device")
@click.option("--threads", default=None, type=int, help="onnxruntime threads per process [default: all cores; 1 with local:N].")
@shared_options("scheduler")
@click.option("--overwrite", is_flag=True, help="Replace finished features or an unfinished run with other settings.")
@shared_options("quiet")
@friendly_errors
def extract(model, images, labels, dataset, root, split, resolution, crop, flip, attention, augment, augment_space,
            seed, out, batch_size, chunk_size, dtype, on_error, device, threads, scheduler, overwrite, quiet):
    """Images -> DINO patch features (feats.npy, labels.npy, feats.json) with onnxruntime; for the HP
    base also its attention weights (attn.npy, --attention) and augmented features (feats_aug.npy,
    --augment).

    Interrupted runs continue where they stopped when started again with the same arguments.
    """
    from omh_ref.extract import datasets
    from omh_ref.extract.job import ExtractOptions, extract as run_extract

    if (images is None) == (dataset is None):
        raise InputError("give either --images DIR or --dataset NAME --root DIR")
    given = click.get_current_context().get_parameter_source
    for name in ("augment_space", "seed"):
        if not augment and given(name) != click.core.ParameterSource.DEFAULT:
            raise InputError(f"--{name.replace('_', '-')} goes with --augment (the augmented features' draws)")
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
                          scheduler=scheduler, attention=attention, augment=augment, augment_space=augment_space,
                          seed=seed)
    click.echo(f"{ds.name}{'' if ds.split is None else ' ' + ds.split}: {len(ds)} images from {ds.root}"
               + (" with labels" if ds.has_labels else ""))
    meta = run_extract(ds, opts, log=click.echo)
    click.echo(f"done: {meta['shape'][0]} rows, grid {meta['grid'][0]}x{meta['grid'][1]}, dim {meta['dim']}, "
               f"{len(meta['skipped'])} skipped -> {Path(out) / 'feats.json'}")


@main.command()
@click.option("--features", default=None, type=click.Path(), help="feats.npy [default: the embedded demo data].")
@click.option("--knn", default=None, type=click.Path(), help="KNN table [default: <features stem>.knn.npy beside them, built if missing].")
@click.option("--out", default="runs/train", show_default=True, type=click.Path(), help="Output folder.")
@shared_options("steps", "batch_size", "lr", "lr_clusters", "weight_decay", "grad_clip", "seed", "device")
@click.option("--resume", default=None, type=click.Path(),
              help="Checkpoint to continue from (bit-exact); alone, it brings the run's features, folder and settings.")
@shared_options("ckpt_every", "log_every")
@click.option("--config", "config_file", default=None, type=click.Path(),
              help="TOML/JSON/YAML config ([model], [train]; a recipe's [recipe] table is ignored; STEGO's "
                   "train_config.yml as it is, omh-ref[yaml]); flags override it.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out folder that already holds a checkpoint.")
@click.option("--val-features", default=None, type=click.Path(), help="Validate on these features during training.")
@click.option("--val-labels", default=None, type=click.Path(),
              help="Their labels [default: the labels file their feats.json names].")
@shared_options("val_every")
@click.option("--keep-best", is_flag=True,
              help="Keep best.npz, the checkpoint of the best validation mIoU (selection on labels: supervision).")
@shared_options("allow_backbone_mismatch", allow_backbone_mismatch="Validate on --val-features of another "
                "backbone than --features (with a warning; refused otherwise).")
@shared_options("quiet")
@model_options
@friendly_errors
def train(features, knn, out, steps, batch_size, lr, lr_clusters, weight_decay, grad_clip, seed, device, resume,
          ckpt_every, log_every, config_file, overwrite, val_features, val_labels, val_every, keep_best,
          allow_backbone_mismatch, quiet, shifts, **model_flags):
    """Train OMH on a base (or, with --no-omh, the base alone) on memory-mapped features."""
    from omh_ref.core.lock import FolderLock
    from omh_ref.evaluate.pictures import curves_png
    from omh_ref.evaluate.validation import Validator
    from omh_ref.train.loop import TrainOptions, resumed, train as run_train

    given = dict(steps=steps, batch_size=batch_size, lr=lr, lr_clusters=lr_clusters, weight_decay=weight_decay,
                 grad_clip=grad_clip, seed=seed, ckpt_every=ckpt_every, log_every=log_every, val_every=val_every)
    if resume:   # the checkpoint's features, folder and settings, unless flags say otherwise
        ctx = click.get_current_context()
        explicit = {k for k in given if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
        out_given = ctx.get_parameter_source("out") != click.core.ParameterSource.DEFAULT
        features, out, given = resumed(resume, features, out if out_given else None, given, explicit,
                                       say=click.echo)
    if features is None:
        from omh_ref.jobs.demo import prepare_data

        features = str(prepare_data(Path(out) / "data", say=click.echo)["train"] / "feats.npy")
        click.echo(f"no --features: training on the embedded demo data ({features})")
    loop, cfg, auto = _run_settings(features, config_file, given, model_flags, shifts, resume)
    opts = TrainOptions(features=features, out=out, knn=knn, device=device, resume=resume,
                        shifts_auto=auto and not resume, progress=not quiet, overwrite=overwrite,
                        keep_best=keep_best, allow_backbone_mismatch=allow_backbone_mismatch, **loop)
    validator = None
    if val_features or val_labels:
        if not val_features:
            raise InputError("--val-labels: goes with --val-features")
        validator = Validator(val_features, val_labels, device=device)
        validator.check(cfg)
    res = run_train(cfg, opts, say=click.echo, validate=validator)
    with FolderLock(out, "train", say=click.echo):
        curves_png(Path(out) / "curves.png", res["log"])
    click.echo(f"step {res['step']}: checkpoint {res['checkpoint']}, log {res['log']}, curves {Path(out) / 'curves.png'}"
               + (f"; best validation mIoU {res['best']['val_miou']:.2f} at step {res['best']['step']} in "
                  f"{Path(out) / 'best.npz'}" if keep_best and res["best"]["step"] is not None else ""))
    sys.exit(130 if res["interrupted"] else 0)


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(), help="Report folder.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated training seeds.")
@shared_options("steps", "batch_size")
@click.option("--n-train", default=600, show_default=True, type=click.IntRange(min=1), help="Synthetic training images.")
@click.option("--n-val", default=200, show_default=True, type=click.IntRange(min=1), help="Synthetic validation images.")
@click.option("--probe-epochs", default=5, show_default=True, type=click.IntRange(min=1))
@named("bases", default="stego", show_default=True,
       help="The bases whose rows the table has, each with and without OMH: 'all' or names (stego,smooseg,hp).")
@shared_options("device")
@shared_options("quiet")
@friendly_errors
def demo(out, seeds, steps, batch_size, n_train, n_val, probe_epochs, bases, device, quiet):
    """Synthetic data -> OMH, OMH without hierarchy, STEGO baseline (--bases all: every base with and
    without OMH) -> side-by-side table + report."""
    from omh_ref.jobs import demo as demo_mod
    from omh_ref.jobs.seeds import parse_seeds

    seeds = parse_seeds(seeds)
    opts = demo_mod.DemoOptions(out=out, seeds=seeds, steps=steps, batch_size=batch_size, n_train=n_train,
                                n_val=n_val, probe_epochs=probe_epochs, device=device, progress=not quiet,
                                methods=demo_mod.methods_of(bases))
    rep = demo_mod.run(opts, say=click.echo)
    click.echo(demo_mod.table(rep))
    click.echo(f"report: {Path(out) / 'report.json'} and PNGs in {out}")


@main.command()
@named("features", required=True, type=click.Path(), help="Training feats.npy (its labels feed the linear probe).")
@named("val_features", required=True, type=click.Path(), help="Evaluation feats.npy.")
@click.option("--val-labels", default=None, type=click.Path(), help="[default: the labels file the val feats.json names]")
@named("flipped_features", default=None, type=click.Path(), help="Flipped evaluation features (averaged).")
@named("out", required=True, type=click.Path(), help="Folder: seed<N>/ per run, results.json, results.md.")
@named("seed_list", default="0,1,2", show_default=True, help="Comma-separated training seeds.")
@named("config_file", default=None, type=click.Path(),
       help="TOML/JSON/YAML config (STEGO's train_config.yml too, omh-ref[yaml]); flags override it.")
@shared_options("steps", "batch_size", "lr", "lr_clusters", "weight_decay", "grad_clip", "probe")
@named("probe_epochs", default=10, show_default=True, type=click.IntRange(min=1))
@shared_options("knn_k", "crf", "scheduler",
                crf="Also score the cluster predictions after a dense CRF (omh-ref[crf]).",
                scheduler="Run the seeds on Dask: local:N or a scheduler address (one run per worker).")
@shared_options("device", "allow_backbone_mismatch")
@shared_options("quiet")
@model_options
@friendly_errors
def seeds(features, val_features, val_labels, flipped_features, out, seed_list, config_file, steps, batch_size, lr,
          lr_clusters, weight_decay, grad_clip, probe, probe_epochs, knn_k, crf, scheduler, device,
          allow_backbone_mismatch, quiet, shifts, **model_flags):
    """Train and evaluate one config under several seeds: mean ± std per metric and per seed
    (OUT/results.json, OUT/results.md). A rerun continues: finished runs are not redone."""
    from omh_ref.jobs.seeds import SeedsOptions, parse_seeds, run as run_seeds, table

    parsed = parse_seeds(seed_list)
    given = dict(steps=steps, batch_size=batch_size, lr=lr, lr_clusters=lr_clusters, weight_decay=weight_decay,
                 grad_clip=grad_clip)
    loop, cfg, auto = _run_settings(features, config_file, given, model_flags, shifts)
    loop.pop("seed", None)     # --seeds names the seeds
    opts = SeedsOptions(features=features, val_features=val_features, out=out, config=cfg, seeds=parsed,
                        shifts_auto=auto, val_labels=val_labels, flipped_features=flipped_features, probe=probe,
                        probe_epochs=probe_epochs, knn_k=knn_k, crf=crf, scheduler=scheduler, device=device,
                        allow_backbone_mismatch=allow_backbone_mismatch, progress=not quiet, **loop)
    rep = run_seeds(opts, say=click.echo)
    click.echo(table({"this config": rep["summary"]}, rep["n_seeds"], rep["seconds"], label="runs"))
    click.echo(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'results.md'}")


@main.command()
@click.argument("name")
@click.option("--root", required=True, type=click.Path(), help="The data set's folder (or STEGO's data dir).")
@click.option("--weights", required=True, multiple=True, type=click.Path(),
              help="A DINO .pth (exported here with omh-ref export, which needs torch), or the .onnx "
                   "files, one per resolution the recipe uses; repeatable.")
@click.option("--out", required=True, type=click.Path(), help="The run's folder (weights/, feats/, seed<N>/, results).")
@click.option("--backbone", default=None, type=click.Choice(["vit_small", "vit_base"]),
              help="Checked against the recipe's backbone [default: the recipe's].")
@click.option("--seeds", "seed_list", default="0,1,2", show_default=True, help="Comma-separated training seeds.")
@click.option("--omh/--no-omh", default=None,
              help="OMH on the recipe's base, or the base alone (its own probe) [default: the recipe's].")
@shared_options("crf", "probe", "scheduler", crf="Also score the cluster predictions after a dense CRF (omh-ref[crf]).",
                probe="The linear probe on the training crops (streamed: its codes are cached in a temporary "
                      "file, or recomputed every epoch when the disk has no room for them).",
                scheduler="Dask for extraction, the KNN table and the seeds' runs: local:N or a scheduler address.")
@shared_options("device")
@click.option("--dry-run", is_flag=True, help="Print the equivalent omh-ref commands (done ones marked) and stop.")
@shared_options("quiet")
@friendly_errors
def recipe(name, root, weights, out, backbone, seed_list, omh, crf, probe, scheduler, device, dry_run, quiet):
    """Run a benchmark recipe end to end: export, extract, KNN, train and evaluate per seed, then
    mean ± std (OUT/results.json, OUT/results.md).

    NAME is a recipe file, or the name of one in the checkout's configs/:
    {cocostuff27,cityscapes27,potsdam3}_{vits8,vitb8}. Rerun the same command after an
    interruption: finished stages are skipped, unfinished ones continue."""
    from omh_ref.jobs import recipe as recipe_mod
    from omh_ref.jobs.seeds import parse_seeds, table

    opts = recipe_mod.RecipeOptions(name=name, root=root, weights=tuple(weights), out=out, backbone=backbone,
                                    seeds=parse_seeds(seed_list), crf=crf, probe=probe, scheduler=scheduler,
                                    device=device, progress=not quiet,
                                    overrides={} if omh is None else {"model": {"omh": omh}})
    if dry_run:
        click.echo(recipe_mod.format_plan(recipe_mod.plan(opts, say=click.echo)))
        return
    try:
        rep = recipe_mod.run(opts, say=click.echo)
    except KeyboardInterrupt:
        click.echo("interrupted: finished stages, recorded extraction chunks and checkpoints are kept; run the "
                   "same command again to continue", err=True)
        sys.exit(130)
    click.echo(table({name: rep["summary"]}, rep["n_seeds"], rep["seconds"], label="recipe"))
    click.echo(f"wrote {Path(out) / 'results.json'} and {Path(out) / 'results.md'}")


@main.command()
@click.option("--out", required=True, type=click.Path(), help="Output folder (feats.npy, labels.npy, feats.json).")
@click.option("--split", default="train", type=click.Choice(["train", "val"]), show_default=True)
@click.option("--n-images", default=600, show_default=True)
@click.option("--grid", default=16, show_default=True, help="Feature grid side (h = w).")
@click.option("--dim", default=384, show_default=True, help="Feature channels C.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--dtype", default="float16", type=click.Choice(["float16", "float32"]), show_default=True)
@click.option("--hp", is_flag=True, help="Also write the HP base's inputs: attn.npy (HP's window weights of the "
              "centred features' dot products, standing in for a ViT's attention) and feats_aug.npy (each image "
              "restyled, standing in for a photometric augmentation).")
@friendly_errors
def synth(out, split, n_images, grid, dim, seed, dtype, hp):
    """Write the synthetic DINO-like demo data (a superclass -> class -> part hierarchy)."""
    from omh_ref.features import synthetic

    try:
        spec = synthetic.SynthSpec(n_images=n_images, grid=grid, dim=dim, seed=seed)
    except ValueError as e:
        raise InputError(str(e)) from None
    paths = synthetic.write(spec, out, dtype=dtype, split=split, hp=hp)
    click.echo("wrote " + ", ".join(str(p) for p in paths.values()))


@main.command(name="import")
@click.argument("checkpoint", type=click.Path())
@named("out", required=True, type=click.Path(),
       help="Folder for ckpt.npz, the backbone's ONNX export(s), manifest.json and import.json.")
@named("resolution", multiple=True, type=click.IntRange(min=1),
       help="The backbone's export size in px; repeat for several [default: 320, the peers' evaluation size; "
            "224 for a DINOv2 backbone].")
@named("overwrite", is_flag=True, help="Replace a checkpoint in --out that is not an import of this file.")
@named("dataset", default=None, type=click.Choice(["cocostuff27", "cityscapes27", "potsdam3"]),
       help="HP's checkpoints only: the data set whose HP settings (its json/server file) the config records; "
            "HP's file holds none [default: the hp base's, COCO-Stuff's, said so].")
@friendly_errors
def import_cmd(checkpoint, out, resolution, overwrite, dataset):
    """A peer's released checkpoint (STEGO's or SmooSeg's Lightning .ckpt, HP's .pth) as an omh-ref
    checkpoint that eval and segment take as it is: the head, the cluster probe (SmooSeg: its
    teacher centres), STEGO's and HP's linear probe (eval --stored-probe), HP's moving-average
    head, and the backbone it holds exported to ONNX (needs omh-ref[torch]). The file is read with
    a restricted unpickler: nothing it names is run; nothing downloads."""
    from omh_ref.jobs.imports import ImportOptions, next_steps, run

    record = run(ImportOptions(checkpoint=checkpoint, out=out, resolution=tuple(resolution), overwrite=overwrite,
                               dataset=dataset), say=click.echo)
    click.echo("next:")
    for line in next_steps(out, record):
        click.echo(line)


@main.command()
@click.option("--model", required=True, type=click.Path(), help="ONNX backbone (omh-ref export), the one the checkpoint's features came from.")
@click.option("--checkpoint", required=True, type=click.Path(), help="ckpt.npz from omh-ref train.")
@click.option("--images", required=True, multiple=True, type=click.Path(),
              help="A folder of images (searched recursively) or an image file; repeat for more.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (masks, overlays, segment.json).")
@click.option("--resolution", default=None, type=int,
              help="Short side in px the image is resized to [default: the model's input size, 224 if dynamic].")
@click.option("--windows", default="auto", type=click.Choice(["auto", "always"]), show_default=True,
              help="auto: one pass when the model takes any input size, else overlapping square windows; always: windows.")
@click.option("--levels", default="eval", type=click.Choice(["eval", "all"]), show_default=True,
              help="all: also one mask per hierarchy level (<name>.L0.png, ...).")
@click.option("--overlay", is_flag=True, help="Also write colour overlays (<name>.overlay.png; per level with --levels all).")
@click.option("--flip", is_flag=True, help="Average with the mirrored image.")
@shared_options("crf", "crf_workers", "crf_timeout", crf="Refine the eval level with a dense CRF (omh-ref[crf]).")
@click.option("--match", default=None, type=click.Path(), help="match.json from omh-ref eval --save-match: masks hold class ids.")
@shared_options("device")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1), help="Windows per forward pass (and images per step).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="onnxruntime threads [default: all cores].")
@click.option("--on-error", default="skip", type=click.Choice(["skip", "fail"]), show_default=True,
              help="An unreadable image: leave it out (listed in segment.json) or stop.")
@click.option("--overwrite", is_flag=True, help="Start over: replace the images' masks (needed when the settings differ).")
@shared_options("allow_backbone_mismatch")
@shared_options("quiet")
@friendly_errors
def segment(model, checkpoint, images, out, resolution, windows, levels, overlay, flip, crf, crf_workers, crf_timeout,
            match, device, batch_size, threads, on_error, overwrite, allow_backbone_mismatch, quiet):
    """Images -> masks at each image's own size (cluster or class ids), per-level masks, overlays.

    A rerun with the same settings skips the images already done.
    """
    from omh_ref.jobs.segment import SegmentOptions, run

    opts = SegmentOptions(model=model, checkpoint=checkpoint, images=list(images), out=out, resolution=resolution,
                          windows=windows, levels=levels, overlay=overlay, flip=flip, crf=crf,
                          crf_workers=crf_workers, crf_timeout=crf_timeout, match=match, device=device,
                          batch_size=batch_size, threads=threads, on_error=on_error, overwrite=overwrite,
                          allow_backbone_mismatch=allow_backbone_mismatch, progress=not quiet)
    rec = run(opts, log=click.echo)
    if not rec["images"]:
        raise InputError(f"{out}: no image could be segmented (see {Path(out) / 'segment.json'})")


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path())
@named("out", default=None, type=click.Path(),
       help="The HTML file [default: RUN/report.html for one RUN; needed for several].")
@named("images", default=4, show_default=True, type=click.IntRange(min=0),
       help="Validation images in the qualitative grid (the same ones for every run).")
@named("title", default=None, help="The page's title [default: the runs' names].")
@friendly_errors
def report(runs, out, images, title):
    """One self-contained HTML page (pictures inside, opens from disk, loads nothing) of one or
    several runs side by side: a seeds or recipe folder, a demo folder, or a train folder.
    Settings and provenance, mean ± std and per-seed scores, per-class IoU, every level against its
    granularity with the hierarchy as a tree, every seed's curves, a qualitative grid. Needs
    matplotlib (omh-ref[report])."""
    from omh_ref.jobs.report import ReportOptions, run

    path = run(ReportOptions(runs=tuple(runs), out=out, images=images, title=title), say=click.echo)
    click.echo(f"wrote {path}")


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
@shared_options("crf", "crf_workers", "crf_timeout",
                crf="Refine cluster predictions with a dense CRF (needs the images, omh-ref[crf]).")
@click.option("--save-match", default=None, type=click.Path(),
              help="Write the cluster->class matching and class names (for omh-ref segment --match).")
@click.option("--save-masks", default=None, type=click.Path(),
              help="Folder for every prediction of the split as a PNG (clusters/, and crf/ with --crf).")
@click.option("--upsample", default="logits", show_default=True, type=click.Choice(["logits", "code"]),
              help="What is upsampled to label resolution for the cluster predictions: the cosine logits "
                   "(omh-ref's) or the code before the cosine (STEGO's and SmooSeg's evaluation: an imported "
                   "checkpoint scored as its peer scores it).")
@click.option("--level-labels", default=None,
              help="Label granularity of each level, finest first, '-' to skip one (e.g. parts,classes,superclasses) "
                   "[default: the granularity with the closest number of classes <= the level's clusters].")
@shared_options("stored_probe")
@shared_options("device", "allow_backbone_mismatch")
@shared_options("quiet")
@friendly_errors
def eval_cmd(json_out, quiet, **given):
    """Score a checkpoint: cluster (Hungarian) and linear-probe mIoU / accuracy, per-class IoU,
    the cluster->class matching, every level against its label granularity, and the learned
    hierarchy with its consistency."""
    from omh_ref.jobs.evaluate import EvalOptions, format_table, run

    opts = EvalOptions(json=json_out, progress=not quiet, **given)   # the flags have EvalOptions' names
    result = run(opts, say=click.echo)
    click.echo(format_table(result))
    for path in (opts.json, opts.save_match):
        if path:
            click.echo(f"wrote {path}")
    if opts.save_masks:
        click.echo(f"masks in {opts.save_masks}")
    if opts.out:
        click.echo(f"pictures in {opts.out}")


if __name__ == "__main__":
    main()
