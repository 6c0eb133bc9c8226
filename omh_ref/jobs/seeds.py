"""``omh-ref seeds``: train and evaluate one config under several seeds, then report every metric
as mean ± std over the seeds and per seed (``results.json``, ``results.md``), then ``report.html``
(:mod:`omh_ref.jobs.report`, where matplotlib is installed).

Each seed is one run in ``<out>/seed<N>/`` (``ckpt.npz``, ``log.jsonl``, ``eval.json``,
``pictures/``), done by :func:`run_seed`, which skips what is already complete: a checkpoint at
the last step with this config is not trained again (one short of it is resumed, bit-exactly), and
an ``eval.json`` whose inputs (checkpoint bytes, splits, probe and CRF settings) are unchanged is
not evaluated again. A rerun after a crash or Ctrl-C therefore continues where the runs stopped.

With ``scheduler`` (``local:N`` or a Dask scheduler address, :mod:`omh_ref.features.distributed`)
each seed is one Dask task, so each worker trains and evaluates one run at a time. A seed's
computation does not depend on where it runs (one seeded generator per run), so the numbers equal
those of running the seeds one after another; the workers need the folders at the same paths.

The summary code here (:func:`summarize`, :func:`table`) is also the demo's.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.config import Config
from ..core.errors import InputError
from ..core.files import file_sha256, write_json, write_text
from ..core.lock import FolderLock
from ..core.options import default
from ..features import provenance
from ..features.store import FeatureStore
from ..train import checkpoint
from ..train.loop import TrainOptions, optimiser_settings, train
from .evaluate import EvalOptions, run as run_eval

PROBES = ("cluster", "linear", "crf")          # the scores a run can have, in report order
PROBE_TITLES = {"cluster": "cluster", "linear": "linear", "crf": "cluster+CRF"}
SCORES = ("miou", "acc")
SCORE_TITLES = {"miou": "mIoU", "acc": "acc"}


def parse_seeds(text, flag="--seeds") -> tuple:
    """'0,1,2' -> (0, 1, 2): distinct integers >= 0; anything else is an InputError naming ``flag``."""
    try:
        seeds = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise InputError(f"{flag}: expected distinct comma-separated integers >= 0, got {text!r}")
    return seeds


# --------------------------------------------------------------------------------------------------
# Summaries (also the demo's)
# --------------------------------------------------------------------------------------------------
def metric_values(run: dict) -> dict:
    """{'cluster_miou': x, 'cluster_acc': y, ...} of one run's scores (probes it has)."""
    return {f"{p}_{k}": float(run[p][k]) for p in PROBES if run.get(p) for k in SCORES}


def summarize(runs: list) -> dict:
    """Mean, sample std (0 for one run) and the values per seed of every metric all runs have."""
    per_run = [metric_values(r) for r in runs]
    keys = [k for k in per_run[0] if all(k in v for v in per_run)] if per_run else []
    out = {}
    for k in keys:
        v = np.array([m[k] for m in per_run])
        out[k] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                  "values": v.tolist()}
    return out


def metric_title(key: str) -> str:
    probe, score = key.rsplit("_", 1)
    return f"{PROBE_TITLES[probe]} {SCORE_TITLES[score]}"


def table(rows: dict, n_seeds: int, seconds=None, label="method") -> str:
    """The side-by-side table of ``rows`` ({name: :func:`summarize` output}): mean ± std over seeds."""
    keys = [k for k in next(iter(rows.values()))] if rows else []
    width = max([20] + [len(m) for m in rows])
    head = f"{label:<{width}} " + " ".join(f"{metric_title(k):>15}" for k in keys)
    lines = [head, "-" * len(head)]
    for name, s in rows.items():
        cells = [f"{s[k]['mean']:6.1f} ± {s[k]['std']:4.1f}" for k in keys]
        lines.append(f"{name:<{width}} " + " ".join(f"{c:>15}" for c in cells))
    took = f"; {seconds:.0f} s" if seconds is not None else ""
    lines.append(f"(mean ± std over {n_seeds} seeds, ×100{took})")
    return "\n".join(lines)


