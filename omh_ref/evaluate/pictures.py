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


def colorize(labels, n):
    """(H, W) integer map -> (H, W, 3) uint8; values outside [0, n) are black (ignore)."""
    pal = palette(n)
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


def _ramp(v):
    """0..100 -> red .. yellow .. green."""
    t = min(max(v / 100.0, 0.0), 1.0)
    return (int(255 * min(1.0, 2 * (1 - t))), int(200 * min(1.0, 2 * t)), 40)


def hierarchy_tree_png(path, levels, plans, granularities, left=190, row_h=64, node_h=18):
    """The levels as rows of a tree, the coarsest on top: one box per cluster, coloured by the IoU
    of the class it is matched to (strict Hungarian matching; red 0 .. green 100; grey: unmatched
    or the level is not scored), with its matched class's name where there is room; a line from
    each child to its parent in the plan (argmax of its row of A), green when the parent's class
    contains the child's, red when not, grey when either is unmatched. ``levels``: the
    ``levels`` report of :class:`omh_ref.evaluate.granular.LevelScorer` (``result``);
    ``granularities``: its Granularity objects."""
    from .granular import contains

    entries = levels["levels"]
    gidx = {g.name: i for i, g in enumerate(granularities)}
    L = len(entries)
    Kmax = max(e["clusters"] for e in entries)
    node_w = max(4, min(48, 1400 // Kmax))
    W = left + Kmax * node_w + 20
    img = Image.new("RGB", (W, L * row_h + 30), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    cls = []
    for e in entries:
        m = e["scores"]["strict"]["match"]["cluster_to_class"] if e["scores"] else [-1] * e["clusters"]
        cls.append(np.asarray(m))
    # order: the coarsest by matched class; each finer level by its parent's position, then class
    order = [None] * L
    top = L - 1
    order[top] = sorted(range(entries[top]["clusters"]), key=lambda k: (cls[top][k] < 0, cls[top][k], k))
    for l in range(L - 2, -1, -1):
        pos = {k: i for i, k in enumerate(order[l + 1])}
        par = np.asarray(plans[l]).argmax(axis=1) if plans is not None else np.zeros(entries[l]["clusters"], int)
        order[l] = sorted(range(entries[l]["clusters"]), key=lambda k: (pos[int(par[k])], cls[l][k] < 0, cls[l][k], k))
    xy = {}
    for l, e in enumerate(entries):
        y = 20 + (top - l) * row_h
        K = e["clusters"]
        span = Kmax * node_w / K
        for i, k in enumerate(order[l]):
            x0 = left + i * span + 1
            xy[(l, k)] = (x0 + span / 2, y, y + node_h)
            c = int(cls[l][k])
            iou = e["scores"]["strict"]["iou"][c] if (e["scores"] and c >= 0) else None
            fill = (200, 200, 200) if iou is None else _ramp(iou)
            draw.rectangle((x0, y, x0 + span - 2, y + node_h), fill=fill, outline=(90, 90, 90))
            if c >= 0 and span >= 30:
                name = granularities[gidx[e["granularity"]]].class_names[c]
                draw.text((x0 + 2, y + 3), str(name)[: int(span // 6)], fill=(0, 0, 0))
        score = "" if e["scores"] is None else f" mIoU {e['scores']['strict']['miou']:.1f}"
        draw.text((4, y + 3), f"L{l} K={K} {e['granularity'] or '(not scored)'}{score}"[:30], fill=(0, 0, 0))
    for l in range(L - 1):
        if plans is None:
            break
        gc, gp = (gidx.get(entries[l]["granularity"]), gidx.get(entries[l + 1]["granularity"]))
        inside = contains(granularities, gc, gp) if (gc is not None and gp is not None and gc <= gp) else None
        par = np.asarray(plans[l]).argmax(axis=1)
        for k in range(entries[l]["clusters"]):
            j = int(par[k])
            cx, cy, _ = xy[(l, k)]
            px, _, py = xy[(l + 1, j)]
            a, b = int(cls[l][k]), int(cls[l + 1][j])
            col = (190, 190, 190) if inside is None or a < 0 or b < 0 else ((40, 170, 40) if inside[a, b] else (220, 40, 40))
            draw.line((cx, cy, px, py), fill=col, width=1)
    cons = "; ".join(f"L{c['child']}->L{c['parent']} consistency "
                     + ("n/a" if c["consistency"] is None else f"{c['consistency']:.2f}") for c in levels["consistency"])
    draw.text((4, L * row_h + 12), cons[:200], fill=(0, 0, 0))
    save_png(img, path)
