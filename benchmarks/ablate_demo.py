"""Ablations of the OMH formulation on the demo data: one line of JSON per (variant, seed).

    python -m benchmarks.ablate_demo --steps 300 --seeds 0,1,2 --variant 'name:{"lam_hier": 0}' ...

Each variant is a name and a JSON dict of Config overrides applied to the demo config; the
results (cluster and linear mIoU/acc on the synthetic val split) go to stdout and --out.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from omh_ref.jobs import demo
from omh_ref.evaluate.predict import cluster_eval
from omh_ref.evaluate.probe import linear_eval, linear_probe
from omh_ref.features.store import FeatureStore
from omh_ref.train.checkpoint import load_params
from omh_ref.train.loop import TrainOptions, train


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="runs/ablate")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lr-clusters", type=float, default=5e-3)
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--fixed-shifts", action="store_true", help="use the config's shifts, not --shifts auto")
    ap.add_argument("--variant", action="append", required=True, help="name:JSON overrides")
    a = ap.parse_args(argv)
    data = demo.prepare_data(Path(a.out) / "data", say=lambda *x: None)
    tr = FeatureStore(data["train"] / "feats.npy", labels=data["train"] / "labels.npy")
    va = FeatureStore(data["val"] / "feats.npy", labels=data["val"] / "labels.npy")
    K = int(tr.meta["n_classes"])
    for spec in a.variant:
        name, _, over = spec.partition(":")
        over = json.loads(over or "{}")
        for seed in (int(s) for s in a.seeds.split(",")):
            t0 = time.perf_counter()
            cfg = dataclasses.replace(demo.demo_config(K, in_dim=tr.C), **over)
            res = train(cfg, TrainOptions(features=str(tr.path), out=f"{a.out}/{name}-{seed}", steps=a.steps,
                                          batch_size=a.batch_size, lr=a.lr, lr_clusters=a.lr_clusters, seed=seed,
                                          shifts_auto=not a.fixed_shifts, progress=False, ckpt_every=a.steps,
                                          overwrite=True), say=lambda *x: None)
            params, cfg = load_params(res["checkpoint"])
            clu, _ = cluster_eval(params, cfg, va, K)
            rec = {"variant": name, "overrides": over, "seed": seed, "steps": a.steps, "lr": a.lr,
                   "shifts": {k: round(getattr(cfg, k), 4) for k in ("shift_neg", "shift_inter", "shift_intra")},
                   "cluster_miou": round(clu["miou"], 2), "cluster_acc": round(clu["acc"], 2)}
            if not a.no_probe:
                lin = linear_eval(params, linear_probe(params, tr, K, epochs=5, seed=seed, progress=False, cfg=cfg), va, K,
                                  cfg=cfg)
                rec.update(linear_miou=round(lin["miou"], 2), linear_acc=round(lin["acc"], 2))
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(rec), flush=True)
            with open(Path(a.out) / "ablations.jsonl", "a") as fh:
                fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    sys.exit(main())
