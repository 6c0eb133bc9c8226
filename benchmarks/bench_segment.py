"""``omh-ref segment`` on CPU against the bare backbone forward on the same images, images/s.

One randomly initialised DINO-layout ViT (omh_ref/extract/export_dino.py's ``build_vit``, seeded with
``torch.manual_seed``; nothing is downloaded) is exported to ONNX in a temporary folder, with a
seeded random checkpoint of the paper's shape (D = 70, levels 108/54/27). N random 640x480 JPEG
files (:func:`benchmarks.bench_extract.write_jpegs`) are segmented by the whole command path
(:func:`omh_ref.jobs.segment.run`: decode, resize, windows, forward, head, blend, upsample
to 640x480, argmax, PNG written atomically, ``segment.json``), each repeat into a fresh folder.

Two timings of segment: ``segment``, the job given a Segmenter built once outside the timer (the
steady state of a long run: what each image costs), and ``command``, the whole command with its
start-up (checkpoint load, model hash, and the backbone probe, which runs a batch of two
windows; it is amortised over the run, so with few images it weighs).

Peers, on the same onnxruntime session (same threads):

* ``bare``: ``session.run`` alone over exactly the windows segment feeds the backbone, in the
  same batches, already decoded, cropped and normalised outside the timer. segment / bare is
  what everything around the forward costs. Goal: >= 0.8 (steady state).
* ``crop``: ``session.run`` over one STEGO centre crop per image (what ``omh-ref extract``
  computes), for context: a 4:3 image needs two 224 px windows to be covered whole, so segment
  cannot reach this one's images/s.

Agreement first: one untimed segment of the first batch of images records the arrays it passes
to the backbone; they must equal the bare peer's prepared batches bit for bit (same windows, same
batches), and the masks must have the images' size; otherwise the run stops (SystemExit). Then
the peers run interleaved, repeat by repeat, each timed call after an untimed ``--pause`` (spinning
onnxruntime threads go idle first, as in bench_extract). Ratios are of medians; ``best`` is the
ratio of each peer's fastest repeat, the one least disturbed by other work on a shared machine.
``forward_share``: the part of each timed segment run spent inside the backbone forward (timed
around the same call), the ratio segment / bare would be if the two forwards ran at one speed; on
a busy machine it is the steadier number, since it needs no two runs to meet the same load.
Prints one human line and a JSON line.

    python -m benchmarks.bench_segment [--arch vit_small] [--patch 8] [--resolution 224] \
        [--images 8] [--batch 8] [--threads N] [--repeats 3] [--levels eval|all] [--quick]

``--quick`` (smoke test, seconds): ViT-S/16 at 64 px, 4 images of 160x120, batch 4, 2 repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

import numpy as np

from benchmarks import harness as bench
from benchmarks.bench_extract import interleaved, load_export_script, write_jpegs

PRESETS = {
    "full": {"arch": "vit_small", "patch": 8, "resolution": 224, "images": 8, "batch": 8, "repeats": 3,
             "size": (640, 480)},
    "quick": {"arch": "vit_small", "patch": 16, "resolution": 64, "images": 4, "batch": 4, "repeats": 2,
              "size": (160, 120)},
}
GOAL = 0.8


def random_checkpoint(path, C, seed):
    from omh_ref.core import model
    from omh_ref.train import checkpoint

    cfg = model.Config(in_dim=C, dim=70, levels=(108, 54, 27))
    params = model.init_params(cfg, np.random.default_rng(seed))
    checkpoint.save(path, params, {"m": {}, "v": {}, "t": 0}, 0, np.random.default_rng(seed), cfg)
    return path


def window_batches(seg, paths):
    """The normalised window batches segment feeds the backbone for these images (its own layout,
    canvas and batching), computed outside any timer."""
    from omh_ref.jobs import segmenter as sg
    from omh_ref.extract.backbone import normalize

    batches = []
    for s in range(0, len(paths), seg.batch_size):
        rgbs = [sg.as_rgb(p) for p in paths[s:s + seg.batch_size]]
        lays = [seg.layout(r.shape[:2]) for r in rgbs]
        by_shape = {}
        for rgb, lay in zip(rgbs, lays):
            canvas, side = sg.canvas_image(rgb, lay), (lay.window or 0) * lay.patch
            for r, c in lay.windows:
                crop = canvas if lay.window is None else canvas[r * lay.patch:r * lay.patch + side,
                                                                c * lay.patch:c * lay.patch + side]
                by_shape.setdefault(crop.shape, []).append(crop)
        for crops in by_shape.values():
            batches += [normalize(np.stack(crops[b:b + seg.batch_size])) for b in range(0, len(crops), seg.batch_size)]
    return batches


def check_agreement(seg, paths, want_batches):
    """Segment the first batch of images untimed, recording the backbone's inputs: SystemExit
    unless they are the bare peer's first batches bit for bit and the masks have the images' size."""
    from omh_ref.jobs import segmenter as sg

    seen = []
    real = sg.run

    def recording(sess, bb, x):
        seen.append(np.array(x, copy=True))
        return real(sess, bb, x)

    first = paths[:seg.batch_size]
    with mock.patch.object(sg, "run", recording):
        masks = seg.segment_batch(first)
    want = want_batches[:len(seen)]
    if len(seen) == 0 or any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(seen, want)):
        raise SystemExit("refusing to time: segment's backbone inputs differ from the bare peer's batches")
    for p, m in zip(first, masks):
        if m.clusters.shape != sg.as_rgb(p).shape[:2]:
            raise SystemExit(f"refusing to time: a mask of shape {m.clusters.shape} for {p}")
    return {"batches_checked": len(seen), "windows_checked": int(sum(len(a) for a in seen))}


def _summary(ts, n):
    med = statistics.median(ts)
    return {"median_s": med, "min_s": min(ts), "images_per_s": n / med, "times_s": ts}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("vit_small", "vit_base"), default=None)
    p.add_argument("--patch", type=int, choices=(8, 16), default=None)
    p.add_argument("--resolution", type=int, default=None, help="the model's input side in px (default 224)")
    p.add_argument("--images", type=int, default=None, help="JPEGs segmented per repeat (default 8)")
    p.add_argument("--batch", type=int, default=None, help="windows per forward (segment --batch-size; default 8)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own, all cores)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each peer (default 3)")
    p.add_argument("--levels", choices=("eval", "all"), default="eval", help="segment --levels (default eval)")
    p.add_argument("--pause", type=float, default=0.1, help="untimed sleep in s before each timed run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="ViT-S/16, 64 px, 4 images of 160x120 (smoke test)")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    s = {k: (getattr(args, k, None) if getattr(args, k, None) is not None else v) for k, v in preset.items()}
    if s["images"] < 1 or s["batch"] < 1 or s["repeats"] < 1:
        p.error("--images, --batch and --repeats must be positive")
    if s["resolution"] % s["patch"]:
        p.error(f"--resolution {s['resolution']} is not a multiple of patch {s['patch']}")

    import onnxruntime
    import torch

    from omh_ref.jobs import segmenter as sg
    from omh_ref.jobs.segment import SegmentOptions, run as run_segment
    from omh_ref.extract.backbone import normalize, session
    from omh_ref.extract.images import stego_crop

    ed = load_export_script()
    torch.manual_seed(args.seed)
    vit = ed.build_vit(s["arch"], s["patch"])
    res = {"arch": s["arch"], "patch": s["patch"], "resolution": s["resolution"], "images": s["images"],
           "image_size": list(s["size"]), "batch": s["batch"], "threads": args.threads, "repeats": s["repeats"],
           "levels": args.levels, "seed": args.seed, "preset": "quick" if args.quick else "full",
           "pause_s": args.pause, "loadavg_start": os.getloadavg()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_segment_") as tmp:
        tmp = Path(tmp)
        model = ed.export(vit, s["resolution"], tmp)
        ckpt = random_checkpoint(tmp / "ckpt.npz", vit.dim, args.seed)
        write_jpegs(tmp / "images", s["images"], args.seed)
        if tuple(s["size"]) != (640, 480):
            from PIL import Image

            for f in sorted((tmp / "images").iterdir()):
                Image.open(f).resize(s["size"]).save(f, quality=90)
        paths = sorted((tmp / "images").iterdir())
        seg = sg.Segmenter(model, ckpt, levels=args.levels, batch_size=s["batch"], threads=args.threads)
        sess = session(model, "cpu", args.threads)
        batches = window_batches(seg, paths)
        crops = [normalize(np.stack([np.asarray(stego_crop(sg.Image.open(q).convert("RGB"), s["resolution"]))
                                     for q in paths[b:b + s["batch"]]])) for b in range(0, len(paths), s["batch"])]
        res["windows_per_image"] = sum(len(b) for b in batches) / len(paths)
        res["agreement"] = check_agreement(seg, paths, batches)
        name = sess.get_inputs()[0].name
        count = iter(range(10**6))

        def options():
            return SegmentOptions(model=str(model), checkpoint=str(ckpt), images=[str(tmp / "images")],
                                  out=str(tmp / f"out{next(count)}"), levels=args.levels, batch_size=s["batch"],
                                  threads=args.threads, progress=False)

        inside = []   # seconds spent in the backbone forward during each timed segment run

        def run_seg():
            spent = [0.0]
            real = sg.run

            def timed(sess_, bb, x):
                t = time.perf_counter()
                try:
                    return real(sess_, bb, x)
                finally:
                    spent[0] += time.perf_counter() - t

            with mock.patch.object(sg, "run", timed):
                run_segment(options(), log=lambda *_: None, segmenter=seg)
            inside.append(spent[0])

        def run_command():
            run_segment(options(), log=lambda *_: None)

        def run_bare():
            for x in batches:
                sess.run(None, {name: x})

        def run_crop():
            for x in crops:
                sess.run(None, {name: x})

        times = interleaved({"segment": run_seg, "command": run_command, "bare": run_bare, "crop": run_crop},
                            s["repeats"], 1, args.pause)
    n = len(paths)
    for k in ("segment", "command", "bare", "crop"):
        res[k] = _summary(times[k], n)
    res["segment"]["forward_s"] = inside[-len(times["segment"]):]   # the timed runs' (not the warm-up's)
    res["forward_share"] = statistics.median(f / t for f, t in zip(res["segment"]["forward_s"], times["segment"]))
    res["segment_vs_bare"] = res["segment"]["images_per_s"] / res["bare"]["images_per_s"]
    res["segment_vs_bare_best"] = res["bare"]["min_s"] / res["segment"]["min_s"]
    res["command_vs_bare"] = res["command"]["images_per_s"] / res["bare"]["images_per_s"]
    res["segment_vs_crop"] = res["segment"]["images_per_s"] / res["crop"]["images_per_s"]
    res["goal"] = GOAL
    res["elapsed_s"] = time.perf_counter() - t0
    res["loadavg_end"] = os.getloadavg()
    res["versions"] = {**bench.versions(), "onnxruntime": onnxruntime.__version__}
    w, h = s["size"]
    print(f"{s['arch']}/{s['patch']} {s['resolution']} px, {n} JPEGs {w}x{h}, {res['windows_per_image']:.1f} "
          f"windows/image, batch {s['batch']}: segment {res['segment']['images_per_s']:.2f} img/s, bare forward "
          f"of the same windows {res['bare']['images_per_s']:.2f} img/s -> segment / bare = "
          f"{res['segment_vs_bare']:.2f} (best of each: {res['segment_vs_bare_best']:.2f}; goal >= {GOAL}, "
          f"{'met' if res['segment_vs_bare'] >= GOAL else 'NOT met'}); the forward is "
          f"{100 * res['forward_share']:.0f}% of segment's own time; "
          f"the command with its start-up {res['command']['images_per_s']:.2f} img/s ({res['command_vs_bare']:.2f}); "
          f"one centre crop per image {res['crop']['images_per_s']:.2f} img/s (segment / crop = "
          f"{res['segment_vs_crop']:.2f}); median of {s['repeats']}")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
