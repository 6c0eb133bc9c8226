"""``omh-ref report``: one self-contained HTML page of a run, a seeds folder, a demo folder or several
side by side, checked as HTML here and rendered in headless Chromium (the browser test skips, and
says why, where Chromium is not installed; ``.ci/run`` installs it)."""
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.core.config import Config
from omh_ref.core.errors import InputError
from omh_ref.evaluate.predict import cluster_eval, level_predictions
from omh_ref.features import synthetic
from omh_ref.features.store import FeatureStore
from omh_ref.jobs import demo, report, seeds
from omh_ref.train.checkpoint import load_params
from omh_ref_cli.main import main
from tests import browser

pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (pip install -e '.[report]')")

LEVELS = (36, 18, 9)      # 4K/2K/K over the synthetic data's 9 classes


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    synthetic.write(synthetic.SynthSpec(n_images=16, grid=5, dim=16, seed=0), d / "train", split="train")
    synthetic.write(synthetic.SynthSpec(n_images=6, grid=5, dim=16, seed=1), d / "val", split="val")
    return d


def _seeds(data, out, seed_list=(0, 1), **config):
    opts = seeds.SeedsOptions(features=str(data / "train" / "feats.npy"), val_features=str(data / "val" / "feats.npy"),
                              out=str(out), config=Config(in_dim=16, levels=LEVELS, **config), seeds=seed_list,
                              steps=4, batch_size=4, probe_epochs=1, log_every=1, progress=False)
    said = []
    seeds.run(opts, say=said.append)
    return out, said


@pytest.fixture(scope="module")
def seeds_run(data, tmp_path_factory):
    """A seeds folder (two seeds); seeds writes report.html at its end."""
    return _seeds(data, tmp_path_factory.mktemp("runs") / "omh")


@pytest.fixture(scope="module")
def other_run(data, tmp_path_factory):
    """Another config on the same data (no hierarchy loss), one seed: to be compared side by side."""
    return _seeds(data, tmp_path_factory.mktemp("runs") / "no_hier", seed_list=(0,), lam_hier=0.0)[0]


@pytest.fixture(scope="module")
def smooseg_run(data, tmp_path_factory):
    """The same data trained on the SmooSeg base (its loss part "smooth", no "corr"), one seed."""
    return _seeds(data, tmp_path_factory.mktemp("runs") / "smooseg", seed_list=(0,), base="smooseg")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    said = []
    demo.run(demo.DemoOptions(out=str(out), seeds=(0,), steps=4, batch_size=4, n_train=12, n_val=6,
                              probe_epochs=1, progress=False), say=said.append)
    return out, said


class Page(HTMLParser):
    """What the tests look at in a page: sections, tables (cells, attributes), images, SVG texts,
    scripts, every attribute value."""

    def __init__(self, text):
        super().__init__()
        self.sections, self.tables, self.images, self.svg_text, self.scripts, self.attrs = [], [], [], [], [], []
        self.legend_items, self.svgs = [], []
        self._in_svg, self._in_script, self._in_legend, self._in_li, self._cell = 0, False, 0, False, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.attrs += [(tag, k, v) for k, v in attrs]
        if tag == "section":
            self.sections.append(a.get("id"))
        elif tag == "table":
            self.tables.append({"class": a.get("class", ""), "section": self.sections[-1] if self.sections else None,
                                "head": [], "rows": [], "in_head": False})
        elif tag == "thead" and self.tables:
            self.tables[-1]["in_head"] = True
        elif tag == "tbody" and self.tables:
            self.tables[-1]["in_head"] = False
        elif tag == "tr" and self.tables and not self.tables[-1]["in_head"]:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th") and self.tables:
            self._cell = {"text": "", "v": a.get("data-v"), "tag": tag}
        elif tag == "img":
            self.images.append({"src": a.get("src", ""), "alt": a.get("alt", ""),
                                "section": self.sections[-1] if self.sections else None})
        elif tag == "svg":
            self._in_svg += 1
            self.svgs.append({"label": a.get("aria-label"), "section": self.sections[-1], "text": [], "ids": []})
        elif tag == "script":
            self._in_script = True
            self.scripts.append("")
        if self._in_svg and "id" in a:
            self.svgs[-1]["ids"].append(a["id"])
        if a.get("id") == "legend":
            self._in_legend = 1
        elif self._in_legend and tag == "div":
            self._in_legend += 1
        if self._in_legend and tag == "li":
            self.legend_items.append("")
            self._in_li = True

    def handle_endtag(self, tag):
        if tag == "svg":
            self._in_svg -= 1
        elif tag == "script":
            self._in_script = False
        elif tag in ("td", "th") and self._cell is not None and self.tables:
            t = self.tables[-1]
            if t["in_head"]:
                t["head"].append(self._cell["text"].strip())
            elif t["rows"]:
                t["rows"][-1].append(self._cell)
            self._cell = None
        elif tag == "div" and self._in_legend:
            self._in_legend -= 1
        elif tag == "li":
            self._in_li = False

    def handle_data(self, d):
        if self._in_svg:
            self.svgs[-1]["text"].append(d)
            self.svg_text.append(d)
        if self._in_script:
            self.scripts[-1] += d
        if self._cell is not None:
            self._cell["text"] += d
        if self._in_legend and self._in_li:
            self.legend_items[-1] += d

    def table(self, cls):
        (t,) = [t for t in self.tables if cls in t["class"].split()]
        return t


