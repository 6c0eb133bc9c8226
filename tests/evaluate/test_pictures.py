"""omh_ref.evaluate.pictures: palette PNG masks, overlays and legends in one colour per id,
confusion pictures that can be read, loss curves of every loss part."""
import json

import numpy as np
import pytest
from PIL import Image

from omh_ref.evaluate import pictures


def rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def regions():
    """A 30x40 map of three regions and an ignore pixel."""
    ids = np.zeros((30, 40), np.int64)
    ids[10:, :20] = 1
    ids[20:, 20:] = 2
    ids[0, 0] = 255
    return ids


def count(img, colour):
    return int((np.asarray(img)[..., :3] == np.asarray(colour, np.uint8)).all(-1).sum())


# ---- masks ---------------------------------------------------------------------------------------
def test_palette_pngs_keep_the_ids_and_show_them_in_the_palette(tmp_path):
    ids = regions().astype(np.uint8)
    pal = pictures.palette(3)
    pictures.save_png(pictures.palette_png(ids, pal), tmp_path / "m.png")
    img = Image.open(tmp_path / "m.png")
    assert img.mode == "P" and np.array_equal(np.asarray(img), ids)
    shown = rgb(tmp_path / "m.png")
    assert np.array_equal(shown[ids < 3], pal[ids[ids < 3]])
    assert tuple(shown[0, 0]) == pictures.IGNORE_COLOR                 # beyond the palette: black
    big = (np.arange(600, dtype=np.uint16).reshape(20, 30) * 50)
    pictures.save_png(pictures.palette_png(big, pictures.palette(256)), tmp_path / "big.png")
    assert Image.open(tmp_path / "big.png").mode == "I;16" and np.array_equal(np.asarray(Image.open(tmp_path / "big.png")), big)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        pictures.palette_png(ids.astype(np.int32), pal)


# ---- overlays and legends ------------------------------------------------------------------------
def test_overlay_edges_wear_the_pure_colours_and_the_inside_is_blended():
    ids = regions()
    pal = pictures.palette(3)
    colours = pictures.colorize(ids, 3, pal)
    image = np.full(ids.shape + (3,), 200, np.uint8)
    ov = pictures.overlay(image, colours, ids=ids)
    edge = pictures.edges(ids)
    assert edge[9, 5] and edge[10, 5] and not edge[5, 5] and not edge[25, 5]
    assert np.array_equal(ov[edge], colours[edge])
    assert np.array_equal(ov[~edge], pictures.overlay(image, colours)[~edge])
    assert not np.array_equal(ov[5, 5], colours[5, 5])                 # the inside shows the image
    assert pictures.edges(ids, width=3)[7, 5] and not pictures.edges(ids, width=3)[6, 5]


def test_a_legend_names_each_id_in_its_colour_under_the_unchanged_picture():
    ids = regions()
    pal = pictures.palette(4)
    entries = pictures.legend(pal, ["sky", "sand", "grass", "sea"], pictures.present(ids))
    assert entries == [(tuple(int(v) for v in pal[k]), n) for k, n in enumerate(["sky", "sand", "grass"])] \
        + [(pictures.IGNORE_COLOR, "ignore")]                            # "sea" is absent
    picture = pictures.colorize(ids, 4, pal)
    img = np.asarray(pictures.with_legend(picture, entries))
    H, W = ids.shape
    assert img.shape[1] == 200 and img.shape[0] > H                      # widened for the names
    assert np.array_equal(img[:H, :W], picture)
    strip = img[H:]
    for colour, _ in entries:
        assert count(strip, colour) >= (pictures.SWATCH - 2) ** 2
    assert count(strip, pal[3]) == 0
    assert (strip.max(-1) < 90).sum() > 4 * 20                          # text of four names


def test_a_grid_shows_one_class_in_one_colour_in_every_column_and_in_its_legend(tmp_path):
    """predictions.png's columns (labels, matched, overlay): class c is the same RGB in all."""
    ids = regions()
    pal = pictures.palette(3)
    colours = pictures.colorize(ids, 3, pal)
    image = np.full(ids.shape + (3,), 90, np.uint8)
    shifted = np.roll(ids, 3, axis=1)
    row = [colours, pictures.colorize(shifted, 3, pal), pictures.overlay(image, pictures.colorize(shifted, 3, pal), ids=shifted)]
    legend = pictures.legend(pal, ["a", "b", "c"], pictures.present(ids))
    pictures.grid_png(tmp_path / "g.png", [row], titles=["labels", "matched", "overlay"], legend=legend)
    g = rgb(tmp_path / "g.png")
    scale, pad, top = 2, 4, 14
    H, W = ids.shape[0] * scale, ids.shape[1] * scale
    tiles = [g[top + pad:top + pad + H, pad + j * (W + pad):pad + j * (W + pad) + W] for j in range(3)]
    assert np.array_equal(tiles[0][::scale, ::scale], colours)
    strip = g[top + pad + H + pad:]
    for k in range(3):
        assert count(tiles[1], pal[k]) > 0 and count(tiles[2], pal[k]) > 0 and count(strip, pal[k]) >= 100, k
    assert count(strip, pictures.IGNORE_COLOR) >= 100                  # the ignore pixel's entry


