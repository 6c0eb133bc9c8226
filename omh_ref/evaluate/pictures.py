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


def read_log(path) -> list:
    """The records of a ``log.jsonl`` (lines torn by a kill are skipped)."""
    recs = []
    for ln in Path(path).read_text().splitlines():
        try:
            recs.append(json.loads(ln))
        except ValueError:
            pass
    return recs


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = mag * min((1, 2, 2.5, 5, 10), key=lambda m: abs(m * mag - raw))
    first = np.ceil(lo / step) * step
    return [float(v) + 0.0 for v in np.arange(first, hi + step * 1e-9, step)]   # + 0.0: no "-0"


def line_panels_png(path, panels, xlabel="step", width=760, panel_h=190):
    """Line charts stacked in one PNG, each with labelled axes and ticks. ``panels``: a list of
    (title, y label, {series name: [(x, y), ...]}); a series' colour is the same in every panel,
    and a legend names them when there is more than one."""
    names = list(dict.fromkeys(n for _, _, series in panels for n in series))
    pal = {n: tuple(int(v) for v in c) for n, c in zip(names, palette(len(names)))}
    top = 6
    canvas = Image.new("RGB", (width, top + panel_h * max(len(panels), 1)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for p, (title, ylabel, series) in enumerate(panels):
        y0 = top + p * panel_h
        box = (70, y0 + 18, width - 20, y0 + panel_h - 34)           # left, top, right, bottom
        draw.text((box[0], y0 + 2), title, fill=(0, 0, 0))
        x = box[0] + 7 * len(title) + 16
        for n in (series if len(series) > 1 or len(names) > 1 else []):   # the panel's legend
            draw.text((x, y0 + 2), f"-- {n}", fill=pal[n])
            x += 7 * len(n) + 36
        pts = [xy for s in series.values() for xy in s]
        draw.rectangle(box, outline=(150, 150, 150))
        if not pts:
            continue
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        xlo, xhi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        ylo, yhi = min(ys), max(ys)
        if yhi <= ylo:                                   # a flat series sits mid-panel
            pad = max(abs(ylo) * 0.1, 1e-3)
            ylo, yhi = ylo - pad, yhi + pad

        def at(x, y):
            return (box[0] + (x - xlo) / (xhi - xlo) * (box[2] - box[0]),
                    box[3] - (y - ylo) / (yhi - ylo) * (box[3] - box[1]))

        for t in _ticks(xlo, xhi):
            X = at(t, ylo)[0]
            draw.line([(X, box[3]), (X, box[3] + 4)], fill=(80, 80, 80))
            draw.text((X - 10, box[3] + 6), f"{t:g}", fill=(60, 60, 60))
        for t in _ticks(ylo, yhi, 4):
            Y = at(xlo, t)[1]
            draw.line([(box[0] - 4, Y), (box[0], Y)], fill=(80, 80, 80))
            draw.text((2, Y - 6), f"{t:.3g}", fill=(60, 60, 60))
        draw.text((box[2] - 6 * len(xlabel), box[3] + 18), xlabel, fill=(0, 0, 0))
        draw.text((box[0] + 4, box[1] + 2), ylabel, fill=(110, 110, 110))
        for n, s in series.items():
            line = [at(x, y) for x, y in s]
            if len(line) > 1:
                draw.line(line, fill=pal[n], width=2)
            elif line:
                X, Y = line[0]
                draw.ellipse((X - 2, Y - 2, X + 2, Y + 2), fill=pal[n])
    save_png(canvas, path)


def _series(recs, key):
    return [(r["step"], r[key]) for r in recs if key in r and r[key] is not None]


def loss_curves_png(path, logs: dict, keys=("loss", "corr", "clu_0", "hier_0")):
    """Each run's ``log.jsonl`` series, one panel per key, every run in each panel."""
    recs = {name: read_log(log) for name, log in logs.items()}
    panels = [(key, key, {name: _series(r, key) for name, r in recs.items()}) for key in keys
              if any(key in x for r in recs.values() for x in r)]
    line_panels_png(path, panels)


def curves_png(path, log) -> None:
    """One run's training curves: the loss and its parts (correlation, every level's cluster and
    hierarchy loss) and, when the run validated, the validation cluster mIoU, against step."""
    recs = read_log(log)
    keys = sorted({k for r in recs for k in r})
    panels = [("loss (total)", "loss", {"loss": _series(recs, "loss")}),
              ("correlation loss", "loss", {"corr": _series(recs, "corr")})]
    for prefix, title in (("clu_", "cluster loss per level"), ("hier_", "hierarchy loss per level pair")):
        parts = [k for k in keys if k.startswith(prefix) and k[len(prefix):].isdigit()]
        if parts:
            panels.append((title, "loss", {k: _series(recs, k) for k in parts}))
    if any("val_miou" in r for r in recs):
        panels.append(("validation: cluster mIoU of the eval level (x100)", "mIoU", {"val_miou": _series(recs, "val_miou")}))
    line_panels_png(path, panels)


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
    """The levels as rows of a tree, the coarsest on top: one box per cluster, named by its
    majority class (the many-to-one matching) where there is room and coloured by that class's
    many-to-one IoU (red 0 .. green 100; grey: a cluster with no pixels, or the level is not
    scored); a line from each child to its parent in the plan (argmax of its row of A), green when
    the pair is consistent (the parent has the child's majority class at the parent's
    granularity), red when not, grey when it is not judged. ``levels``: the ``levels`` report of
    :class:`omh_ref.evaluate.granular.LevelScorer` (``result``); ``granularities``: its
    Granularity objects."""
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
        m = e["scores"]["many_to_one"]["cluster_to_class"] if e["scores"] else [-1] * e["clusters"]
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
            iou = e["scores"]["many_to_one"]["iou"][c] if (e["scores"] and c >= 0) else None
            fill = (200, 200, 200) if iou is None else _ramp(iou)
            draw.rectangle((x0, y, x0 + span - 2, y + node_h), fill=fill, outline=(90, 90, 90))
            if c >= 0 and span >= 30:
                name = granularities[gidx[e["granularity"]]].class_names[c]
                draw.text((x0 + 2, y + 3), str(name)[: int(span // 6)], fill=(0, 0, 0))
        score = "" if e["scores"] is None else f" mIoU {e['scores']['miou']:.1f}"
        draw.text((4, y + 3), f"L{l} K={K} {e['granularity'] or '(not scored)'}{score}"[:30], fill=(0, 0, 0))
    for l in range(L - 1):
        if plans is None:
            break
        judged = levels["consistency"][l].get("consistent") or [None] * entries[l]["clusters"]
        par = np.asarray(plans[l]).argmax(axis=1)
        for k in range(entries[l]["clusters"]):
            j = int(par[k])
            cx, cy, _ = xy[(l, k)]
            px, _, py = xy[(l + 1, j)]
            col = (190, 190, 190) if judged[k] is None else ((40, 170, 40) if judged[k] else (220, 40, 40))
            draw.line((cx, cy, px, py), fill=col, width=1)
    cons = "; ".join(f"L{c['child']}->L{c['parent']} consistency "
                     + ("n/a" if c["consistency"] is None else f"{c['consistency']:.2f}") for c in levels["consistency"])
    draw.text((4, L * row_h + 12), cons[:200], fill=(0, 0, 0))
    save_png(img, path)
