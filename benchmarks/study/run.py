"""The method study of docs/ablations.md, from one command:

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice -n 10 \\
        python -m benchmarks.study.run --out runs/study --workers 2
    python -m benchmarks.study.report runs/study/results.jsonl     # tables and the rule's decision

For each data family (``flat``, ``tree``: benchmarks/study/data.py), each variant
(:data:`VARIANTS`: Config overrides of the demo model, levels 4K/2K/K over K classes) and each
training seed, train as the demo does (300 steps, batch 8, ``--shifts auto``) on the family's
train split and evaluate on its evaluation split (other images, other pixels of the source
pictures): the eval level's cluster mIoU and accuracy (Hungarian), every level's scores against
its label granularity and the hierarchy's consistency (omh_ref.evaluate.granular). Spherical
k-means on the raw features gives the scale ("k-means (raw)"), and spherical k-means on the STEGO
baseline's trained code ("STEGO code + k-means", scored in the baseline's job) a fair baseline
beside STEGO's own cluster probe. The variants the study rejected
(other hierarchy couplings, a plan-sparsity penalty, prediction through the plans) were retired
from the code; docs/ablations.md names the commit that runs them. One JSON record per
(family, variant, seed) in ``results.jsonl``; a rerun skips what is there (resumable), and a
job whose finished run is in ``runs/`` evaluates it again without training (after a change to the
evaluation: delete ``results.jsonl`` and run the same command).

Each job runs single-threaded (BLAS threads spinning on a shared 2-core machine made a run 10x
slower); ``--workers`` jobs run at once.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks.study import data  # noqa: E402
from omh_ref.jobs import demo  # noqa: E402
from omh_ref.core import bases  # noqa: E402
from omh_ref.core.config import Config, with_base_defaults  # noqa: E402
from omh_ref.core.files import write_text  # noqa: E402
from omh_ref.core.ops import cosine, resize  # noqa: E402
from omh_ref.evaluate import granular, metrics  # noqa: E402
from omh_ref.evaluate.hierarchy import UsageAccumulator, hierarchy_plans  # noqa: E402
from omh_ref.evaluate import kmeans  # noqa: E402
from omh_ref.evaluate.kmeans import spherical_kmeans  # noqa: E402
from omh_ref.evaluate.predict import cluster_eval  # noqa: E402
from omh_ref.features.store import FeatureStore  # noqa: E402
from omh_ref.train.checkpoint import load_params  # noqa: E402
from omh_ref.train.loop import TrainOptions, train  # noqa: E402

FAMILIES = ("flat", "tree", "demo")   # demo: the demo's synthetic data, where the defaults were tuned
N_SUPER = 3     # both families: the tree's superclasses; the flat family has none (its coarse level is free)


def VARIANTS(K):
    """name -> Config overrides of the demo model (levels 4K/2K/K). ``None``: not trained (derived
    from the default's checkpoint or no model at all)."""
    return {
        "default": {},
        "no hierarchy (λ_hier 0)": {"lam_hier": 0.0},
        "STEGO baseline": {"omh": False},
        "STEGO code + k-means": None,
        "k-means (raw)": None,
        "ε 0.05": {"eps": 0.05},
        "ε 0.5": {"eps": 0.5},
        "λ_hier 0.3": {"lam_hier": 0.3},
        "λ_hier 3": {"lam_hier": 3.0},
        "λ_W 0 (assignments only)": {"lam_w": 0.0},
        "λ_W 1": {"lam_w": 1.0},
        "uniform marginals": {"marginals": "uniform"},
        "levels 2K/K": {"levels": (2 * K, K)},
        "levels 2K/K/3, eval middle": {"levels": (2 * K, K, N_SUPER), "eval_level": 1},
        # the SmooSeg base (its own values of the fields and learning rates), with and without OMH
        "OMH on SmooSeg": {"base": "smooseg"},
        "SmooSeg baseline": {"base": "smooseg", "omh": False},
        "SmooSeg code + k-means": None,
        # the HP base (its own values and learning rates, AdamW decay and clipping), with and without OMH
        "OMH on HP": {"base": "hp", **demo.HP_SHORT},
        "HP baseline": {"base": "hp", "omh": False, **demo.HP_SHORT},
        "HP code + k-means": None,
    }


# A derived variant is scored inside the job of the variant it derives from (the same trained run):
# the STEGO baseline's code clustered by spherical k-means, as the demo does (omh_ref.jobs.demo).
DERIVED = {derived: source for source, derived in demo.KMEANS_OF.items()}


def trained_variants(want=None):
    """The variants a job is run for (a derived one asks for its source), in the table's order."""
    wanted = None if want is None else {DERIVED.get(n, n) for n in want}
    return [n for n in VARIANTS(9) if n not in DERIVED and (wanted is None or n in wanted)]


def missing(family, variant, seed, have) -> bool:
    """Whether the job (family, variant, seed) has a record to add: its own or a derived one's."""
    scored = [variant] + [d for d, src in DERIVED.items() if src == variant]
    return any((family, n, seed) not in have for n in scored)


def demo_levels(K):
    return (4 * K, 2 * K, K)


def _level_report(params, cfg, store, batch_size=16):
    """cluster_eval with every level's scores and the consistency (plans with the trained
    marginals) -> (headline result, level report)."""
    notes = []
    grans = granular.load_granularities(store, notes=notes)
    scorer = granular.LevelScorer(cfg, store, grans, notes=notes)
    usage = UsageAccumulator(cfg) if cfg.marginals == "usage" and len(cfg.levels) > 1 else None
    clu, _ = cluster_eval(params, cfg, store, int(store.meta["n_classes"]), batch_size, usage=usage, levels=scorer)
    plans = hierarchy_plans(params, cfg, usage.means() if usage is not None else None) if len(cfg.levels) > 1 else None
    return clu, scorer.result(plans)


def _summary(clu, lv):
    levels = [{"level": e["level"], "clusters": e["clusters"], "granularity": e["granularity"],
               "miou": None if e["scores"] is None else e["scores"]["miou"],
               "acc": None if e["scores"] is None else e["scores"]["acc"],
               "many_to_one_miou": None if e["scores"] is None else e["scores"]["many_to_one"]["miou"]}
              for e in lv["levels"]]
    cons = [{k: v for k, v in c.items() if k != "consistent"} for c in lv["consistency"]]
    return {"miou": clu["miou"], "acc": clu["acc"], "strict_miou": clu["strict"]["miou"], "levels": levels,
            "consistency": cons}


def run_kmeans(train_store, val_store, K, seed, n_fit=30000):
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(7,)))
    x = train_store.read(np.arange(train_store.N)).reshape(-1, train_store.C)
    x = x[rng.choice(len(x), size=min(n_fit, len(x)), replace=False)].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    C = spherical_kmeans(x, K, rng)
    acc = metrics.ConfusionAccumulator(K, K)
    size = val_store.labels.shape[1:]
    for s, f in val_store.batches(32):
        logits = resize.forward(cosine.forward(f.astype(np.float64), C)[0], size)[0]
        acc.update(logits.argmax(axis=-1), val_store.read_labels(np.arange(s, s + len(f))))
    res = metrics.scores(acc.matrix)
    return {"miou": res["miou"], "acc": res["acc"], "strict_miou": res["strict"]["miou"], "levels": [],
            "consistency": []}