def _page(path) -> Page:
    return Page(path.read_text())


def _names(folder):
    return json.loads((folder / "feats.json").read_text())["class_names"]


# -- a seeds folder -----------------------------------------------------------------------------------
def test_seeds_writes_the_report_and_it_has_every_section(seeds_run, data):
    out, said = seeds_run
    assert f"report: wrote {out / 'report.html'}" in said
    page = _page(out / "report.html")
    assert page.sections == list(report.SECTIONS)
    names = _names(data / "val")
    # results: mean ± std of every metric results.json has, and every seed's value
    results = json.loads((out / "results.json").read_text())
    t = page.table("results")
    assert t["head"][:2] == ["run", "seeds"] and "cluster mIoU (mean ± std)" in t["head"]
    (row,) = t["rows"]
    col = t["head"].index("cluster mIoU (mean ± std)")
    s = results["summary"]["cluster_miou"]
    assert float(row[col]["v"]) == pytest.approx(s["mean"], rel=1e-5)
    assert row[col]["text"] == f"{s['mean']:.2f} ± {s['std']:.2f}"
    per_seed = page.table("per-seed")
    got = {int(r[1]["v"]): float(r[per_seed["head"].index("linear mIoU")]["v"]) for r in per_seed["rows"]}
    assert got == pytest.approx({r["seed"]: r["linear"]["miou"] for r in results["runs"]}, rel=1e-5)
    # per-class IoU: one plot per probe, every class named on it
    labels = {s["label"] for s in page.svgs if s["section"] == "per-class"}
    assert labels == {"cluster IoU per class", "linear IoU per class"}
    for svg in page.svgs:
        if svg["section"] == "per-class":
            assert set(names) <= {x.strip() for x in svg["text"]}
            assert any(i.endswith("legend_1") for i in svg["ids"]), svg["label"]
    # every level against its granularity, the consistency, and the tree naming matched classes
    levels = page.table("levels")
    assert [(r[1]["text"], r[2]["text"], r[3]["text"]) for r in levels["rows"]] == \
        [("L0", "36", "parts"), ("L1", "18", "parts"), ("L2", "9", "classes")]
    assert len(page.table("consistency")["rows"]) == 2
    (tree,) = [s for s in page.svgs if (s["label"] or "").startswith("hierarchy tree")]
    texts = {x.strip() for x in tree["text"]}
    evaluated = json.loads((out / "seed0" / "eval.json").read_text())["levels"]
    top = evaluated["levels"][-1]["scores"]["many_to_one"]["cluster_to_class"]
    assert {names[c] for c in top if c >= 0} <= texts              # the coarsest level's nodes: its classes
    assert any(t.startswith("L2: 9 clusters") for t in texts)
    # curves: every seed's log, a legend naming the seeds
    (curves,) = [s for s in page.svgs if s["section"] == "curves"]
    assert {"seed 0", "seed 1", "loss (total)"} <= {x.strip() for x in curves["text"]}
    # the qualitative grid: image, label, 3 levels and the overlay per image, one legend
    grid = [i for i in page.images if i["section"] == "qualitative"]
    assert len(grid) == 4 * (2 + 3 + 1)
    assert all(i["src"].startswith("data:image/png;base64,") for i in grid)
    assert set(names) <= {x.strip() for x in page.legend_items}


def test_seeds_eval_json_records_every_level_with_the_plans_parents(seeds_run):
    ev = json.loads((seeds_run[0] / "seed1" / "eval.json").read_text())
    assert [lv["clusters"] for lv in ev["levels"]["levels"]] == list(LEVELS)
    for c in ev["levels"]["consistency"]:
        assert len(c["parents"]) == LEVELS[c["child"]] and max(c["parents"]) < LEVELS[c["parent"]]


def test_the_masks_are_the_levels_predictions_as_scored(seeds_run, data):
    """level_predictions (the report's masks) gives the eval level's predictions that cluster_eval
    scores, for rows in any order."""
    params, cfg = load_params(seeds_run[0] / "seed0" / "ckpt.npz")
    store = FeatureStore(data / "val" / "feats.npy", labels=data / "val" / "labels.npy")
    _, kept = cluster_eval(params, cfg, store, 9, keep=store.N)
    rows = np.array([5, 0, 3])
    preds = level_predictions(params, cfg, store, rows)
    assert [p.shape for p in preds] == [(3, *store.labels.shape[1:])] * 3
    assert np.array_equal(preds[cfg.eval_index], kept[rows])


def test_the_page_loads_nothing_from_anywhere(seeds_run):
    text = (seeds_run[0] / "report.html").read_text()
    assert not re.search(r"https?://", text)
    assert "<link" not in text and "@import" not in text and not re.search(r"url\((?!#)", text)
    page = Page(text)
    for tag, key, value in page.attrs:
        if key in ("src", "href") or key.endswith(":href"):
            assert value.startswith(("data:", "#")), (tag, key, value[:60])


