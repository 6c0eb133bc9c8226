"""``omh-ref demo``: synthetic data -> train OMH, OMH without the hierarchy loss, and the STEGO
baseline over several seeds -> evaluate (the STEGO baseline twice: with its own cluster probe, and
with spherical k-means on its code, :mod:`omh_ref.evaluate.kmeans`) -> a side-by-side table and
a report folder.

Report (under ``out``): ``report.json`` (every run's cluster and linear scores, every level's
scores against its label granularity (parts, classes, superclasses) and the hierarchy's
consistency, means and spreads), ``predictions.png`` (val images: labels and each method's matched cluster predictions),
``loss_curves.png`` (every loss part of each method's ``log.jsonl`` for the first seed),
``confusion_<method>.png``, and the runs' checkpoints and logs under ``runs/``; last, with
matplotlib installed (omh-ref[report]), ``report.html`` (:mod:`omh_ref.jobs.report`), for whose
curves each run validates on the validation split every fifth of its steps (which changes no number).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from ..core import bases
from ..core.config import Config, with_base_defaults
from ..core.errors import InputError
from ..core.files import write_text
from ..core.lock import FolderLock
from ..core.options import default
from ..evaluate import granular, kmeans, pictures
from ..evaluate.hierarchy import UsageAccumulator, hierarchy_plans
from ..evaluate.predict import cluster_eval, scores_json
from ..evaluate.probe import linear_eval, linear_probe
from ..evaluate.validation import Validator
from ..features import synthetic
from ..features.store import FeatureStore
from ..train.checkpoint import load_params
from ..train.loop import TrainOptions, train
from . import seeds

# HP's schedule for a short run: its own values are COCO-Stuff's (warm-up 1000 steps, pool renewed
# every 100), under which λ stays 0 through the demo's 300 steps and the task-specific positives never
# count; the demo takes HP's Cityscapes values instead (warm-up 50, renewal every 20; its
# json/server/cityscapes.json lines 31 and 36, docs/hp_reading.md §9), chosen before any run.
HP_SHORT = {"warmup": 50, "renew_interval": 20}
METHODS = {
    "OMH": {},
    "OMH w/o hierarchy": {"lam_hier": 0.0},
    "STEGO baseline": {"omh": False},
    "OMH on SmooSeg": {"base": "smooseg"},
    "SmooSeg baseline": {"base": "smooseg", "omh": False},
    "OMH on HP": {"base": "hp", **HP_SHORT},
    "HP baseline": {"base": "hp", "omh": False, **HP_SHORT},
}
# The rows of each base (``--bases``); the default table is STEGO's.
BASE_METHODS = {"stego": ("OMH", "OMH w/o hierarchy", "STEGO baseline"),
                "smooseg": ("OMH on SmooSeg", "SmooSeg baseline"),
                "hp": ("OMH on HP", "HP baseline")}
# A base alone is also scored with spherical k-means on its trained code (its own cluster probe
# can collapse: STEGO's keeps three live clusters on the demo data), as a user of the field would.
KMEANS_OF = {"STEGO baseline": "STEGO code + k-means", "SmooSeg baseline": "SmooSeg code + k-means",
             "HP baseline": "HP code + k-means"}


def methods_of(spec: str) -> tuple:
    """``--bases``: 'all' or comma-separated base names -> the demo's rows, in BASE_METHODS order."""
    names = list(BASE_METHODS) if spec == "all" else [b.strip() for b in spec.split(",") if b.strip()]
    unknown = [b for b in names if b not in BASE_METHODS]
    if unknown or not names:
        raise InputError(f"--bases: expected 'all' or base names from {', '.join(BASE_METHODS)}, got {spec!r}")
    return tuple(m for b in BASE_METHODS if b in names for m in BASE_METHODS[b])


@dataclasses.dataclass
class DemoOptions:
    out: str = "runs/demo"
    seeds: tuple = (0, 1, 2)
    steps: int = default("steps")
    batch_size: int = default("batch_size")
    n_train: int = 600
    n_val: int = 200
    probe_epochs: int = 5
    device: str = default("device")
    progress: bool = True
    methods: tuple = BASE_METHODS["stego"]


def demo_config(n_classes: int, **overrides) -> Config:
    """The demo's model: three levels 4K/2K/K over the K true classes (36/18/9 for the default 9),
    every other field the base's default (omh-ref's, which are STEGO's; SmooSeg's own where they
    differ)."""
    base = dict(levels=(4 * n_classes, 2 * n_classes, n_classes))
    base.update(overrides)
    return Config(**with_base_defaults(base))