def markdown(rep: dict) -> str:
    """``results.md``: every metric's mean ± std and its value per seed, then what was run."""
    seeds = [r["seed"] for r in rep["runs"]]
    lines = [f"# {rep.get('title', 'Results')}", "",
             f"Mean ± sample standard deviation over {len(seeds)} seed(s), scores ×100.", "",
             "| metric | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|" + "---|" * len(seeds)]
    for k, s in rep["summary"].items():
        lines.append(f"| {metric_title(k)} | {s['mean']:.2f} ± {s['std']:.2f} | "
                     + " | ".join(f"{v:.2f}" for v in s["values"]) + " |")
    lines += ["", "Per run: `seed<N>/eval.json` (per-class IoU, the cluster-to-class matching), "
              "`seed<N>/log.jsonl` (training losses), `seed<N>/pictures/`.", ""]
    for note in rep.get("notes", []):
        lines.append(f"- {note}")
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# One seed: train (or resume, or skip), evaluate (or skip)
# --------------------------------------------------------------------------------------------------
@dataclass
class SeedTask:
    """Everything one seed's run needs; small and picklable (a Dask task's argument)."""

    seed: int
    config: Config
    train: TrainOptions            # its ``out`` is the seed's folder, ``seed`` the seed
    eval: EvalOptions              # its ``checkpoint`` is the seed's checkpoint
    crf: bool = False              # also score the cluster predictions after a dense CRF


def _trained(task: SeedTask, say) -> None:
    """Train the seed's run to its last step: skipped when the checkpoint is there, resumed when
    one short of it is."""
    opts, out = task.train, Path(task.train.out)
    ckpt = out / "ckpt.npz"
    step = checkpoint.step_of(ckpt) if ckpt.exists() else None
    if step is not None:
        ck = checkpoint.load(ckpt)
        diff = [f.name for f in dataclasses.fields(Config)
                if getattr(ck["config"], f.name) != getattr(task.config, f.name)]
        if diff:
            raise InputError(f"{ckpt}: trained with another config (differs in {', '.join(diff)}); choose "
                             "another output folder, or remove that run to train it again")
        before = ck["info"].get("options", {})
        if before.get("seed", task.seed) != task.seed:
            raise InputError(f"{ckpt}: is the run of seed {before['seed']}, not {task.seed}")
        now = {"lr": opts.lr, "lr_clusters": opts.lr_clusters, "batch_size": opts.batch_size,
               **optimiser_settings(opts, task.config.base)}
        other = [f"--{k.replace('_', '-')} {before[k]} (now {v})" for k, v in now.items() if k in before and before[k] != v]
        if other:   # its results would be filed under settings it was not trained with
            raise InputError(f"{ckpt}: trained with {', '.join(other)}; choose another output folder, or remove that "
                             "run to train it again")
        if step > opts.steps:
            raise InputError(f"{ckpt}: is at step {step}, past the {opts.steps} steps asked for; choose another "
                             "output folder")
        if step == opts.steps:
            say(f"seed {task.seed}: trained already ({ckpt}, step {step})")
            return
        say(f"seed {task.seed}: resuming training at step {step} of {opts.steps}")
        opts = dataclasses.replace(opts, resume=str(ckpt))
    res = train(task.config, opts, say=say)
    if res["interrupted"]:      # Ctrl-C: the checkpoint is written; a rerun resumes it
        raise KeyboardInterrupt


def _eval_key(task: SeedTask) -> dict:
    e = task.eval
    paths = {k: (str(Path(v).resolve()) if v else None)
             for k, v in (("features", e.features), ("labels", e.labels), ("flipped_features", e.flipped_features),
                          ("train_features", e.train_features), ("train_labels", e.train_labels))}
    return {"checkpoint_sha256": file_sha256(e.checkpoint), **paths, "probe_epochs": e.probe_epochs,
            "seed": e.seed, "n_classes": e.n_classes, "crf": task.crf}