def test_the_tables_sort_with_an_inline_script(seeds_run):
    page = _page(seeds_run[0] / "report.html")
    (script,) = page.scripts
    assert "table.sortable thead th" in script and "addEventListener('click'" in script and "data-v" in script
    sortable = [t for t in page.tables if "sortable" in t["class"].split()]
    assert {"results", "per-seed", "levels", "consistency"} <= {c for t in sortable for c in t["class"].split()}
    for t in sortable:    # a number to sort by in every numeric cell
        for r in t["rows"]:
            for c in r:
                if re.fullmatch(r"-?[\d.]+( ± [\d.]+)?", c["text"].strip()):
                    assert c["v"] not in (None, ""), (t["class"], c)


# -- several runs side by side, a demo folder, a train folder --------------------------------------
def test_several_runs_side_by_side_show_the_same_images(seeds_run, other_run, tmp_path):
    out = report.run(report.ReportOptions(runs=(str(seeds_run[0]), str(other_run)), out=str(tmp_path / "r.html"),
                                          images=3), say=quiet)
    page = _page(out)
    rows = page.table("results")["rows"]
    assert [r[0]["text"] for r in rows] == ["omh", "no_hier"] and [r[1]["text"] for r in rows] == ["2", "1"]
    config = page.table("config")
    (lam,) = [r for r in config["rows"] if r[0]["text"] == "lam_hier"]
    assert [c["text"] for c in lam[1:]] == ["1.0", "0.0"]
    grid = page.table("grid")
    run_cells = [c["text"] for r in grid["rows"] for c in r if c["tag"] == "th"]
    assert [t.split("seed")[0] for t in run_cells] == ["omh", "no_hier"] * 3    # both runs under each image
    captions = [i["alt"] for i in page.images if i["alt"].startswith("features (PCA)")]
    assert len(captions) == 3 and len(set(captions)) == 3                     # three images, once each
    assert "does not hold the same images" not in out.read_text()


def test_a_demo_folder_ends_with_its_report_one_row_per_method(demo_run):
    out, said = demo_run
    assert f"report: wrote {out / 'report.html'}" in said
    page = _page(out / "report.html")
    rep = json.loads((out / "report.json").read_text())
    assert [r[0]["text"] for r in page.table("results")["rows"]] == list(rep["runs"])
    (curves,) = [s for s in page.svgs if s["section"] == "curves"]
    assert "validation cluster mIoU (×100)" in {x.strip() for x in curves["text"]}   # the demo validates
    assert any(json.loads(ln).get("val_miou") is not None
               for ln in (out / "runs" / "OMH-seed0" / "log.jsonl").read_text().splitlines())
    text = (out / "report.html").read_text()
    assert "STEGO code + k-means: no masks" in text                           # said, not drawn
    grid_runs = [c["text"] for r in page.table("grid")["rows"] for c in r if c["tag"] == "th"]
    assert {t.split("seed")[0] for t in grid_runs} == {"OMH", "OMH w/o hierarchy", "STEGO baseline"}


def test_a_train_folder_with_its_eval_json(seeds_run, tmp_path):
    run_dir = tmp_path / "one"
    shutil.copytree(seeds_run[0] / "seed0", run_dir)
    (entry,) = report.read(run_dir)
    assert entry.kind == "train" and entry.runs[0].seed == 0 and "cluster" in entry.runs[0].scores
    out = report.run(report.ReportOptions(runs=(str(run_dir),), images=1), say=quiet)
    assert out == run_dir / "report.html" and _page(out).sections == list(report.SECTIONS)


def test_a_recipe_folder_shows_the_recipe_and_the_weights(seeds_run, tmp_path):
    run_dir = tmp_path / "coco_vits8"
    shutil.copytree(seeds_run[0], run_dir)
    (run_dir / "recipe.json").write_text(json.dumps({"recipe": "cocostuff27_vits8",
                                                     "file": "configs/cocostuff27_vits8.toml",
                                                     "settings": {"dataset": "cocostuff27", "eval_flip": True},
                                                     "options": {"root": "/data/coco"}}))
    (run_dir / "weights").mkdir()
    (run_dir / "weights" / "manifest.json").write_text(json.dumps(
        {"models": [{"file": "dino_vits8_224.onnx", "sha256": "ab" * 32, "checkpoint_sha256": "cd" * 32}]}))
    (entry,) = report.read(run_dir)
    assert entry.kind == "recipe" and entry.name == "cocostuff27_vits8"
    text = report.render([entry], images=1)
    for shown in ("[recipe] dataset", "cocostuff27", "/data/coco", "weights/dino_vits8_224.onnx", "ab" * 32, "cd" * 32):
        assert shown in text, shown
    sha = json.loads((run_dir / "seed1" / "eval.json").read_text())["key"]["checkpoint_sha256"]
    assert sha in text                                                        # every checkpoint's sha256