def prepare_data(root, n_train=600, n_val=200, say=print, hp=False) -> dict:
    """Write the synthetic train and val splits under ``root`` unless the same spec is there;
    with ``hp``, the train split also with the HP base's inputs (``synthetic.write(hp=True)``:
    the same features, plus attn.npy and feats_aug.npy). -> {'train': dir, 'val': dir}."""
    root = Path(root)
    paths = {}
    for split, n in (("train", n_train), ("val", n_val)):
        spec = synthetic.SynthSpec(n_images=n)
        d = root / split
        meta = d / "feats.json"
        rec = json.loads(meta.read_text()) if meta.is_file() else {}
        need_hp = hp and split == "train"
        if not (rec.get("synth_spec") == dataclasses.asdict(spec) and rec.get("label_hierarchy")
                and (d / "labels_fine.npy").is_file()   # written before the parts were: write again
                and (not need_hp or rec.get("attention"))):
            say(f"demo data: writing synthetic {split} split ({n} images) to {d}"
                + (" with the HP base's inputs" if need_hp else ""))
            synthetic.write(spec, d, split=split, hp=need_hp)
        paths[split] = d
    return paths


def needs_hp_inputs(methods) -> bool:
    """Whether one of the demo's ``methods`` trains the HP base (which reads attn.npy and
    feats_aug.npy)."""
    return any(METHODS[m].get("base") == "hp" for m in methods if m in METHODS)


def run(opts: DemoOptions, say=print) -> dict:
    """The whole demo under ``opts.out``, which it holds locked (one demo per folder at a time)."""
    with FolderLock(opts.out, "demo", say=say):
        return _run(opts, say)


