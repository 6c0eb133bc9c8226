"""Pictures for reports, drawn with Pillow only (its default font): label maps, palette PNG
masks, overlays and prediction grids with legends, loss curves, confusion matrices. No plotting
library is a dependency. Every picture is written atomically (:func:`save_png`).

Colours: class ``c`` of ``n`` is ``palette(n)[c]`` in every picture (label and prediction maps,
overlays, legends, class masks); clusters take their level's palette
(:func:`hierarchy_palettes` in ``omh-ref segment``). Ids outside the palette (ignore, unmatched)
are black."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..core import bases
from ..core.files import atomic_write

IGNORE_COLOR = (0, 0, 0)
WHITE = (255, 255, 255)
SWATCH = 12          # px: a legend entry's colour square
LEGEND_ROW = 16      # px: a legend row's height
_MEASURE = ImageDraw.Draw(Image.new("RGB", (1, 1)))    # measures text in the default font


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


def overlay(image, colors, alpha=0.5, ids=None):
    """Blend a colourised label map over an RGB image (both (H, W, 3) uint8). With ``ids`` (the
    (H, W) map ``colors`` was made from), the edges of its regions are drawn in the pure colours
    (:func:`edges`), so that an overlay shows each id in exactly the colour of its legend entry."""
    mix = (1 - alpha) * image.astype(np.float32) + alpha * colors.astype(np.float32)
    out = mix.round().astype(np.uint8)
    if ids is not None:
        edge = edges(ids, max(1, round(min(np.shape(ids)) / 300)))
        out[edge] = colors[edge]
    return out


def edges(ids, width=1) -> np.ndarray:
    """(H, W) bool: the pixels of ``ids`` with a 4-neighbour of another id, thickened to
    ``width`` px (on both sides of each boundary)."""
    ids = np.asarray(ids)
    out = np.zeros(ids.shape, bool)
    for axis in (0, 1):
        step = np.diff(ids, axis=axis) != 0
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        out[tuple(lo)] |= step
        out[tuple(hi)] |= step
    for _ in range(width - 1):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def palette_png(ids, pal) -> Image.Image:
    """An id map as a PNG image that keeps the ids: uint8 ids -> mode "P", the pixel values are
    the ids and its palette shows id ``k`` in ``pal[k]`` (ids beyond ``pal``: black); uint16 ids
    (more than 256) -> mode "I;16", grey levels (a PNG palette holds 256 colours at most)."""
    ids = np.asarray(ids)
    if ids.dtype == np.uint16:
        return Image.fromarray(ids)
    if ids.dtype != np.uint8:
        raise ValueError(f"expected uint8 or uint16 ids, got {ids.dtype}")
    img = Image.fromarray(ids)
    full = np.zeros((256, 3), np.uint8)
    full[:len(pal)] = np.asarray(pal, np.uint8)[:256]
    img.putpalette(full.ravel().tolist())
    return img


def legend(pal, names=None, ids=None, other="ignore"):
    """[(rgb, text)] legend entries: one per id in ``ids`` (default: every id of ``pal``), named
    ``names[id]`` (default ``str(id)``); ids beyond the palette share one black entry ``other``."""
    pal = np.asarray(pal, np.uint8)
    ids = range(len(pal)) if ids is None else sorted(int(i) for i in ids)
    out = [(tuple(int(v) for v in pal[i]), str(names[i]) if names is not None else str(i))
           for i in ids if 0 <= i < len(pal)]
    if any(not 0 <= i < len(pal) for i in ids):
        out.append((IGNORE_COLOR, other))
    return out


def present(ids) -> list:
    """The ids that occur in an integer map (in O(pixels), without sorting it)."""
    ids = np.asarray(ids)
    flat = ids.ravel().astype(np.int64)
    if flat.size and flat.min() < 0:
        return np.unique(flat).tolist()
    return np.flatnonzero(np.bincount(flat)).tolist() if flat.size else []


def _text_w(text) -> float:
    return _MEASURE.textlength(str(text))


def _legend_layout(entries, width, pad=4):
    """([(x, y)] of each entry, rows filling ``width``; the height they take)."""
    x, y, pos = pad, pad, []
    for _, text in entries:
        w = SWATCH + 4 + _text_w(text) + 12
        if x > pad and x + w > width - pad:
            x, y = pad, y + LEGEND_ROW
        pos.append((x, y))
        x += w
    return pos, (y + LEGEND_ROW + pad if entries else 0)


def draw_legend(canvas: Image.Image, entries, top: int) -> None:
    """Draw ``entries`` ([(rgb, text)]) on ``canvas`` from row ``top`` down: a colour square
    (the exact colour inside a grey frame) and the name, in rows as wide as the canvas."""
    draw = ImageDraw.Draw(canvas)
    pos, _ = _legend_layout(entries, canvas.width)
    for (rgb, text), (x, y) in zip(entries, pos):
        draw.rectangle((x, top + y, x + SWATCH - 1, top + y + SWATCH - 1), fill=rgb, outline=(90, 90, 90))
        draw.text((x + SWATCH + 4, top + y), str(text), fill=(0, 0, 0))


def with_legend(picture, entries, min_width=200) -> Image.Image:
    """An (H, W, 3) picture, unchanged at the top left, above a legend strip of ``entries``
    (the canvas is at least ``min_width`` wide, so that a narrow picture's legend fits)."""
    H, W = picture.shape[:2]
    width = max(W, min_width)
    _, h = _legend_layout(entries, width)
    canvas = Image.new("RGB", (width, H + h), WHITE)
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw_legend(canvas, entries, H)
    return canvas


def grid_png(path, rows, titles=None, scale=2, pad=4, legend=None):
    """Save a grid of RGB images: ``rows`` is a list of lists of (H, W, 3) arrays, each tile
    scaled by ``scale`` (NEAREST: colours unchanged); ``legend``: [(rgb, text)] entries
    (:func:`legend`) drawn under the grid."""
    h = max(im.shape[0] for r in rows for im in r) * scale
    w = max(im.shape[1] for r in rows for im in r) * scale
    top = 14 if titles else 0
    ncol = max(len(r) for r in rows)
    width = max(ncol * (w + pad) + pad, 200 if legend else 0)
    height = len(rows) * (h + pad) + pad + top
    canvas = Image.new("RGB", (width, height + _legend_layout(legend or [], width)[1]), WHITE)
    draw = ImageDraw.Draw(canvas)
    for j, t in enumerate(titles or []):
        draw.text((pad + j * (w + pad), 2), str(t), fill=(0, 0, 0))
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            tile = Image.fromarray(im).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (pad + j * (w + pad), top + pad + i * (h + pad)))
    if legend:
        draw_legend(canvas, legend, height)
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