def run_seed(task: SeedTask, say=print) -> dict:
    """Train and evaluate one seed (each part skipped when complete). -> the run's record:
    {'seed', 'cluster', 'linear'?, 'crf'?}, scores as ``omh-ref eval --json`` writes them."""
    _trained(task, say)
    out = Path(task.train.out)
    done = out / "eval.json"
    key = _eval_key(task)
    if done.is_file():
        try:
            saved = json.loads(done.read_text())
        except ValueError:
            saved = {}
        if saved.get("key") == key:
            say(f"seed {task.seed}: evaluated already ({done})")
            return saved["run"]
    say(f"seed {task.seed}: evaluating {out / 'ckpt.npz'}")
    res = run_eval(task.eval)
    run = {"seed": task.seed, "cluster": res["cluster"]}
    if "linear" in res:
        run["linear"] = res["linear"]
    if task.crf:
        say(f"seed {task.seed}: scoring the cluster predictions after a dense CRF")
        refined = run_eval(dataclasses.replace(task.eval, crf=True, train_features=None, train_labels=None,
                                               out=None))
        run["crf"] = refined["cluster"]
    write_json(done, {"key": key, "run": run, "class_names": res["class_names"],
                      "hierarchy": res["hierarchy"]["text"], "levels": res["levels"]})   # levels: omh-ref report's
    return run


def _quiet_run_seed(task: SeedTask, blas_threads=None) -> dict:
    """:func:`run_seed` on a Dask worker: its messages stay there, the driver reports progress.
    ``blas_threads``: the driver's BLAS thread count, applied here for the run. Dask's workers
    start with one BLAS thread (its nanny sets ``OMP_NUM_THREADS=1``), and OpenBLAS's products
    differ in their last bits between thread counts, so without it a seed run on Dask trained
    other parameters than the same seed run in the driver."""
    from ..core.backend import blas_threads_limited

    with blas_threads_limited(blas_threads):
        return run_seed(task, say=lambda *a: None)


# --------------------------------------------------------------------------------------------------
# All seeds
# --------------------------------------------------------------------------------------------------
@dataclass
class SeedsOptions:
    """What ``omh-ref seeds`` takes."""

    features: str                        # training features (KNN table beside them, built if missing)
    val_features: str                    # evaluation split
    out: str
    config: Config = field(default_factory=Config)
    seeds: tuple = (0, 1, 2)
    steps: int = default("steps")
    batch_size: int = default("batch_size")
    lr: float = default("lr")
    lr_clusters: float = default("lr_clusters")
    weight_decay: float | None = None    # None: the base's (TrainOptions)
    grad_clip: float | None = None
    knn_k: int = default("knn_k")
    shifts_auto: bool = False
    ckpt_every: int = default("ckpt_every")
    log_every: int = default("log_every")
    val_labels: str | None = None        # default: the labels file the val feats.json names
    flipped_features: str | None = None
    probe: bool = default("probe")  # linear probe on the training features and their labels
    train_labels: str | None = None      # default: the labels file the train feats.json names
    probe_epochs: int = 10
    n_classes: int | None = None
    crf: bool = default("crf")
    crf_workers: int = default("crf_workers")
    batch_size_eval: int = 16
    pictures: bool = True
    scheduler: str | None = default("scheduler")
    device: str = default("device")
    allow_backbone_mismatch: bool = default("allow_backbone_mismatch")
    progress: bool = True
    title: str = "Results"
    notes: tuple = ()                    # lines for results.md

    def tasks(self) -> list:
        out = Path(self.out)
        tasks = []
        for seed in self.seeds:
            d = out / f"seed{seed}"
            t = TrainOptions(features=self.features, out=str(d), steps=self.steps, batch_size=self.batch_size,
                             lr=self.lr, lr_clusters=self.lr_clusters, weight_decay=self.weight_decay,
                             grad_clip=self.grad_clip, seed=seed, device=self.device,
                             ckpt_every=self.ckpt_every, log_every=self.log_every, knn_k=self.knn_k,
                             shifts_auto=self.shifts_auto, progress=self.progress and self.scheduler is None,
                             allow_backbone_mismatch=self.allow_backbone_mismatch)
            e = EvalOptions(checkpoint=str(d / "ckpt.npz"), features=self.val_features, labels=self.val_labels,
                            flipped_features=self.flipped_features,
                            train_features=self.features if self.probe else None,
                            train_labels=self.train_labels if self.probe else None, n_classes=self.n_classes,
                            probe_epochs=self.probe_epochs, batch_size=self.batch_size_eval, seed=seed,
                            out=str(d / "pictures") if self.pictures else None, crf_workers=self.crf_workers,
                            device=self.device, progress=self.progress and self.scheduler is None,
                            allow_backbone_mismatch=self.allow_backbone_mismatch)
            tasks.append(SeedTask(seed, self.config, t, e, self.crf))
        return tasks