def test_the_grid_shows_the_images_feats_json_lists(seeds_run, data, tmp_path):
    """Where the validation split lists readable images, the grid's first column is the image
    (STEGO's crop at label resolution) and the overlay is drawn over it."""
    from PIL import Image

    from omh_ref.extract.images import load_rgb

    val = tmp_path / "val"
    shutil.copytree(data / "val", val)
    meta = json.loads((val / "feats.json").read_text())
    H = np.load(val / "labels.npy", mmap_mode="r").shape[1]
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for name in meta["images"]:
        Image.fromarray(rng.integers(0, 255, (H + 10, H + 4, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{name}.png")
    meta.update(images=[f"{n}.png" for n in meta["images"]], image_root=str(tmp_path / "imgs"))
    (val / "feats.json").write_text(json.dumps(meta))
    (entry,) = report.read(seeds_run[0])
    entry.val_features = val / "feats.npy"
    page = Page(report.render([entry], images=2))
    grid = page.table("grid")
    assert [c["text"] for c in grid["rows"][0]][:1] == [meta["images"][0]]           # named by its image
    first = [i for i in page.images if i["alt"].startswith("image ")]
    assert len(first) == 2
    import base64
    import io

    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(first[0]["src"].split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(shown, load_rgb(tmp_path / "imgs" / meta["images"][0], H))
    assert "principal components" not in report.render([entry], images=1)


# -- bad input, and no plotting library ---------------------------------------------------------
def test_a_folder_that_is_no_run_is_one_line_naming_it(tmp_path, seeds_run):
    (tmp_path / "empty").mkdir()
    for folder, want in ((tmp_path / "empty", "not an omh-ref run (expected results.json"),
                         (tmp_path / "nowhere", "no such folder (expected results.json")):
        with pytest.raises(InputError, match=re.escape(f"{folder}: {want}")):
            report.read(folder)
        res = CliRunner().invoke(main, ["report", str(folder)])
        assert res.exit_code == 2 and res.output.count("\n") == 1 and res.output.startswith(f"error: {folder}: ")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    with pytest.raises(InputError, match=re.escape(f"{bad / 'results.json'}: not readable as the results")):
        report.read(bad)
    (bad / "results.json").write_text(json.dumps({"runs": []}))
    with pytest.raises(InputError, match="not the results of omh-ref seeds"):
        report.read(bad)
    with pytest.raises(InputError, match="--out: several folders"):
        report.run(report.ReportOptions(runs=(str(seeds_run[0]), str(seeds_run[0]))), say=quiet)


def test_without_matplotlib_the_command_says_which_extra_in_one_line(monkeypatch, seeds_run, tmp_path):
    monkeypatch.setattr(report, "available", lambda: False)
    res = CliRunner().invoke(main, ["report", str(seeds_run[0]), "--out", str(tmp_path / "r.html")])
    assert res.exit_code == 2 and res.output.count("\n") == 1
    assert "needs matplotlib" in res.output and "pip install 'omh-ref[report]'" in res.output
    said = []
    assert report.write_after(seeds_run[0], say=said.append) is None
    (line,) = said
    assert "not written: it needs matplotlib" in line and f"omh-ref report {seeds_run[0]}" in line
    assert not (tmp_path / "r.html").exists()


def test_a_report_that_cannot_be_written_leaves_the_results_and_says_so(seeds_run, monkeypatch):
    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(report, "write_text", boom)
    said = []
    assert report.write_after(seeds_run[0], say=said.append) is None
    assert "No space left on device" in said[-1] and "tries again" in said[-1]


# -- what the folders hold is data, never markup nor maths ------------------------------------------
PAYLOAD = '"><img src=x onerror=alert(1)>'


def _copy(seeds_run, tmp_path, name="omh"):
    """A copy of the seeds folder to edit (its report.html left out)."""
    d = tmp_path / name
    shutil.copytree(seeds_run[0], d)
    (d / "report.html").unlink()
    return d


def _edit(path, change):
    rec = json.loads(path.read_text())
    change(rec)
    path.write_text(json.dumps(rec))


def test_a_sort_key_is_escaped_in_its_attribute():
    assert report._cell("x", PAYLOAD) == '<td class="num" data-v="&quot;&gt;&lt;img src=x onerror=alert(1)&gt;">x</td>'
    assert report._cell(3, 3) == '<td class="num" data-v="3">3</td>'


@pytest.mark.parametrize("part, field", [("levels", "level"), ("levels", "clusters"), ("levels", "n_classes"),
                                         ("consistency", "child"), ("consistency", "parent")])
def test_a_level_field_that_is_no_integer_is_one_line_naming_the_file(seeds_run, tmp_path, part, field):
    """level, clusters, n_classes and a plan's child and parent go into the page's sort keys and
    the tree's layout: eval.json's must be integers (a string of one is taken), else the report is
    one line naming the file and the field, and no page is written."""
    d = _copy(seeds_run, tmp_path)
    _edit(d / "seed1" / "eval.json", lambda j: j["levels"][part][0].__setitem__(field, PAYLOAD))
    want = f"{d / 'seed1' / 'eval.json'}: {part}[0].{field} is "
    with pytest.raises(InputError, match=re.escape(want) + ".*expected an integer"):
        report.read(d)
    res = CliRunner().invoke(main, ["report", str(d)])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and want in res.output
    said = []
    assert report.write_after(d, say=said.append) is None
    (line,) = said
    assert want in line and f"omh-ref report {d}" in line
    assert not (d / "report.html").exists()
    _edit(d / "seed1" / "eval.json", lambda j: j["levels"][part][0].__setitem__(field, "1"))    # "1": an integer
    (entry,) = report.read(d)
    assert entry.runs[1].levels[part][0][field] == 1


def test_a_demos_class_count_that_is_no_integer_is_one_line_naming_the_file(demo_run, tmp_path):
    """A demo's report.json without class names names its classes 0..n_classes-1: n_classes must be
    an integer (a string of one is taken), else one line naming the file and the field."""
    d = tmp_path / "demo"
    shutil.copytree(demo_run[0], d)
    _edit(d / "report.json", lambda j: (j.pop("class_names", None), j.__setitem__("n_classes", "nine")))
    with pytest.raises(InputError, match=re.escape(f"{d / 'report.json'}: n_classes is \"nine\", expected an integer")):
        report.read(d)
    _edit(d / "report.json", lambda j: j.__setitem__("n_classes", "3"))
    assert {tuple(e.class_names) for e in report.read(d)} == {("0", "1", "2")}


def test_the_sort_keys_and_names_in_a_page_are_text_not_markup(seeds_run, tmp_path):
    """Whatever a folder's records hold reaches the page as text: a payload in the fields that
    become sort keys (put there past the reading's checks) and in the names stays an attribute's
    value or a cell's text, never an element."""
    d = _copy(seeds_run, tmp_path)
    (entry,) = report.read(d)
    entry.runs[0].levels["levels"][0]["n_classes"] = PAYLOAD
    entry.runs[0].levels["consistency"][0]["child"] = PAYLOAD
    entry.name = PAYLOAD
    entry.class_names = ["<script>alert(1)</script>"] + entry.class_names[1:]
    text = report.render([entry], images=1)
    assert PAYLOAD not in text and "<script>alert" not in text and "<img src=x" not in text
    page = Page(text)
    assert [i["src"] for i in page.images if not i["src"].startswith("data:")] == []
    assert not [a for a in page.attrs if a[1].startswith("on")]
    levels, consistency = page.table("levels"), page.table("consistency")
    assert levels["rows"][0][4]["v"] == PAYLOAD and levels["rows"][0][4]["text"] == PAYLOAD
    assert consistency["rows"][0][1]["v"] == PAYLOAD
    assert page.table("results")["rows"][0][0]["text"] == PAYLOAD


def test_a_dollar_in_a_name_is_text_not_maths(seeds_run, tmp_path):
    """Class and run names with "$" are drawn as they are ("$5 or $6" is no maths, "$\\foo$" no
    error), and the drawing leaves matplotlib's settings as they were."""
    import matplotlib

    d = _copy(seeds_run, tmp_path, name=r"x$\foo$")
    (entry,) = report.read(d)
    entry.class_names = ["$5 or $6", r"$\foo$"] + entry.class_names[2:]
    page = Page(report.render([entry], images=1))
    for svg in page.svgs:
        if svg["section"] == "per-class":
            assert {"$5 or $6", r"$\foo$"} <= {x.strip() for x in svg["text"]}, svg["label"]
            assert r"x$\foo$" in {x.strip() for x in svg["text"]}                  # the legend names the run
    (tree,) = [s for s in page.svgs if (s["label"] or "").startswith("hierarchy tree")]
    assert any(x.startswith(r"x$\foo$, seed") for x in tree["text"])
    assert matplotlib.rcParams["text.parse_math"] is True
    assert report.write_after(d, say=quiet) == d / "report.html"


def test_a_report_that_fails_for_any_reason_is_one_line_and_the_job_stands(seeds_run, monkeypatch, data, tmp_path):
    """write_after (the end of seeds, recipe and demo) turns any error of the report into one line:
    not written, the error's type and message (cut short, on one line), the command to try again."""
    def boom(*a, **k):
        raise ValueError("\nUnknown symbol: \\foo\n" + "x" * 2000)
    monkeypatch.setattr(report, "render", boom)
    said = []
    assert report.write_after(seeds_run[0], say=said.append) is None
    (line,) = said
    assert "\n" not in line and len(line) < report.WHY_CHARS + 300
    assert f"{seeds_run[0] / 'report.html'} not written (ValueError: Unknown symbol: \\foo xxx" in line
    assert "…)" in line and line.endswith(f"omh-ref report {seeds_run[0]} tries again")
    # a job ends with its results and that line, not a traceback
    out, said = _seeds(data, tmp_path / "job", seed_list=(0,))
    assert (out / "results.json").is_file() and not (out / "report.html").exists()
    assert any(x.startswith(f"report: {out / 'report.html'} not written (ValueError:") for x in said)


def test_a_figure_that_cannot_be_drawn_is_a_note_and_a_line_and_the_page_stands(seeds_run, monkeypatch, tmp_path):
    """A record a figure cannot draw (a matched class that is no number), or matplotlib failing on
    every figure: each figure lost is a note in its place and one line said, a section that cannot
    be made (the grid, from the same record) likewise, and the rest of the page is written."""
    d = _copy(seeds_run, tmp_path)
    top = ["levels", "levels", -1, "scores", "many_to_one", "cluster_to_class"]
    _edit(d / "seed0" / "eval.json", lambda j: j[top[0]][top[1]][top[2]][top[3]][top[4]][top[5]].__setitem__(0, "x"))
    said = []
    assert report.write_after(d, say=said.append) == d / "report.html"
    assert [x.split(" (")[0] for x in said] == ["report: hierarchy tree of omh not drawn",
                                               "report: section 'Qualitative grid' not drawn",
                                               f"report: wrote {d / report.NAME}"]
    assert said[0].startswith("report: hierarchy tree of omh not drawn (TypeError: ") and "\n" not in "".join(said)
    page = _page(d / "report.html")
    assert page.sections == list(report.SECTIONS) and len(page.table("levels")["rows"]) == 3
    assert not [s for s in page.svgs if (s["label"] or "").startswith("hierarchy tree")]
    assert len([s for s in page.svgs if s["section"] == "per-class"]) == 2 and page.table("results")["rows"]
    text = (d / "report.html").read_text()
    assert "hierarchy tree of omh not drawn (TypeError: " in text and "Qualitative grid&#x27; not drawn (" in text
    # matplotlib failing on every figure: every table is there, each figure a note
    def boom(*a, **k):
        raise ValueError("matplotlib\nsaid no")
    monkeypatch.setattr(report._Plots, "svg", boom)
    said = []
    out = report.run(report.ReportOptions(runs=(str(seeds_run[0]),), out=str(tmp_path / "p.html"), images=1),
                     say=said.append)
    assert said == [f"report: {w} not drawn (ValueError: matplotlib said no)" for w in
                    ("cluster IoU per class", "linear IoU per class", "every level's mIoU against its granularity",
                     "hierarchy tree of omh", "training and validation curves")]
    page = _page(out)
    assert page.svgs == [] and page.sections == list(report.SECTIONS)
    assert {t["class"].split()[-1] for t in page.tables} >= {"results", "per-seed", "levels", "consistency", "grid"}
    assert out.read_text().count("not drawn (ValueError: matplotlib said no)") == 5


def test_a_seed_whose_score_is_nan_is_left_out_of_the_mean_and_the_page_says_so(seeds_run, tmp_path):
    """A seed's NaN score: the mean and std are of the other seeds, and the cell says so (its
    "seeds" column and results.json's NaN mean would read otherwise); the seed's cell says NaN."""
    d = _copy(seeds_run, tmp_path)
    _edit(d / "results.json", lambda j: j["runs"][0]["cluster"].__setitem__("miou", float("nan")))
    other = json.loads((d / "results.json").read_text())["runs"][1]["cluster"]["miou"]
    page = Page(report.render(report.read(d), images=1))
    t = page.table("results")
    (row,) = t["rows"]
    col = t["head"].index("cluster mIoU (mean ± std)")
    assert row[1]["text"] == "2"
    assert row[col]["text"] == f"{other:.2f} ± 0.00 (mean of 1 of 2 seeds)"
    assert float(row[col]["v"]) == pytest.approx(other, rel=1e-5)
    acc = t["head"].index("cluster acc (mean ± std)")
    assert "of 2 seeds" not in row[acc]["text"]                              # the finite ones as before
    per_seed = page.table("per-seed")
    (seed0,) = [r for r in per_seed["rows"] if r[1]["v"] == "0"]
    cell = seed0[per_seed["head"].index("cluster mIoU")]
    assert cell["text"] == "NaN" and cell["v"] == ""                       # sorts last, as a missing one
    text = report.render(report.read(d), images=1)
    assert "<em>mean of k of N seeds</em> leaves out the seeds whose score is missing or not a number" in text


def test_validation_features_without_labels_leave_out_the_grid_alone(seeds_run, data, tmp_path):
    """A validation split whose feats.json names no labels: the page is written, every section but
    the grid as before, and the grid's section says why it is not there."""
    val = tmp_path / "val"
    shutil.copytree(data / "val", val)
    _edit(val / "feats.json", lambda j: j.pop("labels"))
    d = _copy(seeds_run, tmp_path)
    for s in ("seed0", "seed1"):
        _edit(d / s / "eval.json", lambda j: j["key"].__setitem__("features", str(val / "feats.npy")))
    _edit(d / "results.json", lambda j: j["options"].__setitem__("val_features", str(val / "feats.npy")))
    out = report.run(report.ReportOptions(runs=(str(d),), images=2), say=quiet)
    page = _page(out)
    assert page.sections == list(report.SECTIONS)
    assert not [i for i in page.images if i["section"] == "qualitative"]
    text = out.read_text()
    assert (f"No qualitative grid: it draws each image's label and every level's clusters as their matched classes, "
            f"and the validation split has no labels ({val / 'feats.npy'}: its feats.json names no labels file)") \
        in text
    assert len(page.table("levels")["rows"]) == 3 and page.table("results")["rows"]
    # beside a run whose split has labels: the grid from that one, this run's masks left out with a note
    out = report.run(report.ReportOptions(runs=(str(d), str(seeds_run[0])), out=str(tmp_path / "two.html"),
                                          images=2), say=quiet)
    page = _page(out)
    grid_runs = [c["text"] for r in page.table("grid")["rows"] for c in r if c["tag"] == "th"]
    assert [t.split(" (")[0].split("seed")[0] for t in grid_runs] == ["omh"] * 2
    assert "its feats.json names no labels file" in out.read_text()


# -- each base's loss in the curves ------------------------------------------------------------------
def _curve_panels(text) -> dict:
    """{panel title: the colours of the lines drawn in it} of a page's curves figure (each axes
    group of the SVG, its title the last text in it; the legend left out)."""
    svg = re.search(r'<section id="curves">.*?</section>', text, flags=re.S).group(0)
    cuts = [m.start() for m in re.finditer(r'<g id="f\d+-(?:axes|legend)_\d+"', svg)] + [len(svg)]
    panels = {}
    for a, b in zip(cuts, cuts[1:]):
        chunk = svg[a:b]
        texts = re.findall(r"<text[^>]*>([^<]*)</text>", chunk)
        if "-axes_" in chunk[:30] and texts:
            panels[texts[-1].strip()] = set(re.findall(r"stroke: (#[0-9a-f]{6})", chunk))
    return panels


def test_each_runs_curves_show_its_own_bases_loss(seeds_run, smooseg_run, tmp_path):
    """The base's loss in the curves is the run's base's part (its LOSS_PART: STEGO's corr, SmooSeg's
    smooth), the base read from the run's config (results.json's, else the checkpoint's; STEGO for a
    config from before the bases): a panel per base, titled by it, holding that base's runs only."""
    import matplotlib.colors

    from omh_ref.core.bases import smooseg, stego

    log = [json.loads(x) for x in (smooseg_run[0] / "seed0" / "log.jsonl").read_text().splitlines()]
    assert all(smooseg.LOSS_PART in x and stego.LOSS_PART not in x for x in log if "loss" in x)
    blue, orange = (matplotlib.colors.to_hex(c) for c in report._Plots().colours(2))
    corr, smooth = "stego base loss (corr)", "smooseg base loss (smooth)"
    st = _copy(seeds_run, tmp_path, name="stego")           # its log given a part named as SmooSeg's loss
    lines = (st / "seed0" / "log.jsonl").read_text().splitlines()
    (st / "seed0" / "log.jsonl").write_text("".join(json.dumps(dict(json.loads(x), smooth=1.0)) + "\n" for x in lines))
    panels = _curve_panels(report.render(report.read(st) + report.read(smooseg_run[0]), images=0))
    assert panels[corr] & {blue, orange} == {blue} and panels[smooth] & {blue, orange} == {orange}
    assert panels["loss (total)"] >= {blue, orange}
    assert not {"correlation loss", "corr", "smooth"} & set(panels)
    # the base from the checkpoint where results.json records no config
    d = _copy(smooseg_run, tmp_path, name="no_config")
    _edit(d / "results.json", lambda j: j.pop("config"))
    (entry,) = report.read(d)
    assert entry.config["base"] == "smooseg"
    panels = _curve_panels(report.render([entry], images=0))
    assert smooth in panels and blue in panels[smooth] and corr not in panels
    # a config from before the bases (no "base" field) is STEGO's
    d = _copy(seeds_run, tmp_path, name="old_config")
    _edit(d / "results.json", lambda j: j["config"].pop("base"))
    panels = _curve_panels(report.render(report.read(d), images=0))
    assert corr in panels and blue in panels[corr]
    # a base this omh-ref does not know: every base part its log holds, under its own name
    d = _copy(smooseg_run, tmp_path, name="unknown_base")
    _edit(d / "results.json", lambda j: j["config"].__setitem__("base", "later"))
    panels = _curve_panels(report.render(report.read(d), images=0))
    assert blue in panels["smooth"] and corr not in panels and smooth not in panels


# -- in a browser -------------------------------------------------------------------------------
def _browser(**kw):
    """A Browser; a skip that says why where Chromium is installed but cannot start here at all
    (one that starts and then fails, or a page with errors, fails the test)."""
    try:
        return browser.Browser(**kw)
    except browser.NotStarted as e:
        pytest.skip(f"chromium is installed but does not start here: {e}")


@pytest.mark.skipif(browser.missing() is not None, reason=str(browser.missing()))
def test_the_report_renders_in_headless_chromium(demo_run, seeds_run, tmp_path):
    """The demo's page in Chromium: it loads from disk with no console error and no request but
    its own file and inline pictures, every section and legend is there and visible, a click sorts a
    table, and a full-page screenshot is taken. A page whose records hold markup shows it as text.
    A page with a script error fails the same checks."""
    page = demo_run[0] / "report.html"
    with _browser(width=1280, height=900) as b:
        b.open(page.as_uri())
        assert b.errors == []
        assert b.requests and all(u.startswith(("file:", "data:")) for u in b.requests), b.requests
        shown = b.evaluate("""Array.from(document.querySelectorAll('main > section')).map(function (s) {
            var r = s.getBoundingClientRect(); return [s.id, s.querySelector('h2').textContent, r.height > 50]; })""")
        assert shown == [[k, v, True] for k, v in report.SECTIONS.items()]
        legend = b.evaluate("""(function () { var l = document.getElementById('legend');
            return [l.getBoundingClientRect().height, l.querySelectorAll('li').length]; })()""")
        assert legend[0] > 20 and legend[1] >= 9 + 18 + 1                       # classes, parts, ignore
        svg_legends = b.evaluate("""Array.from(document.querySelectorAll('svg.plot')).map(function (s) {
            return [s.getAttribute('aria-label'), s.querySelector('g[id$="legend_1"]') !== null,
                    s.getBoundingClientRect().width > 300]; })""")
        per_class = [x for x in svg_legends if x[0].endswith("IoU per class")]
        assert len(per_class) == 2 and all(x[1] and x[2] for x in per_class), svg_legends
        assert all(x[2] for x in svg_legends)
        broken = b.evaluate("Array.from(document.images).filter(function (i) { return !i.complete || "
                            "i.naturalWidth === 0; }).length")
        assert broken == 0
        column = "cluster mIoU (mean ± std)"
        order = """(function () { var t = document.querySelector('table.results');
            return Array.from(t.tBodies[0].rows).map(function (r) { return Number(r.cells[IDX].dataset.v); }); })()"""
        idx = b.evaluate(f"""Array.from(document.querySelectorAll('table.results thead th')).map(function (h) {{
            return h.textContent; }}).indexOf({json.dumps(column)})""")
        assert idx > 1
        b.evaluate(f"document.querySelectorAll('table.results thead th')[{idx}].click()")
        up = b.evaluate(order.replace("IDX", str(idx)))
        b.evaluate(f"document.querySelectorAll('table.results thead th')[{idx}].click()")
        down = b.evaluate(order.replace("IDX", str(idx)))
        assert up == sorted(up) and down == sorted(up, reverse=True) and len(up) == 4
        w, h = b.screenshot(tmp_path / "report.png")
        assert w == 1280 and h > 3000
        from PIL import Image

        with Image.open(tmp_path / "report.png") as im:
            assert np.asarray(im.convert("L")).std() > 10                        # not a blank page
        assert b.errors == []
        # markup in a folder's records: text and attribute values in the browser too
        (entry,) = report.read(_copy(seeds_run, tmp_path))
        entry.runs[0].levels["levels"][0]["n_classes"] = PAYLOAD
        entry.name = PAYLOAD
        injected = tmp_path / "injected.html"
        injected.write_text(report.render([entry], images=1))
        b.open(injected.as_uri())
        assert b.evaluate("""[document.querySelectorAll('img:not([src^="data:"]), [onerror]').length,
            document.querySelector('table.levels tbody tr').cells[4].dataset.v,
            document.querySelector('table.results tbody th').textContent]""") == [0, PAYLOAD, PAYLOAD]
        assert b.errors == [] and all(u.startswith(("file:", "data:")) for u in b.requests)
        # the checks can fail: a page with a script error and a remote picture
        bad = tmp_path / "bad.html"
        bad.write_text("<!DOCTYPE html><html><body><img src='http://127.0.0.1:9/x.png'>"
                       "<script>undefinedFunction();</script></body></html>")
        b.open(bad.as_uri())
        assert any("undefinedFunction" in e for e in b.errors)
        assert any(u.startswith("http:") for u in b.requests)


# -- the browser driver: a Chromium that cannot start, or fails once started, leaves nothing ----------
FAKE = """#!/bin/sh
# a stand-in for chromium: MODE exit (fails at once), silent (never opens a port), noport (a port
# nobody listens on); in each, a child process of its own that must end with it
for a in "$@"; do case "$a" in --user-data-dir=*) dir="${a#--user-data-dir=}";; esac; done
sleep 300 &
echo $! > "$PIDS/child"
echo $$ > "$PIDS/main"
echo "fake chromium: mode $MODE" >&2
case "$MODE" in
  exit) exit 3;;
  noport) printf '%s\n/devtools/browser/fake\n' "$PORT" > "$dir/DevToolsActivePort";;
esac
exec sleep 300
"""


def _alive(pid) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc to see the processes end")
@pytest.mark.parametrize("mode", ["exit", "silent", "noport"])
def test_a_browser_that_fails_to_start_leaves_no_process_nor_folder(mode, tmp_path, monkeypatch):
    """A Chromium that exits at once or opens no port is NotStarted (the browser test's skip, with
    its log's words); one that opens a port it does not serve is an error (a failure); in each,
    Chromium and its children are ended and its profile folder and log removed."""
    pytest.importorskip("websocket")
    import socket
    import tempfile
    import time

    fake = tmp_path / "chromium"
    fake.write_text(FAKE)
    fake.chmod(0o755)
    (tmp_path / "pids").mkdir()
    (tmp_path / "tmp").mkdir()
    with socket.socket() as sock:          # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("OMH_REF_CHROMIUM", str(fake))
    monkeypatch.setenv("MODE", mode)
    monkeypatch.setenv("PIDS", str(tmp_path / "pids"))
    monkeypatch.setenv("PORT", str(port))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    assert browser.missing() is None
    start = time.monotonic()
    if mode == "noport":
        with pytest.raises(RuntimeError, match="chromium started but could not be driven") as got:
            _browser(timeout=2)
        assert not isinstance(got.value, browser.NotStarted)
    else:
        with pytest.raises(pytest.skip.Exception, match="chromium is installed but does not start here") as got:
            _browser(timeout=2)
        why = "exited with status 3" if mode == "exit" else "opened no DevTools port within 2 s"
        assert why in str(got.value) and "fake chromium: mode " + mode in str(got.value)
    assert time.monotonic() - start < 15
    pids = [int((tmp_path / "pids" / n).read_text()) for n in ("main", "child")]
    end = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert not [p for p in pids if _alive(p)]
    assert list((tmp_path / "tmp").iterdir()) == []                          # profile folder and log gone