def line_panels_png(path, panels, xlabel="step", width=760, panel_h=190, title=None):
    """Line charts stacked in one PNG, each with labelled axes and ticks, under ``title`` if
    given. ``panels``: a list of (title, y label, {series name: [(x, y), ...]}); a series' colour
    is the same in every panel, and a legend names them when there is more than one."""
    names = list(dict.fromkeys(n for _, _, series in panels for n in series))
    pal = {n: tuple(int(v) for v in c) for n, c in zip(names, palette(len(names)))}
    top = 24 if title else 6
    canvas = Image.new("RGB", (width, top + panel_h * max(len(panels), 1)), WHITE)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((8, 5), str(title), fill=(0, 0, 0))
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


# each base's own loss part (its LOSS_PART: STEGO's corr, SmooSeg's smooth) and its panel's title
BASE_LOSSES = {b.LOSS_PART: f"{name} base loss ({b.LOSS_PART})" for name, b in bases.BASES.items()}


def loss_keys(recs) -> list:
    """Every loss part the records hold, in order: loss, the base's (corr, smooth), clu_0, clu_1,
    ..., hier_0, ..."""
    found = {k for r in recs for k in r}
    parts = [k for k in ("loss", *BASE_LOSSES) if k in found]
    for prefix in ("clu_", "hier_"):
        parts += sorted((k for k in found if k.startswith(prefix) and k[len(prefix):].isdigit()),
                        key=lambda k: int(k[len(prefix):]))
    return parts


def loss_curves_png(path, logs: dict, keys=None, title=None) -> list:
    """Each run's ``log.jsonl`` series, one panel per key (default: every loss part any log
    holds, :func:`loss_keys`), every run in each panel, under ``title`` (say, which seed);
    -> the keys drawn."""
    recs = {name: read_log(log) for name, log in logs.items()}
    keys = loss_keys([x for r in recs.values() for x in r]) if keys is None else list(keys)
    panels = [(key, key, {name: _series(r, key) for name, r in recs.items()}) for key in keys
              if any(key in x for r in recs.values() for x in r)]
    line_panels_png(path, panels, title=title)
    return [p[0] for p in panels]


