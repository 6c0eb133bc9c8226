"""The per-stage rates of ``omh-ref recipe`` at paper scale on this machine, for the time estimates
of a whole recipe (docs/benchmarks.md, README): seconds per unit of each stage, no peer.

- **forward**: the onnxruntime forward of a random-init DINO ViT (omh_ref/extract/export_dino.py, seeded)
  per crop, for ViT-S/8 and ViT-B/8 at the training (224) and evaluation (320) resolutions,
  batches of 4, ``--threads`` intra-op threads (the ViT is the extraction's cost: the whole
  ``omh-ref extract`` path ran at 95 % of the bare forward in bench_extract);
- **step**: one training step (``model.loss_and_grads``, float32, batch 16, 28x28 grid) for
  C = 384 / 768 and levels 108/54/27 (27 classes) and 12/6/3 (Potsdam's 3);
- **eval**: ``cluster_eval`` per validation image at 320 px (40x40 grid, labels 320x320, with
  flipped features), for C = 384 / 768;
- **probe**: the linear probe per training row and epoch (28x28 rows, labels 224x224: the codes
  and the probe's steps);
- **crf**: the dense CRF per 320x320 image with 27 classes (when pydensecrf2 is installed).

Inputs are random (seeded); only shapes matter for the time. Every case runs once per round,
rounds repeated ``--repeats`` times after one untimed round (bench_extract's ``interleaved``, with
its pause), so that load from elsewhere on the machine hits all cases alike: on a shared machine
the ratios between cases hold when the absolute times do not. Medians and bests (the least
disturbed call); one line per case and, last, one JSON line (also returned by :func:`main`).

    python -m benchmarks.bench_recipe [--threads 2] [--repeats 3] [--skip forward,step,eval,crf]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import harness as bench
from benchmarks.bench_extract import interleaved, load_export_script, ort_session
from omh_ref.core import model

PRESETS = {
    "full": {"archs": (("vit_small", 8), ("vit_base", 8)), "resolutions": (224, 320), "batch": 4, "C": (384, 768),
             "levels": ((108, 54, 27), (12, 6, 3)), "grid": 28, "eval_grid": 40, "eval_res": 320, "train_res": 224,
             "n_eval": 32, "n_probe": 64, "crf_res": 320, "steps_batch": 16},
    # seconds, for the test suite: the same code paths on toy shapes
    "tiny": {"archs": (("vit_small", 16),), "resolutions": (32,), "batch": 2, "C": (8,), "levels": ((6, 3),),
             "grid": 4, "eval_grid": 4, "eval_res": 16, "train_res": 16, "n_eval": 4, "n_probe": 4, "crf_res": 16,
             "steps_batch": 2},
}


class Case:
    """One timed call: ``fn()`` does ``units`` of ``unit`` (crops, steps, images, rows)."""

    def __init__(self, part, name, fn, units, unit, **meta):
        self.part, self.name, self.fn, self.units, self.unit, self.meta = part, name, fn, units, unit, meta


def forward_cases(s, threads, tmp):
    import torch

    ed = load_export_script()
    out = []
    for arch, patch in s["archs"]:
        torch.manual_seed(0)                # as export_dino.main: seed, then build
        vit = ed.build_vit(arch, patch)
        for res in s["resolutions"]:
            path = ed.export(vit, res, Path(tmp) / f"{arch}{patch}")
            sess, x = ort_session(path, threads), ed.random_batch(res, 0, s["batch"])
            out.append(Case("forward", f"forward {arch}/{patch} {res} px", lambda sess=sess, x=x: sess.run(
                ["features"], {"images": x}), s["batch"], "crop", arch=arch, patch=patch, resolution=res))
    return out


def step_cases(s):
    out = []
    for C in s["C"]:
        for levels in s["levels"]:
            cfg = bench.paper_config(in_dim=C, levels=levels)
            params, batch, seed = bench.make_step_inputs(cfg, s["steps_batch"], (s["grid"], s["grid"]))
            out.append(Case("step", f"step C={C} levels {'/'.join(map(str, levels))} batch {s['steps_batch']}",
                            lambda params=params, batch=batch, cfg=cfg, seed=seed: model.loss_and_grads(
                                params, batch, cfg, np.random.default_rng(seed)), 1, "step", C=C,
                            levels=list(levels), batch=s["steps_batch"]))
    return out


def _store(folder, n, grid, C, res, n_classes, seed):
    """A feature file of random rows with labels, as extraction writes them."""
    from omh_ref.features import meta as feats_meta
    from omh_ref.features.store import FeatureStore

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "feats.npy", rng.standard_normal((n, grid, grid, C)).astype(np.float16))
    np.save(folder / "labels.npy", rng.integers(0, n_classes, (n, res, res)).astype(np.uint8))
    feats_meta.write(folder / "feats.json", feats_meta.make(shape=[n, grid, grid, C], dtype="float16",
                                                            backbone="random", resolution=res, patch=res // grid,
                                                            labels="labels.npy", n_classes=n_classes))
    return FeatureStore(folder / "feats.npy", labels=folder / "labels.npy")


def eval_cases(s, tmp):
    from omh_ref.evaluate.predict import cluster_eval
    from omh_ref.evaluate.probe import linear_probe

    out = []
    for C in s["C"]:
        levels = s["levels"][0]
        cfg = bench.paper_config(in_dim=C, levels=levels)
        params = model.init_params(cfg, np.random.default_rng(0))
        K = levels[-1]
        val = _store(Path(tmp) / f"val{C}", s["n_eval"], s["eval_grid"], C, s["eval_res"], K, 1)
        flip = _store(Path(tmp) / f"flip{C}", s["n_eval"], s["eval_grid"], C, s["eval_res"], K, 2)
        tr = _store(Path(tmp) / f"train{C}", s["n_probe"], s["grid"], C, s["train_res"], K, 3)
        out.append(Case("eval", f"eval C={C}, {s['eval_res']} px with flips",
                        lambda params=params, cfg=cfg, val=val, flip=flip, K=K: cluster_eval(
                            params, cfg, val, K, flipped=flip), s["n_eval"], "val image", C=C))
        out.append(Case("probe", f"linear probe C={C}, one epoch",
                        lambda params=params, cfg=cfg, tr=tr, K=K: linear_probe(params, tr, K, epochs=1, progress=False,
                                                                                cfg=cfg),
                        s["n_probe"], "training row", C=C))
    return out


def crf_cases(s):
    from omh_ref.evaluate import crf

    if not crf.available():
        print("crf: pydensecrf2 not installed, skipped")
        return []
    rng = np.random.default_rng(0)
    r, K = s["crf_res"], s["levels"][0][-1]
    img = rng.integers(0, 256, (1, r, r, 3), dtype=np.uint8)
    logits = rng.uniform(-1, 1, (1, r, r, K)).astype(np.float32)
    return [Case("crf", f"crf {r}x{r}, {K} classes", lambda: crf.refine_batch(img, logits), 1, "image",
                 resolution=r, classes=K)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="onnxruntime threads and BLAS threads (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each case (default 3)")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: forward,step,eval,crf")
    p.add_argument("--pause", type=float, default=0.1,
                   help="untimed sleep in s before each timed call, so spinning threads go idle (default 0.1)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)   # the test suite
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        p.error("--threads and --repeats must be positive")
    s = PRESETS["tiny" if args.tiny else "full"]
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    res = {"preset": "tiny" if args.tiny else "full", "threads": args.threads, "repeats": args.repeats,
           "loadavg_start": os.getloadavg(), "versions": bench.versions()}
    t0 = time.perf_counter()
    ctx = bench.thread_limit(args.threads) if bench.have_threadpoolctl() else None
    if ctx is not None:
        ctx.__enter__()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_recipe_") as tmp:
            cases = ((forward_cases(s, args.threads, tmp) if "forward" not in skip else [])
                     + (step_cases(s) if "step" not in skip else [])
                     + (eval_cases(s, tmp) if "eval" not in skip else [])
                     + (crf_cases(s) if "crf" not in skip else []))
            times = interleaved({c.name: c.fn for c in cases}, args.repeats, 1, args.pause)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    for c in cases:
        sec, best = statistics.median(times[c.name]) / c.units, min(times[c.name]) / c.units
        res.setdefault(c.part, []).append({**c.meta, "s_per_unit": sec, "best_s_per_unit": best, "unit": c.unit,
                                           "times_s": times[c.name], "units_per_call": c.units})
        print(f"{c.name}: {sec * 1e3:.1f} ms a {c.unit} (median; best {best * 1e3:.1f} ms)", flush=True)
    res["elapsed_s"] = time.perf_counter() - t0
    res["loadavg_end"] = os.getloadavg()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