def _same_backbone(opts: SeedsOptions, say) -> None:
    """Training and evaluation features of two backbones are refused before any seed trains (the
    evaluations would refuse them only after every training)."""
    train, val = (FeatureStore(p).meta for p in (opts.features, opts.val_features))
    if train and val:
        provenance.require_same(provenance.of_meta(train), provenance.of_meta(val),
                                given_what=f"the --val-features {opts.val_features}",
                                trained_what=f"the --features {opts.features}", allow=opts.allow_backbone_mismatch,
                                say=say)


def run(opts: SeedsOptions, say=print) -> dict:
    """Every seed's run under ``opts.out`` (held locked), then ``results.json`` and ``results.md``
    there. -> the report {'runs', 'summary', 'n_seeds', 'seconds', ...}."""
    if not opts.seeds:
        raise InputError("--seeds: give at least one seed")
    for path, flag in ((opts.features, "--features"), (opts.val_features, "--val-features")):
        if not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file (expected a feats.npy from omh-ref extract)")
    _same_backbone(opts, say)
    with FolderLock(opts.out, "seeds", say=say):
        return _run(opts, say)


def _run(opts, say):
    from ..core.progress import bar as progress_bar

    t0 = time.perf_counter()
    tasks = opts.tasks()
    runs = {}
    if opts.scheduler is None:
        for t in tasks:
            say(f"seed {t.seed} ({len(runs) + 1} of {len(tasks)})")
            runs[t.seed] = run_seed(t, say)
    else:
        from ..core.backend import blas_thread_count
        from ..features.distributed import dask_client, run_all

        say(f"seeds {', '.join(map(str, opts.seeds))} on Dask ({opts.scheduler}), one run per task")
        with dask_client(opts.scheduler) as client, \
                progress_bar(len(tasks), "seeds", opts.progress, unit="run") as bar:
            def got(run):
                runs[run["seed"]] = run
                bar.update(1)
                say(f"seed {run['seed']}: done")
            threads = blas_thread_count()
            run_all(client, _quiet_run_seed, [(t, threads) for t in tasks], got, name="omh-ref-seeds")
    ordered = [runs[s] for s in opts.seeds]
    rep = {"title": opts.title, "runs": ordered, "summary": summarize(ordered), "n_seeds": len(ordered),
           "config": dataclasses.asdict(opts.config),
           "options": {k: getattr(opts, k) for k in ("features", "val_features", "steps", "batch_size", "lr",
                                                     "lr_clusters", "weight_decay", "grad_clip", "knn_k", "probe",
                                                     "probe_epochs", "crf", "device")},
           "notes": list(opts.notes), "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(opts.out)
    write_json(out / "results.json", rep)
    write_text(out / "results.md", markdown(rep))
    from .report import write_after    # OUT/report.html (with omh-ref[report]; else one line says so)

    write_after(out, say)
    return rep