def run_job(job):
    """One (family, variant, seed): train and evaluate -> a list of records."""
    t0 = time.perf_counter()
    fam, variant, seed, steps, paths, out = (job[k] for k in ("family", "variant", "seed", "steps", "paths", "out"))
    tr = FeatureStore(Path(paths["train"]) / "feats.npy", labels=Path(paths["train"]) / "labels.npy")
    va = FeatureStore(Path(paths["val"]) / "feats.npy", labels=Path(paths["val"]) / "labels.npy")
    K = int(tr.meta["n_classes"])
    base = {"family": fam, "variant": variant, "seed": seed, "steps": steps}
    if variant == "k-means (raw)":
        return [dict(base, overrides=None, **run_kmeans(tr, va, K, seed), seconds=round(time.perf_counter() - t0, 1))]
    over = VARIANTS(K)[variant]
    cfg = Config(**with_base_defaults(dict(dict(levels=demo_levels(K), in_dim=tr.C), **over)))
    rates = {k: v for k, v in bases.get(cfg.base).LOOP_DEFAULTS.items() if k in ("lr", "lr_clusters")}
    run_dir = Path(out) / "runs" / fam / f"{_slug(variant)}-seed{seed}"
    if _trained(run_dir, cfg, steps, seed):    # the same run is there: evaluated again, not retrained
        res = {"checkpoint": str(run_dir / "ckpt.npz"), "log": str(run_dir / "log.jsonl")}
    else:
        res = train(cfg, TrainOptions(features=str(tr.path), out=str(run_dir), steps=steps, batch_size=8, seed=seed,
                                      shifts_auto=True, progress=False, ckpt_every=steps, overwrite=True, **rates),
                    say=lambda *a: None)
    params, cfg = load_params(res["checkpoint"])
    last = [json.loads(ln) for ln in Path(res["log"]).read_text().splitlines() if ln.strip()][-1]
    diag = {k: round(v, 4) for k, v in last.items() if k.startswith("plan_sparsity")}
    clu, lv = _level_report(params, cfg, va)
    recs = [dict(base, overrides={k: list(v) if isinstance(v, tuple) else v for k, v in over.items()},
                 **_summary(clu, lv), train_diag=diag, seconds=round(time.perf_counter() - t0, 1))]
    if variant in demo.KMEANS_OF:   # the same code, clustered by k-means instead of its own probe
        t1 = time.perf_counter()
        fitted = kmeans.with_centres(params, cfg, kmeans.fit_codes(params, tr, cfg.eval_k, seed, restarts=5, cfg=cfg))
        recs.append(dict(base, variant=demo.KMEANS_OF[variant], overrides=None, **_summary(*_level_report(fitted, cfg, va)),
                         seconds=round(time.perf_counter() - t1, 1)))
    return recs