# ---- confusion -----------------------------------------------------------------------------------
def test_confusion_pictures_have_big_cells_numbers_axis_titles_and_names(tmp_path):
    conf = np.array([[90, 0, 5], [10, 50, 0], [0, 50, 95]])
    names = ["ground-things", "sky", "s0.c0"]
    geo = pictures.confusion_png(tmp_path / "c.png", conf, row_names=[f"cluster {k}" for k in range(3)], col_names=names)
    img = rgb(tmp_path / "c.png")
    left, top, cell = geo["left"], geo["top"], geo["cell"]
    assert cell >= 24 and img.shape[1] >= left + 3 * cell and img.shape[0] >= top + 3 * cell
    norm = conf / conf.sum(0)
    for i in range(3):
        for j in range(3):
            block = img[top + i * cell + 1:top + (i + 1) * cell - 1, left + j * cell + 1:left + (j + 1) * cell - 1]
            v = int(255 * (1 - norm[i, j]))
            fill = count(block, (v, v, 255))
            assert fill > 0.5 * block.shape[0] * block.shape[1], (i, j)
            numbered = fill < block.shape[0] * block.shape[1]            # the per cent drawn on it
            assert numbered == (conf[i, j] > 0), (i, j)
    names_band = img[40:top - 2, left:left + 3 * cell]                  # upright column names
    for j in range(3):
        assert (names_band[:, j * cell:(j + 1) * cell].max(-1) < 120).sum() > 15, j
    assert (names_band[:, :cell].max(-1) < 120).any(1).sum() > (names_band[:, cell:2 * cell].max(-1) < 120).any(1).sum()
    assert (img[:top - 4, left:].max(-1) < 120).any(1)[15:30].any()      # "true class" above the names
    assert (img[top:, :16].max(-1) < 120).sum() > 30                     # "predicted cluster" upright at the left
    assert (img[top:top + 3 * cell, 20:left - 2].max(-1) < 120).sum() > 3 * 15   # the rows' names


def test_matched_rows_put_each_class_s_cluster_on_the_diagonal():
    conf = np.array([[0, 7], [5, 0], [1, 1]])
    rows, names = pictures.matched_rows(conf, np.array([1, 0]))
    assert np.array_equal(rows, conf[[1, 0, 2]]) and names == ["cluster 1", "cluster 0", "cluster 2"]


# ---- loss curves ---------------------------------------------------------------------------------
def write_log(path, parts, steps=5):
    path.write_text("".join(json.dumps({"step": s, **{k: 1.0 / (s + 1 + i) for i, k in enumerate(parts)}}) + "\n"
                            for s in range(1, steps + 1)))
    return path


def test_loss_curves_draw_every_loss_part_under_a_title(tmp_path):
    parts = ["loss", "corr", "clu_0", "clu_1", "clu_2", "hier_0", "hier_1", "clu_10"]
    logs = {"OMH": write_log(tmp_path / "a.jsonl", parts), "STEGO": write_log(tmp_path / "b.jsonl", ["loss", "corr", "clu_0"])}
    drawn = pictures.loss_curves_png(tmp_path / "l.png", logs, title="training losses, seed 3")
    assert drawn == ["loss", "corr", "clu_0", "clu_1", "clu_2", "clu_10", "hier_0", "hier_1"]
    titled = rgb(tmp_path / "l.png")
    assert titled.shape[0] == 24 + 190 * len(drawn)
    pictures.loss_curves_png(tmp_path / "plain.png", logs)
    plain = rgb(tmp_path / "plain.png")
    assert (titled[:20].max(-1) < 90).sum() > 50 and (plain[:6].max(-1) < 90).sum() == 0
    assert pictures.loss_curves_png(tmp_path / "k.png", logs, keys=("loss", "missing")) == ["loss"]
