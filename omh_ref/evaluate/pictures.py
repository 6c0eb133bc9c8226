"""Pictures for reports, drawn with Pillow only: label maps, prediction grids, loss curves,
confusion matrices. No plotting library is a dependency. Every picture is written atomically
(:func:`save_png`)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core.files import atomic_write

IGNORE_COLOR = (0, 0, 0)


def save_png(img: Image.Image, path) -> None:
    """Write a PIL image as PNG through :func:`omh_ref.core.files.atomic_write`."""
    atomic_write(path, lambda fh: img.save(fh, format="PNG"))


def palette(n, seed=0):
    """n well-separated RGB colours (golden-ratio hues), deterministic."""
    import colorsys

    cols = []
    for i in range(n):
        h = (i * 0.618033988749895 + 0.1 * seed) % 1.0
        s = 0.65 if i % 2 else 0.9
        v = 0.95 if (i // 2) % 2 else 0.75
        cols.append(tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)))
    return np.array(cols, dtype=np.uint8)


def hierarchy_palettes(levels, plans) -> list:
    """One (K_l, 3) uint8 palette per level in which every cluster wears a shade of its parent's
    colour, so an overlay shows at a glance which parts make up a class.

    The coarsest level takes :func:`palette`'s well-separated hues. Going down, each child takes its
    parent's hue (parent = the argmax of its row of the plan ``plans[l]``, K_l x K_{l+1}), nudged
    by at most ±0.03 so that siblings stay apart, with saturation and value spread over the
    siblings (dark and saturated to light and pale), not compounded from the parent's: a family is
    a hue at every depth. Deterministic: the same plans give the same colours."""
    import colorsys

    levels = [int(k) for k in levels]
    if len(plans) != len(levels) - 1:
        raise ValueError(f"{len(levels)} levels need {len(levels) - 1} plans, got {len(plans)}")
    top = palette(levels[-1])
    hues = [colorsys.rgb_to_hsv(*(c / 255.0))[0] for c in top.astype(np.float64)]
    out = [None] * len(levels)
    out[-1] = top
    for lvl in range(len(levels) - 2, -1, -1):
        A = np.asarray(plans[lvl])
        if A.shape != (levels[lvl], levels[lvl + 1]):
            raise ValueError(f"plan {lvl}: expected shape {(levels[lvl], levels[lvl + 1])}, got {A.shape}")
        parent = A.argmax(axis=1)
        child_hues = [0.0] * levels[lvl]
        cols = np.zeros((levels[lvl], 3), np.uint8)
        for j in range(levels[lvl + 1]):
            kids = np.flatnonzero(parent == j)
            n = len(kids)
            for rank, k in enumerate(kids):
                t = (rank + 0.5) / n                      # (0, 1): this sibling's place
                h = (hues[j] + 0.06 * (t - 0.5)) % 1.0
                s = 1.0 - 0.5 * t if n > 1 else 0.85
                v = 0.55 + 0.45 * t if n > 1 else 0.85
                child_hues[k] = h
                cols[k] = [int(round(255 * c)) for c in colorsys.hsv_to_rgb(h, s, v)]
        out[lvl], hues = cols, child_hues
    return out


def colorize(labels, n, pal=None):
    """(H, W) integer map -> (H, W, 3) uint8; values outside [0, n) are black (ignore).
    ``pal``: (n, 3) colours (default :func:`palette`)."""
    pal = palette(n) if pal is None else np.asarray(pal, np.uint8)
    lab = np.asarray(labels)
    out = np.zeros(lab.shape + (3,), np.uint8)
    ok = (lab >= 0) & (lab < n)
    out[ok] = pal[lab[ok]]
    return out


def overlay(image, colors, alpha=0.5):
    """Blend a colourised label map over an RGB image (both (H, W, 3) uint8)."""
    mix = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    return mix.round().astype(np.uint8)


def grid_png(path, rows, titles=None, scale=2, pad=4):
    """Save a grid of RGB images: ``rows`` is a list of lists of (H, W, 3) arrays."""
    h = max(im.shape[0] for r in rows for im in r) * scale
    w = max(im.shape[1] for r in rows for im in r) * scale
    top = 14 if titles else 0
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad + top), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles or []):
        draw.text((pad + j * (w + pad), 2), str(t), fill=(0, 0, 0))
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            tile = Image.fromarray(im).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (pad + j * (w + pad), top + pad + i * (h + pad)))
    save_png(canvas, path)


def loss_curves_png(path, logs: dict, keys=("loss", "corr", "clu_0", "hier_0"), size=(720, 420)):
    """Plot each run's ``log.jsonl`` series (one panel per key) into one PNG."""
    series = {}
    for name, log in logs.items():
        recs = [json.loads(ln) for ln in Path(log).read_text().splitlines() if ln.strip()]
        series[name] = recs
    keys = [k for k in keys if any(k in r for recs in series.values() for r in recs)]
    W, H = size
    canvas = Image.new("RGB", (W, H * len(keys) // 2 + 40), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    pal = palette(len(series))
    panel_h = (canvas.height - 40) // max(len(keys), 1)
    for p, key in enumerate(keys):
        y0 = 30 + p * panel_h
        box = (60, y0 + 14, W - 20, y0 + panel_h - 16)
        draw.rectangle(box, outline=(160, 160, 160))
        vals = [(r["step"], r[key]) for recs in series.values() for r in recs if key in r]
        if not vals:
            continue
        smin, smax = min(v[0] for v in vals), max(v[0] for v in vals)
        vmin, vmax = min(v[1] for v in vals), max(v[1] for v in vals)
        vmax = vmax if vmax > vmin else vmin + 1
        draw.text((box[0], y0), f"{key}  [{vmin:.3g}, {vmax:.3g}]", fill=(0, 0, 0))
        for c, (name, recs) in enumerate(series.items()):
            pts = [(box[0] + (r["step"] - smin) / max(smax - smin, 1) * (box[2] - box[0]),
                    box[3] - (r[key] - vmin) / (vmax - vmin) * (box[3] - box[1])) for r in recs if key in r]
            if len(pts) > 1:
                draw.line(pts, fill=tuple(int(x) for x in pal[c]), width=2)
    for c, name in enumerate(series):
        draw.text((60 + c * 160, 8), f"-- {name}", fill=tuple(int(x) for x in pal[c]))
    save_png(canvas, path)


def confusion_png(path, conf, row_names=None, col_names=None, cell=14):
    """A confusion matrix (rows: clusters/predictions, columns: classes) as a heat map,
    each column normalised to its class's pixel count."""
    conf = np.asarray(conf, dtype=np.float64)
    norm = conf / np.maximum(conf.sum(axis=0, keepdims=True), 1)
    R, C = conf.shape
    left, top = 70, 70
    img = Image.new("RGB", (left + C * cell + 10, top + R * cell + 10), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i in range(R):
        for j in range(C):
            v = int(255 * (1 - norm[i, j]))
            draw.rectangle((left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1),
                           fill=(v, v, 255))
    for i, n in enumerate(row_names or range(R)):
        draw.text((2, top + i * cell), str(n)[:10], fill=(0, 0, 0))
    for j, n in enumerate(col_names or range(C)):
        draw.text((left + j * cell, 2 + (j % 4) * 16), str(n)[:8], fill=(0, 0, 0))
    save_png(img, path)