def _trained(run_dir, cfg, steps, seed) -> bool:
    """Whether ``run_dir`` holds this job's finished run (its checkpoint at ``steps`` with this
    seed and this config, the shifts aside: ``--shifts auto`` measured them), so a study re-run
    after an evaluation change re-evaluates the runs instead of training them again (training is
    deterministic: the same run would come out)."""
    from omh_ref.train import checkpoint

    path = Path(run_dir) / "ckpt.npz"
    if not path.is_file() or not (Path(run_dir) / "log.jsonl").is_file():
        return False
    try:
        ck = checkpoint.load(path)
    except Exception:
        return False
    same = {f.name for f in dataclasses.fields(cfg) if not f.name.startswith("shift_")}
    return (ck["step"] == steps and ck["info"].get("options", {}).get("seed") == seed
            and all(getattr(ck["config"], k) == getattr(cfg, k) for k in same))


def _slug(name):
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name.encode("ascii", "replace").decode())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    ap.add_argument("--n-train", type=int, default=600)
    ap.add_argument("--n-val", type=int, default=200)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = []
    if results.is_file():
        done = [json.loads(ln) for ln in results.read_text().splitlines() if ln.strip()]
    have = {(r["family"], r["variant"], r["seed"]) for r in done}
    t0 = time.perf_counter()
    jobs = []
    seeds = [int(s) for s in a.seeds.split(",")]
    for fam in a.families.split(","):
        if fam == "demo":
            paths = demo.prepare_data(out / "data" / fam, a.n_train, a.n_val, hp=True)
        else:
            paths = data.write_family(fam, str(out / "data" / fam), a.n_train, a.n_val)
        names = trained_variants(a.variants.split(",") if a.variants else None)
        for seed in seeds:                       # seed-major: every variant has some seeds early
            for v in names:
                if missing(fam, v, seed, have):
                    jobs.append({"family": fam, "variant": v, "seed": seed, "steps": a.steps,
                                 "paths": {k: str(p) for k, p in paths.items()}, "out": str(out)})
    print(f"study: {len(jobs)} jobs to run ({len(done)} records already in {results})", flush=True)
    with ProcessPoolExecutor(max_workers=a.workers) as pool:
        futs = {pool.submit(run_job, j): j for j in jobs}
        for f in as_completed(futs):
            j = futs[f]
            try:
                recs = f.result()
            except Exception as e:   # one failed job is recorded and said, the study goes on
                recs = [{"family": j["family"], "variant": j["variant"], "seed": j["seed"], "error": repr(e)}]
            new = {(r["family"], r["variant"], r["seed"]) for r in recs}
            done = [r for r in done if (r["family"], r["variant"], r["seed"]) not in new] + recs
            write_text(results, "".join(json.dumps(r) + "\n" for r in done))
            for r in recs:
                print(json.dumps({k: r.get(k) for k in ("family", "variant", "seed", "miou", "seconds", "error")
                                  if k in r}), flush=True)
    meta = {"command": " ".join(sys.argv), "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "numpy": np.__version__, "finished": time.strftime("%Y-%m-%d %H:%M"),
            "wall_seconds_this_invocation": round(time.perf_counter() - t0, 1), "workers": a.workers}
    write_text(out / "study_meta.json", json.dumps(meta, indent=1))
    print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    sys.exit(main())