def _run(opts: DemoOptions, say) -> dict:
    t0 = time.perf_counter()
    out = Path(opts.out)
    data = prepare_data(out / "data", opts.n_train, opts.n_val, say, hp=needs_hp_inputs(opts.methods))
    train_store = FeatureStore(data["train"] / "feats.npy", labels=data["train"] / "labels.npy")
    val_store = FeatureStore(data["val"] / "feats.npy", labels=data["val"] / "labels.npy")
    n_classes = int(train_store.meta["n_classes"])
    class_names = train_store.meta.get("class_names")
    runs, logs, shown = {}, {}, {}
    for method in opts.methods:
        for seed in opts.seeds:
            cfg = demo_config(n_classes, in_dim=train_store.C, **METHODS[method])
            rates = {k: v for k, v in bases.get(cfg.base).LOOP_DEFAULTS.items() if k in ("lr", "lr_clusters")}
            run_dir = out / "runs" / f"{method.replace(' ', '_').replace('/', '')}-seed{seed}"
            say(f"demo: {method}, seed {seed}")
            res = train(cfg, TrainOptions(features=str(train_store.path), out=str(run_dir), steps=opts.steps,
                                          batch_size=opts.batch_size, seed=seed, device=opts.device, **rates,
                                          shifts_auto=True, progress=opts.progress,
                                          ckpt_every=opts.steps, overwrite=True,
                                          val_every=max(1, opts.steps // 5)),   # report.html's curves
                        say=say, validate=Validator(str(val_store.path), device=opts.device))
            if res["interrupted"]:   # Ctrl-C: the run's checkpoint is written; stop the demo here
                raise KeyboardInterrupt
            params, cfg = load_params(res["checkpoint"], opts.device)
            levels = granular.LevelScorer(cfg, val_store, granular.load_granularities(val_store))
            usage = UsageAccumulator(cfg) if cfg.marginals == "usage" and len(cfg.levels) > 1 else None
            clu, preds = cluster_eval(params, cfg, val_store, n_classes, device=opts.device, keep=6, usage=usage,
                                      levels=levels)
            plans = hierarchy_plans(params, cfg, usage.means() if usage else None) if len(cfg.levels) > 1 else None
            probe = linear_probe(params, train_store, n_classes, epochs=opts.probe_epochs, seed=seed,
                                 device=opts.device, progress=opts.progress, cfg=cfg)
            lin = linear_eval(params, probe, val_store, n_classes, device=opts.device, cfg=cfg)
            runs.setdefault(method, []).append({"seed": seed, "cluster": scores_json(clu), "linear": scores_json(lin),
                                                "levels": levels.result(plans)})
            if method in KMEANS_OF:   # the same code, clustered by k-means instead of its own probe
                runs.setdefault(KMEANS_OF[method], []).append(
                    _kmeans_run(params, cfg, train_store, val_store, n_classes, seed, lin, opts.device))
            if seed == opts.seeds[0]:
                logs[method] = res["log"]
                shown[method] = (preds, clu)
    summary = {m: seeds.summarize(rs) for m, rs in runs.items()}
    rep = {"methods": summary, "levels": {m: level_summary(rs) for m, rs in runs.items()},
           "runs": runs, "options": dataclasses.asdict(opts), "n_classes": n_classes,
           "class_names": class_names, "seconds": round(time.perf_counter() - t0, 1)}
    write_text(out / "report.json", json.dumps(rep, indent=1))
    _pictures(out, val_store, shown, logs, n_classes, class_names, opts.seeds[0])
    from .report import write_after    # report.html (with omh-ref[report]; else one line says so)

    write_after(out, say)
    return rep


def _kmeans_run(params, cfg, train_store, val_store, n_classes, seed, lin, device) -> dict:
    """The record of a base's code clustered by spherical k-means (five restarts) on the training
    split's codes, scored as every head is; the linear probe is the code's own (``lin``)."""
    centres = kmeans.fit_codes(params, train_store, cfg.eval_k, seed, restarts=5, device=device, cfg=cfg)
    fitted = kmeans.with_centres(params, cfg, centres, device)
    levels = granular.LevelScorer(cfg, val_store, granular.load_granularities(val_store))
    clu, _ = cluster_eval(fitted, cfg, val_store, n_classes, device=device, levels=levels)
    return {"seed": seed, "cluster": scores_json(clu), "linear": scores_json(lin), "levels": levels.result(None)}


def _stat(values):
    v = np.array([np.nan if x is None else x for x in values], dtype=np.float64)
    return {"mean": float(np.nanmean(v)) if np.isfinite(v).any() else None,
            "std": float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0,
            "values": [float(x) if np.isfinite(x) else None for x in v]}


def level_summary(rs) -> dict:
    """Every level's scores against its label granularity and the consistency of each plan, mean ±
    std over the runs ``rs`` of one method."""
    first = rs[0]["levels"]
    return {"levels": [{"level": e["level"], "clusters": e["clusters"], "granularity": e["granularity"],
                        "miou": _stat([r["levels"]["levels"][i]["scores"]["miou"] for r in rs]) if e["scores"] else None,
                        "many_to_one_miou": (_stat([r["levels"]["levels"][i]["scores"]["many_to_one"]["miou"]
                                                    for r in rs]) if e["scores"] else None)}
                       for i, e in enumerate(first["levels"])],
            "consistency": [{"child": c["child"], "parent": c["parent"],
                             **{k: _stat([r["levels"]["consistency"][i][k] for r in rs])
                                for k in ("consistency", "consistency_chance")}}
                            for i, c in enumerate(first["consistency"])]}


def table(rep) -> str:
    """The side-by-side table (mean ± std over seeds), then every level's scores."""
    lines = [seeds.table(rep["methods"], len(next(iter(rep["runs"].values()))), rep["seconds"])]
    lines += ["", "every level against its label granularity (cluster mIoU, one-to-one strict / many-to-one; "
                  "consistency of each level's plan with the label hierarchy, and a blind plan's in brackets):"]
    width = max((len(m) for m in rep.get("levels", {})), default=20)
    for m, s in rep.get("levels", {}).items():
        cells = [f"L{e['level']} {e['clusters']}->{e['granularity']} {_pm(e['miou'])} / {_pm(e['many_to_one_miou'])}"
                 for e in s["levels"] if e["granularity"]]
        cons = [f"L{c['child']}->L{c['parent']} {_pm(c['consistency'], 2)} ({_pm(c['consistency_chance'], 2)})"
                for c in s["consistency"]]
        lines.append(f"{m:<{width}} " + "; ".join(cells) + (f"; consistency {', '.join(cons)}" if cons else ""))
    return "\n".join(lines)


def _pm(stat, digits=1):
    if stat is None or stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.{digits}f}±{stat['std']:.{digits}f}"


def _pictures(out, val_store, shown, logs, n_classes, class_names, seed):
    """predictions.png (labels and each method's matched clusters, in the classes' colours, with
    a legend), loss_curves.png (the first seed's runs) and confusion_<method>.png."""
    k = min(len(p) for p, _ in shown.values())
    idx = np.arange(k)
    labels = val_store.read_labels(idx)
    names = class_names or [f"class {c}" for c in range(n_classes)]
    pal = pictures.palette(n_classes)
    rows = []
    for i in idx:
        row = [pictures.colorize(labels[i], n_classes, pal)]
        for preds, clu in shown.values():
            mapped = clu["match"].cluster_to_class[preds[i]]
            row.append(pictures.colorize(mapped, n_classes, pal))
        rows.append(row)
    legend = pictures.legend(pal, names, set(range(n_classes)).union(pictures.present(labels)))
    pictures.grid_png(out / "predictions.png", rows, titles=["labels", *shown], legend=legend)
    pictures.loss_curves_png(out / "loss_curves.png", logs, title=f"training losses, seed {seed} (one line per method)")
    for method, (_, clu) in shown.items():
        name = method.replace(" ", "_").replace("/", "")
        conf, rows_named = pictures.matched_rows(clu["confusion"], clu["match"].class_to_cluster)
        pictures.confusion_png(out / f"confusion_{name}.png", conf, row_names=rows_named, col_names=names,
                               title=f"{method}, seed {seed}: % of each true class's pixels in each cluster")
