"""Feature extraction on CPU: onnxruntime against the torch forward of the same DINO ViT, images/s.

One randomly initialised DINO-layout ViT (omh_ref/extract/export_dino.py's ``build_vit``, seeded with
``torch.manual_seed``; nothing is downloaded) is exported to ONNX in a temporary folder with
``export_dino.export`` (fixed resolution, dynamic batch). For each thread count an onnxruntime
session (CPUExecutionProvider, ``intra_op_num_threads = t``, ``inter_op_num_threads = 1``) and
torch (``torch.set_num_threads(t)``, eval model under ``torch.inference_mode``) run the same fixed
normalised batch (``export_dino.random_batch``). Before anything is timed their outputs are checked
to agree (same shape, max abs difference <= 1e-4); otherwise the run stops (SystemExit). Then
both are warmed up and timed with ``time.perf_counter``, ORT and torch alternating run by run so
load elsewhere on the machine hits both alike. Reported per case: median seconds per batch,
images/s of each, and ratio = ORT images/s / torch images/s (> 1: onnxruntime faster).
Prints one line per case and, last, one JSON line (also returned by :func:`main`).

Each timed run is preceded by an untimed ``--pause`` (default 0.1 s). With more than one thread,
both runtimes' idle workers spin-wait after a run (onnxruntime's intra-op pool by default, torch's
OpenMP pool), and back-to-back alternation made each one run beside the other's spinning threads:
on a 2-vCPU VM, ViT-S/16 at 64 px, 2 threads, torch took 43-55 ms interleaved against 20 ms alone
and ORT 16-22 ms against 10 ms. After a 0.1 s pause both were back at their stand-alone times.
Turning ORT's spinning off (``--no-ort-spinning``) instead left ORT slower (about 18 ms after
any pause), so ORT keeps its default.

    python -m benchmarks.bench_extract [--arch vit_small] [--patch 8] [--resolution 224] \
        [--batch 8] [--threads 1,2] [--repeats 5] [--warmup 1] [--pause 0.1] [--quick] [--families]

``--arch`` takes what ``omh-ref export --arch`` takes by name (``vit_small``, ``dinov2_vits14``,
``dinov3_vits16``, ...: omh_ref/extract/archs.py). ``--families`` runs one row per architecture
family at the same size: DINO ViT-S (``--patch``), DINOv2 ViT-S/14 and DINOv3 ViT-S/16, each at
the multiple of its patch nearest ``--resolution`` (224 px is one for all three), each random,
exported and checked the same way; the JSON's ``rows`` holds them (its top-level ``arch`` ...
``cases`` are the first row's).

With ``--pipeline N`` (default 32, 0 to skip), the whole ``omh-ref extract`` path is timed too:
N random 640x480 JPEG files are decoded, cropped (STEGO's resize + centre crop), normalised, run
through the same ONNX file with the same thread count and batch, and written to a float16
``feats.npy`` (pwrite + fsync per chunk). ``pipeline.images_per_s`` against the bare ORT forward's
images/s says what the file handling costs.

``--quick`` (smoke test, a few seconds): ViT-S/16 at 64 px, batch 4, 2 repeats; explicit options
still win over it.
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

TOL = 1e-4  # max abs difference ORT vs torch required before timing
PRESETS = {
    "full": {"arch": "vit_small", "patch": 8, "resolution": 224, "batch": 8, "repeats": 5, "warmup": 1},
    "quick": {"arch": "vit_small", "patch": 16, "resolution": 64, "batch": 4, "repeats": 2, "warmup": 1},
}


def load_export_script():
    """omh_ref.extract.export_dino (it needs torch)."""
    from omh_ref.extract import export_dino

    return export_dino


def check_agreement(got, want, tol=TOL) -> float:
    """max |got - want| (float64); SystemExit unless the shapes match and it is <= tol (NaN fails)."""
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise SystemExit(f"refusing to time: onnxruntime output shape {got.shape} != torch {want.shape}")
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0.0))
    if not diff <= tol:  # written so that NaN refuses too
        raise SystemExit(f"refusing to time: onnxruntime and torch differ by {diff:.3e} > {tol:.0e} (max abs)")
    return diff


def ort_session(path, threads: int, spinning: bool = True):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _summary(ts, batch):
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "images_per_s": batch / med, "times_s": ts}


def interleaved(fns, repeats, warmup, pause=0.0):
    """{name: [seconds]}: each fn run ``warmup`` times untimed, then ``repeats`` rounds of one timed
    call of each, in turn; ``pause`` seconds of sleep (untimed) before every timed call let the
    other runtime's spinning worker threads go idle first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if pause > 0:
                time.sleep(pause)
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def run_case(model, onnx_path, x, threads, repeats, warmup, pause=0.1, spinning=True, tol=TOL) -> dict:
    """One thread count: check agreement, then time ORT and torch alternately. -> case dict."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        sess = ort_session(onnx_path, threads, spinning)
        tx = torch.from_numpy(x)

        def run_ort():
            return sess.run(["features"], {"images": x})[0]

        def run_torch():
            with torch.inference_mode():
                return model(tx)

        max_abs_diff = check_agreement(run_ort(), run_torch().numpy(), tol)
        times = interleaved({"ort": run_ort, "torch": run_torch}, repeats, max(int(warmup), 1), pause)
    finally:
        torch.set_num_threads(old)
    out = {"threads": int(threads), "max_abs_diff": max_abs_diff,
           "ort": _summary(times["ort"], len(x)), "torch": _summary(times["torch"], len(x))}
    out["ratio"] = out["ort"]["images_per_s"] / out["torch"]["images_per_s"]
    return out


def pipeline_case(onnx_path, image_dir, n_images, threads, batch, out_dir, resolution=None) -> dict:
    """Time ``omh_ref.extract.job.extract`` over ``n_images`` JPEGs (one untimed warm-up image first)."""
    from omh_ref.extract import datasets
    from omh_ref.extract.job import ExtractOptions, extract

    ds = datasets.folder(image_dir)
    opts = dict(model=str(onnx_path), batch_size=batch, chunk_size=batch * 4, threads=threads,
                progress=False, overwrite=True, **({"resolution": resolution} if resolution else {}))
    warm = datasets.Dataset("folder", ds.root, None, ds.items[:1])
    extract(warm, ExtractOptions(out=str(Path(out_dir) / "warm"), **opts), log=lambda *_: None)
    t0 = time.perf_counter()
    extract(ds, ExtractOptions(out=str(Path(out_dir) / f"t{threads}"), **opts), log=lambda *_: None)
    dt = time.perf_counter() - t0
    return {"images": n_images, "seconds": dt, "images_per_s": n_images / dt}


def write_jpegs(folder, n, seed):
    from PIL import Image

    rng = np.random.default_rng(seed)
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # smooth-ish content so JPEG decoding costs what a photo's does, not what noise's does
        small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(Path(folder) / f"{i:04d}.jpg", quality=90)


FAMILY_ROWS = ("vit_small", "dinov2_vits14", "dinov3_vits16")   # --families: DINO at --patch, then these


def main(argv=None):
    from omh_ref.extract import archs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=[a for a in archs.arch_choices() if a not in archs.FAMILIES], default=None,
                   metavar="ARCH", help="vit_small | vit_base (DINO) or a torch.hub name (dinov2_vits14, dinov3_vits16, "
                                        "...); default vit_small")
    p.add_argument("--patch", type=int, choices=(8, 16), default=None, help="DINO's: default 8 (--quick 16)")
    p.add_argument("--families", action="store_true",
                   help="one row per family: DINO ViT-S (--patch), DINOv2 ViT-S/14, DINOv3 ViT-S/16")
    p.add_argument("--resolution", type=int, default=None, help="input side in px (default 224, --quick 64)")
    p.add_argument("--batch", type=int, default=None, help="images per run (default 8, --quick 4)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs of each first (default 1, at least 1)")
    p.add_argument("--pause", type=float, default=0.1,
                   help="untimed sleep in s before each timed run, so spinning threads go idle (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="model init and input batch seed (default 0)")
    p.add_argument("--no-ort-spinning", action="store_true",
                   help="disable onnxruntime's intra-op thread spinning (session.intra_op.allow_spinning=0)")
    p.add_argument("--pipeline", type=int, default=None,
                   help="also time omh-ref extract over this many 640x480 JPEGs (default 32, --quick 4; 0: skip)")
    p.add_argument("--quick", action="store_true", help="ViT-S/16, 64 px, batch 4, 2 repeats (smoke test)")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    s = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in preset.items()}
    threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
    if not threads or min(threads) < 1:
        p.error("--threads needs positive thread counts")
    if s["batch"] < 1 or s["repeats"] < 1:
        p.error("--batch and --repeats must be positive")
    if args.pause < 0:
        p.error("--pause must be >= 0")
    names = [s["arch"], *FAMILY_ROWS[1:]] if args.families else [s["arch"]]
    try:
        specs = [archs.complete(archs.parse_arch(a, s["patch"] if a in archs.LEGACY else None)) for a in names]
    except ValueError as e:
        p.error(str(e))
    rows = []
    for spec in specs:
        r = s["resolution"] if not args.families else max(1, round(s["resolution"] / spec.patch)) * spec.patch
        if r <= 0 or r % spec.patch:
            p.error(f"--resolution {r} is not a positive multiple of patch {spec.patch}")
        rows.append((spec, r))

    import onnxruntime

    versions = {**bench.versions(), "onnxruntime": onnxruntime.__version__}
    res = {"batch": s["batch"], "repeats": s["repeats"], "warmup": max(s["warmup"], 1), "seed": args.seed,
           "tolerance": TOL, "preset": "quick" if args.quick else "full", "ort_spinning": not args.no_ort_spinning,
           "pause_s": args.pause, "loadavg_start": os.getloadavg(), "rows": []}
    t0 = time.perf_counter()
    n_pipe = args.pipeline if args.pipeline is not None else (4 if args.quick else 32)
    for spec, r in rows:
        res["rows"].append(run_arch(spec, r, s, threads, args, n_pipe))
    res.update({k: res["rows"][0][k] for k in ("arch", "family", "patch", "resolution", "onnx_bytes", "cases")})
    res["elapsed_s"] = time.perf_counter() - t0
    res["loadavg_end"] = os.getloadavg()
    res["versions"] = versions
    print(json.dumps(res))
    return res


def run_arch(spec, resolution, s, threads, args, n_pipe) -> dict:
    """One architecture: build it random (seeded as omh-ref export does), export, then each thread
    count's case. -> the row dict."""
    import torch

    from omh_ref.extract import archs

    ed = load_export_script()
    torch.manual_seed(args.seed)  # as export_dino.main: seed, then build
    model = ed.build(spec)
    x = ed.random_batch(resolution, args.seed, s["batch"])
    label = archs.describe(spec)
    row = {"arch": spec.size, "family": spec.family, "name": archs.stem(spec), "patch": spec.patch,
           "registers": spec.registers, "resolution": resolution, "cases": []}
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        path = ed.export(model, resolution, tmp)
        row["onnx_bytes"] = path.stat().st_size
        if n_pipe:
            write_jpegs(Path(tmp) / "images", n_pipe, args.seed)
        for t in threads:
            c = run_case(model, path, x, t, s["repeats"], s["warmup"], args.pause, not args.no_ort_spinning)
            if n_pipe:
                c["pipeline"] = pipeline_case(path, Path(tmp) / "images", n_pipe, t, s["batch"], Path(tmp) / "out",
                                              resolution)
                c["pipeline"]["vs_ort_forward"] = c["pipeline"]["images_per_s"] / c["ort"]["images_per_s"]
            row["cases"].append(c)
            print(f"{label} {resolution} px, batch {s['batch']}, {t} thread(s): "
                  f"ORT {1e3 * c['ort']['median_s']:.1f} ms ({c['ort']['images_per_s']:.1f} img/s), "
                  f"torch {1e3 * c['torch']['median_s']:.1f} ms ({c['torch']['images_per_s']:.1f} img/s), "
                  f"ORT/torch images/s = {c['ratio']:.2f}   (max |diff| {c['max_abs_diff']:.1e}, "
                  f"median of {s['repeats']})"
                  + (f"; omh-ref extract on JPEGs {c['pipeline']['images_per_s']:.1f} img/s "
                     f"({100 * c['pipeline']['vs_ort_forward']:.0f}% of the bare forward)" if n_pipe else ""))
    return row


if __name__ == "__main__":
    main()
