"""Regenerate docs/segment_example.png, the README's picture of ``omh-ref segment``.

Nothing is downloaded and no real weights are used: a **randomly initialised** ViT-S/16 is
exported at 128 px by omh-ref export (seeded), 96 synthetic 'landscapes' (sky, hills,
a sun, houses, noise; seeded) go through ``omh-ref extract``, a checkpoint with levels 12/6/3 is
trained on those features for 200 steps (``omh-ref train``), and ``omh-ref segment --levels all
--overlay`` segments one more landscape of 240x160 px. The picture shows that image and the
overlays of the three levels side by side, quantised to 64 colours to keep the file small. It
shows what segment writes, not how well OMH
segments: the backbone never saw an image.

    python docs/segment_example.py [--out docs/segment_example.png]     (about a minute on 2 cores)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]


def landscape(rng, W, H):
    """A synthetic scene: a sky gradient, two hills, a sun, a few houses, pixel noise."""
    y = np.linspace(0, 1, H)[:, None, None]
    sky = (np.array([70, 130, 220]) * (1 - y) + np.array([190, 215, 245]) * y)
    img = Image.fromarray(np.broadcast_to(sky, (H, W, 3)).astype(np.uint8))
    d = ImageDraw.Draw(img)
    r = int(rng.integers(H // 12, H // 6))
    cx, cy = int(rng.integers(r, W - r)), int(rng.integers(r, H // 3))
    d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 210, 60))
    for k, col in enumerate(((70, 140, 60), (40, 100, 40))):
        base = H * (0.55 + 0.15 * k)
        xs = np.arange(W + 1)
        ys = base + H * 0.08 * np.sin(xs / W * np.pi * rng.uniform(1, 3) + rng.uniform(0, 6))
        d.polygon([(0, H)] + list(zip(xs.tolist(), ys.tolist())) + [(W, H)], fill=col)
    for _ in range(int(rng.integers(1, 4))):
        w, h = int(rng.integers(W // 10, W // 5)), int(rng.integers(H // 8, H // 4))
        x0, y0 = int(rng.integers(0, W - w)), int(rng.integers(int(H * 0.6), H - h))
        d.rectangle((x0, y0, x0 + w, y0 + h), fill=(200, 90, 70))
        d.polygon([(x0 - 3, y0), (x0 + w + 3, y0), (x0 + w // 2, y0 - h // 2)], fill=(120, 50, 40))
    arr = np.asarray(img).astype(np.int16) + rng.integers(-5, 6, (H, W, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "segment_example.png"))
    args = ap.parse_args(argv)
    import torch
    from click.testing import CliRunner

    from omh_ref_cli.main import main as cli

    from omh_ref.extract import export_dino as ed

    def run(*a):
        res = CliRunner().invoke(cli, [str(x) for x in a])
        if res.exit_code != 0:
            sys.exit(f"{a[0]} failed: {res.output}")

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        model = ed.export(ed.build_vit("vit_small", 16), 128, tmp)
        (tmp / "train").mkdir()
        for i in range(96):
            landscape(rng, int(rng.integers(160, 260)), int(rng.integers(130, 200))).save(tmp / "train" / f"{i:03d}.png")
        (tmp / "show").mkdir()
        landscape(np.random.default_rng(1234), 240, 160).save(tmp / "show" / "landscape.png")
        run("extract", "--model", model, "--images", tmp / "train", "--out", tmp / "feats", "--quiet")
        run("train", "--features", tmp / "feats" / "feats.npy", "--out", tmp / "run", "--steps", 200,
            "--levels", "12,6,3", "--quiet")
        run("segment", "--model", model, "--checkpoint", tmp / "run" / "ckpt.npz", "--images", tmp / "show",
            "--out", tmp / "masks", "--levels", "all", "--overlay", "--quiet")
        tiles = [Image.open(tmp / "show" / "landscape.png").convert("RGB")]
        tiles += [Image.open(tmp / "masks" / f"landscape.L{lvl}.overlay.png").convert("RGB") for lvl in range(3)]
    titles = ["image (240x160)", "level 0: 12 clusters", "level 1: 6", "level 2: 3 (eval level)"]
    pad, top = 4, 14
    W, H = tiles[0].size
    canvas = Image.new("RGB", (len(tiles) * (W + pad) + pad, H + top + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (tile, title) in enumerate(zip(tiles, titles)):
        canvas.paste(tile, (pad + i * (W + pad), top))
        draw.text((pad + i * (W + pad), 1), title, fill=(0, 0, 0))
    from omh_ref.core.files import atomic_write

    small = canvas.quantize(64, dither=Image.Dither.NONE)     # 64 colours: a few tens of KB
    atomic_write(args.out, lambda fh: small.save(fh, format="PNG", optimize=True))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