def curves_png(path, log) -> None:
    """One run's training curves: the loss and its parts (correlation, every level's cluster and
    hierarchy loss) and, when the run validated, the validation cluster mIoU, against step."""
    recs = read_log(log)
    keys = sorted({k for r in recs for k in r})
    panels = [("loss (total)", "loss", {"loss": _series(recs, "loss")})]
    panels += [(title, "loss", {key: _series(recs, key)}) for key, title in BASE_LOSSES.items() if key in keys]
    for prefix, title in (("clu_", "cluster loss per level"), ("hier_", "hierarchy loss per level pair")):
        parts = [k for k in keys if k.startswith(prefix) and k[len(prefix):].isdigit()]
        if parts:
            panels.append((title, "loss", {k: _series(recs, k) for k in parts}))
    if any("val_miou" in r for r in recs):
        panels.append(("validation: cluster mIoU of the eval level (x100)", "mIoU", {"val_miou": _series(recs, "val_miou")}))
    line_panels_png(path, panels)


def confusion_png(path, conf, row_names=None, col_names=None, cell=28, row_title="predicted cluster",
                  col_title="true class", title=None) -> dict:
    """A confusion matrix (rows: predictions, columns: true classes) as a heat map, each column
    normalised to its class's pixel count, the per cent printed in every cell of 0.5 % or more;
    axes titled, every row and column named (column names written upwards). -> the geometry
    {"left", "top", "cell"} (cell (i, j) starts at left + j * cell, top + i * cell)."""
    conf = np.asarray(conf, dtype=np.float64)
    norm = conf / np.maximum(conf.sum(axis=0, keepdims=True), 1)
    R, C = conf.shape
    rows = [str(n) for n in (row_names if row_names is not None else range(R))]
    cols = [str(n) for n in (col_names if col_names is not None else range(C))]
    title = title or f"% of each {col_title}'s pixels in each {row_title} (a column sums to 100)"
    left = 22 + int(max(map(_text_w, rows))) + 6
    top = 36 + int(max(map(_text_w, cols))) + 6
    width = max(left + C * cell + 10, int(_text_w(title)) + 16)
    img = Image.new("RGB", (width, top + max(R * cell, int(_text_w(row_title))) + 10), WHITE)
    draw = ImageDraw.Draw(img)
    draw.text((6, 3), title, fill=(0, 0, 0))
    draw.text((left, 19), col_title, fill=(0, 0, 0))
    img.paste(_upright(row_title), (3, top))
    for i, n in enumerate(rows):
        draw.text((left - 4 - _text_w(n), top + i * cell + (cell - 11) // 2), n, fill=(0, 0, 0))
    for j, n in enumerate(cols):
        img.paste(_upright(n), (left + j * cell + (cell - 12) // 2, top - 4 - int(_text_w(n))))
    for i in range(R):
        for j in range(C):
            _cell(draw, left + j * cell, top + i * cell, cell, norm[i, j])
    save_png(img, path)
    return {"left": left, "top": top, "cell": cell}


def matched_rows(conf, class_to_cluster):
    """(conf with its cluster rows in the order of the classes they are matched to, then the
    unmatched clusters; the rows' names "cluster k"): a good matching shows as a diagonal."""
    order = [int(k) for k in class_to_cluster if k >= 0]
    order += [k for k in range(np.shape(conf)[0]) if k not in set(order)]
    return np.asarray(conf)[order], [f"cluster {k}" for k in order]


def _cell(draw, x, y, cell, share):
    v = int(255 * (1 - share))
    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=(v, v, 255), outline=(225, 225, 235))
    if share >= 0.005 and cell >= 20:                  # blank: under 0.5 %
        text = f"{100 * share:.0f}"
        ink = (255, 255, 255) if share > 0.5 else (0, 0, 0)
        draw.text((x + (cell - _text_w(text)) / 2, y + (cell - 11) / 2), text, fill=ink)


def _upright(text) -> Image.Image:
    """``text`` in black on white, turned to read upwards (for column names and a vertical
    axis title)."""
    w = max(1, int(_text_w(text)) + 2)
    tile = Image.new("RGB", (w, 13), WHITE)
    ImageDraw.Draw(tile).text((1, 0), str(text), fill=(0, 0, 0))
    return tile.rotate(90, expand=True)


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
