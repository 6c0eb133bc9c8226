"""``omh-ref extract``: onnxruntime features of real image files, checked against the torch forward of
the same (randomly initialised, DINO-layout) ViT, plus resume, skip/fail, five-crop, flip, the
dataset layouts and Dask.

Small models keep it fast: ViT-S/16 at 32 px (2x2 grid) for the mechanics; one ViT-S/8 at 224 px
(the real backbone's 28x28 grid) for the numerical comparison with torch.
"""
import errno
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from omh_ref.extract import backbone
from omh_ref.extract import images as ex_images
from omh_ref.extract import job as ex
from omh_ref.extract import datasets
from omh_ref.extract.images import five_crops, stego_crop
from omh_ref.features import meta as feats_meta
from omh_ref.features.store import FeatureStore
from omh_ref.core.errors import InputError

from tests import layouts

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOL = 1e-4


def _export_script():
    from omh_ref.extract import export_dino

    return export_dino


def _export(tmp_path_factory, patch, resolution, seed):
    ed = _export_script()
    torch.manual_seed(seed)
    model = ed.build_vit("vit_small", patch)
    path = ed.export(model, resolution, tmp_path_factory.mktemp(f"onnx{patch}_{resolution}"))
    return path, model


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """ViT-S/16 exported at 32 px: (path, torch model)."""
    return _export(tmp_path_factory, 16, 32, seed=3)


def _torch_input(rgb_crops):
    """STEGO's ToTensor + Normalize written in torch (independent of omh_ref.extract.backbone.normalize)."""
    t = torch.from_numpy(np.stack(rgb_crops)).permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (t - mean) / std


def _torch_feats(model, rgb_crops, flip=False):
    x = _torch_input(rgb_crops)
    if flip:
        x = x.flip(dims=[3])
    with torch.no_grad():
        return model(x).numpy()


def _opts(model, out, **kw):
    kw.setdefault("progress", False)
    return ex.ExtractOptions(model=str(model), out=str(out), **kw)


def _run(ds, opts):
    return ex.extract(ds, opts, log=lambda *_: None)


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


# ---- numerics --------------------------------------------------------------------------------------
def test_normalize_matches_torch_bitwise():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert np.array_equal(backbone.normalize(rgb), _torch_input(list(rgb)).numpy())


def test_vit_s8_224_features_match_torch(tmp_path, tmp_path_factory):
    """The extraction check: a random ViT-S/8 exported by omh-ref export, features extracted
    from image files by onnxruntime, equal to the torch forward within 1e-4."""
    path, model = _export(tmp_path_factory, 8, 224, seed=0)
    truth = layouts.folder(tmp_path, n=3, labels=False, nested=False)
    for rel in truth:   # larger than 224 so the short-side resize and crop both act
        img = Image.open(tmp_path / "images" / rel).resize((300, 260))
        img.save(tmp_path / "images" / rel)
    ds = datasets.folder(tmp_path / "images")
    meta = _run(ds, _opts(path, tmp_path / "out", dtype="float32", batch_size=2))
    got = np.load(tmp_path / "out" / "feats.npy", mmap_mode="r")
    assert got.shape == (3, 28, 28, 384) and got.dtype == np.float32
    crops = [np.asarray(stego_crop(Image.open(it.image).convert("RGB"), 224)) for it in ds.items]
    want = _torch_feats(model, crops)
    assert np.abs(got - want).max() <= TOL
    assert (meta["resolution"], meta["patch"], meta["grid"], meta["dim"]) == (224, 8, [28, 28], 384)


def test_folder_outputs_and_metadata(tmp_path, small):
    path, model = small
    truth = layouts.folder(tmp_path, n=5)
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    meta = _run(ds, _opts(path, tmp_path / "out", flip=True, batch_size=2, chunk_size=2))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["feats.json", "feats.npy", "feats_flip.json",
                                                     "feats_flip.npy", "labels.npy"]
    store = FeatureStore(out / "feats.npy", labels=out / "labels.npy")   # validates feats.json too
    assert (store.N, store.h, store.w, store.C, store.dtype) == (5, 2, 2, 384, np.float16)
    assert store.labels.dtype == np.uint8 and store.labels.shape == (5, 32, 32)
    names = sorted(truth)
    crops = [np.asarray(stego_crop(Image.fromarray(truth[n][0]), 32)) for n in names]
    feats = np.asarray(store.feats, dtype=np.float32)
    assert np.abs(feats - _torch_feats(model, crops)).max() <= 2e-3 * np.abs(feats).max()  # float16 rows
    flip = np.load(out / "feats_flip.npy").astype(np.float32)
    assert np.abs(flip - _torch_feats(model, crops, flip=True)).max() <= 2e-3 * np.abs(flip).max()
    assert not np.allclose(flip, feats, atol=1e-2)
    for i, n in enumerate(names):   # labels: the same crop, values kept (folder), 255 ignore
        assert (store.labels[i] == np.asarray(stego_crop(Image.fromarray(truth[n][1]), 32))).all()
    assert set(feats_meta.FIELDS) <= set(meta) and meta["format"] == feats_meta.FORMAT   # the one schema
    assert meta["images"] == names and meta["image_root"] == str((tmp_path / "images").resolve())
    assert meta["onnx_sha256"] == backbone.file_sha256(path) and meta["dtype"] == "float16"
    assert json.loads((out / "feats.json").read_text()) == meta
    assert meta["skipped"] == [] and meta["flipped"] == "feats_flip.npy" and meta["labels"] == "labels.npy"


def test_five_crop_rows_and_labels(tmp_path, small):
    path, model = small
    truth = layouts.folder(tmp_path, n=2, nested=False)
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    meta = _run(ds, _opts(path, tmp_path / "out", crop="five", batch_size=5, dtype="float32"))
    feats = np.load(tmp_path / "out" / "feats.npy")
    labels = np.load(tmp_path / "out" / "labels.npy")
    assert feats.shape == (10, 2, 2, 384) and labels.shape == (10, 32, 32)
    assert meta["images"][:5] == [f"img0.png#{c}" for c in ("tl", "tr", "bl", "br", "c")]
    for i, n in enumerate(sorted(truth)):
        rgb, raw = truth[n]
        crops = [np.asarray(stego_crop(c, 32)) for c in five_crops(Image.fromarray(rgb))]
        assert np.abs(feats[5 * i:5 * i + 5] - _torch_feats(model, crops)).max() <= TOL
        for j, c in enumerate(five_crops(Image.fromarray(raw))):
            assert (labels[5 * i + j] == np.asarray(stego_crop(c, 32))).all()


@pytest.mark.parametrize("name", ["cocostuff27", "cityscapes27", "potsdam3"])
def test_each_dataset_layout_through_the_cli(tmp_path, small, name):
    from omh_ref_cli.main import main

    path, _ = small
    builder = {"cocostuff27": layouts.coco, "cityscapes27": layouts.cityscapes, "potsdam3": layouts.potsdam}[name]
    truth = builder(tmp_path / "data", "val")
    res = CliRunner().invoke(main, ["extract", "--model", str(path), "--dataset", name, "--root",
                                    str(tmp_path / "data"), "--split", "val", "--out", str(tmp_path / "out"),
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "out" / "feats.json").read_text())
    ds = datasets.open_dataset(name, tmp_path / "data", "val")
    labels = np.load(tmp_path / "out" / "labels.npy")
    assert meta["dataset"] == name and meta["n_classes"] == ds.n_classes and len(meta["class_names"]) == ds.n_classes
    assert np.load(tmp_path / "out" / "feats.npy").shape == (len(truth), 2, 2, 384)
    for i, it in enumerate(ds.items):
        want = ds.lut[np.asarray(stego_crop(Image.fromarray(truth[it.name][1]), 32))]
        assert (labels[i] == want).all()
    assert set(np.unique(labels)) <= set(range(ds.n_classes)) | {255}
    # the finer labels are kept where the data set has them (COCO's 182 ids, Potsdam's 6 classes),
    # and feats.json names the hierarchy that ties them to the classes
    hier = meta["label_hierarchy"]
    assert [g["name"] for g in hier] == [g["name"] for g in datasets.label_hierarchy(name)]
    if name == "cityscapes27":
        assert meta["labels_fine"] is None and not (tmp_path / "out" / "labels_fine.npy").exists()
        return
    fine = np.load(tmp_path / "out" / "labels_fine.npy")
    assert meta["labels_fine"] == "labels_fine.npy" and fine.shape == labels.shape
    for i, it in enumerate(ds.items):
        raw = np.asarray(stego_crop(Image.fromarray(truth[it.name][1]), 32))
        assert (fine[i] == ds.fine_lut[raw]).all()
    known = fine != 255
    assert known.any() and (np.asarray(hier[0]["parent"])[fine[known]] == labels[known]).all()


@pytest.mark.parametrize("name,crop", [("potsdam3", "center"), ("potsdam3", "five"), ("folder", "five")])
def test_eval_finds_each_rows_image_crop(tmp_path, small, name, crop):
    """What ``eval`` shows and refines with the CRF for row i (``image_paths`` + ``load_rgb``) is
    exactly the crop extraction fed the backbone for row i: .mat images and five-crop rows too."""
    from omh_ref.extract.images import image_paths, load_rgb, split_crop

    path, _ = small
    if name == "folder":
        layouts.folder(tmp_path / "data", n=3)
        ds = datasets.folder(tmp_path / "data" / "images", tmp_path / "data" / "labels")
    else:
        layouts.potsdam(tmp_path / "data", "val", float_images=True)
        ds = datasets.open_dataset(name, tmp_path / "data", "val")
    meta = _run(ds, _opts(path, tmp_path / "out", crop=crop))
    paths = image_paths(meta, tmp_path / "out" / "feats.npy")
    want = [c[0] for it in ds.items for c in ex_images.crops(*ds.load(it), crop, 32)]
    assert paths is not None and len(paths) == len(want) == meta["shape"][0]
    for p, w in zip(paths, want):
        assert (load_rgb(p, 32) == w).all()
    assert load_rgb(Path(f"{split_crop(paths[0])[0]}#zz"), 32) is None   # not a crop tag: no such file


# ---- robustness: skip / fail, resume, settings ------------------------------------------------------
def _corrupt(path):
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n not really")


def test_skip_leaves_the_image_out_and_names_it(tmp_path, small):
    path, _ = small
    layouts.folder(tmp_path, n=5, labels=True, nested=False)
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    ref = _run(datasets.folder(tmp_path / "images", tmp_path / "labels"),
               _opts(path, tmp_path / "ref", dtype="float32", batch_size=2, chunk_size=2))
    _corrupt(tmp_path / "images" / "img2.png")
    logs = []
    meta = ex.extract(ds, _opts(path, tmp_path / "out", dtype="float32", batch_size=2, chunk_size=2,
                                on_error="skip"), log=logs.append)
    assert any("skipped:" in m and "img2.png" in m for m in logs)
    assert logs[-1].startswith("skipped 1 of 5 image(s)") and logs[-1].endswith(": img2.png")
    assert [s["image"] for s in meta["skipped"]] == ["img2.png"] and "cannot read image" in meta["skipped"][0]["error"]
    assert meta["images"] == [n for n in ref["images"] if n != "img2.png"]
    keep = [0, 1, 3, 4]
    for f in ("feats.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "out" / f), np.load(tmp_path / "ref" / f)[keep])
    assert not list((tmp_path / "out").glob("*partial*")) and not (tmp_path / "out" / ex.PROGRESS).exists()


@pytest.mark.parametrize("labels", [True, False])
def test_by_default_labelled_extraction_stops_at_a_bad_file_and_a_bare_folder_skips(tmp_path, small, labels):
    """A benchmark must not shrink unseen: with labels a bad image (or label map) stops the run in
    one line saying how to skip it; a folder of photos without labels leaves it out and says so."""
    path, _ = small
    layouts.folder(tmp_path, n=4, labels=labels, nested=False)
    if labels:   # the user's case: one label map of the wrong size
        Image.fromarray(np.zeros((5, 5), np.uint8), "L").save(tmp_path / "labels" / "img1.png")
    else:
        _corrupt(tmp_path / "images" / "img1.png")
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels" if labels else None)
    if labels:
        with pytest.raises(InputError, match=r"img1.png: label map is 5x5 px .* --on-error skip leaves it out"):
            _run(ds, _opts(path, tmp_path / "out"))
    else:
        assert [s["image"] for s in _run(ds, _opts(path, tmp_path / "out"))["skipped"]] == ["img1.png"]


def test_fail_names_the_file_and_resume_redoes_only_what_is_left(tmp_path, small, monkeypatch):
    path, _ = small
    layouts.folder(tmp_path, n=7, labels=True, nested=False)
    good = (tmp_path / "images" / "img5.png").read_bytes()
    opts = dict(dtype="float32", batch_size=2, chunk_size=2)   # chunks: [0,1] [2,3] [4,5] [6]
    _run(datasets.folder(tmp_path / "images", tmp_path / "labels"), _opts(path, tmp_path / "ref", **opts))
    _corrupt(tmp_path / "images" / "img5.png")
    ran = []
    real = ex.run_chunk
    monkeypatch.setattr(ex, "run_chunk", lambda t, **kw: ran.append(t.chunk) or real(t, **kw))
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    with pytest.raises(InputError, match=r"img5.png: cannot read image .*extraction stops at an unreadable image"):
        _run(ds, _opts(path, tmp_path / "out", on_error="fail", **opts))
    progress = json.loads((tmp_path / "out" / ex.PROGRESS).read_text())
    assert sorted(progress["done"]) == ["0", "1"] and ran == [0, 1, 2]
    (tmp_path / "images" / "img5.png").write_bytes(good)      # the user repairs the file
    ran.clear()
    _run(ds, _opts(path, tmp_path / "out", on_error="fail", **opts))
    assert ran == [2, 3]                                       # chunks 0 and 1 are not redone
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_interrupt_then_resume_is_byte_identical(tmp_path, small, monkeypatch):
    path, _ = small
    layouts.folder(tmp_path, n=6, labels=True)
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    opts = dict(flip=True, batch_size=2, chunk_size=2)
    _run(ds, _opts(path, tmp_path / "ref", **opts))
    real, calls = ex.run_chunk, []

    def interrupted(task, on_batch=None):
        calls.append(task.chunk)
        if len(calls) == 2:           # Ctrl-C in the middle of the second chunk, after one batch
            real(ex.ChunkTask(task.chunk, task.items[:1], task.dataset, task.opts, task.backbone, task.files))
            raise KeyboardInterrupt
        return real(task, on_batch=on_batch)

    monkeypatch.setattr(ex, "run_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"^1 of 3 chunk\(s\) are recorded in .*extract.progress.json "
                                                r"\(their rows are on disk\); the same command continues"):
        _run(ds, _opts(path, tmp_path / "out", **opts))
    assert not (tmp_path / "out" / "feats.npy").exists()
    monkeypatch.setattr(ex, "run_chunk", real)
    _run(ds, _opts(path, tmp_path / "out", **opts))
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_settings_are_pinned_and_finished_output_protected(tmp_path, small, monkeypatch):
    path, _ = small
    layouts.folder(tmp_path, n=4, labels=False)
    ds = datasets.folder(tmp_path / "images")
    monkeypatch.setattr(ex, "run_chunk", lambda t, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(ds, _opts(path, tmp_path / "out", batch_size=2))
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"unfinished extraction with other settings \(dtype differ\)"):
        _run(ds, _opts(path, tmp_path / "out", batch_size=2, dtype="float32"))
    _run(ds, _opts(path, tmp_path / "out", batch_size=2, dtype="float32", overwrite=True))
    assert np.load(tmp_path / "out" / "feats.npy").dtype == np.float32
    with pytest.raises(InputError, match=r"already holds extracted features .*--overwrite"):
        _run(ds, _opts(path, tmp_path / "out", batch_size=2))


def _interrupt_after(monkeypatch, n_chunks):
    """run_chunk raises KeyboardInterrupt once ``n_chunks`` chunks have run; returns the chunks run."""
    real, ran = ex.run_chunk, []

    def fake(task, on_batch=None):
        if len(ran) == n_chunks:
            raise KeyboardInterrupt
        ran.append(task.chunk)
        return real(task, on_batch=on_batch)

    monkeypatch.setattr(ex, "run_chunk", fake)
    return ran


def test_resume_redoes_a_recorded_chunk_whose_files_changed(tmp_path, small, monkeypatch):
    """An image replaced, and a broken image repaired, after their chunk was recorded: the resumed
    run redoes that chunk (only), and the output is what a fresh run on the final files gives."""
    path, _ = small
    layouts.folder(tmp_path, n=6, labels=True, nested=False)
    opts = dict(dtype="float32", batch_size=2, chunk_size=2, on_error="skip")      # chunks [0,1] [2,3] [4,5]
    good1 = (tmp_path / "images" / "img1.png").read_bytes()
    _corrupt(tmp_path / "images" / "img1.png")
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    ran = _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _run(ds, _opts(path, tmp_path / "out", **opts))
    assert ran == [0, 1]
    (tmp_path / "images" / "img1.png").write_bytes(good1)       # repaired (chunk 0)
    w, h = Image.open(tmp_path / "images" / "img3.png").size
    Image.fromarray(np.full((h, w, 3), 9, np.uint8)).save(tmp_path / "images" / "img3.png")  # replaced (chunk 1)
    monkeypatch.undo()
    real, ran, logs = ex.run_chunk, [], []
    monkeypatch.setattr(ex, "run_chunk", lambda t, **kw: ran.append(t.chunk) or real(t, **kw))
    meta = ex.extract(ds, _opts(path, tmp_path / "out", **opts), log=logs.append)
    assert sorted(ran) == [0, 1, 2] and meta["skipped"] == []
    assert sum("redoing chunk" in m for m in logs) == 2
    assert any(m.startswith("resuming: 0 chunk(s) of 3 already done") for m in logs)
    monkeypatch.undo()
    _run(datasets.folder(tmp_path / "images", tmp_path / "labels"), _opts(path, tmp_path / "ref", **opts))
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_resume_refuses_another_on_error_or_image_set(tmp_path, small, monkeypatch):
    path, _ = small
    layouts.folder(tmp_path, n=4, labels=False, nested=False)
    opts = dict(batch_size=2, chunk_size=2)
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        _run(datasets.folder(tmp_path / "images"), _opts(path, tmp_path / "out", **opts))
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"other settings \(on_error differ\); pass --overwrite"):
        _run(datasets.folder(tmp_path / "images"), _opts(path, tmp_path / "out", on_error="fail", **opts))
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "images" / "img9.png")
    with pytest.raises(InputError, match=r"other settings \(images_sha256, n_images differ\)"):
        _run(datasets.folder(tmp_path / "images"), _opts(path, tmp_path / "out", **opts))


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("at", [1, 2, 3])
def test_interrupted_finalize_resumes_byte_identical(tmp_path, small, monkeypatch, skip, at):
    """Killed at the 1st, 2nd or 3rd file move of the finalize step (feats, labels, flip; with a
    skipped image the moves are row copies), then resumed: the same bytes as an uninterrupted run."""
    path, _ = small
    layouts.folder(tmp_path, n=4, labels=True, nested=False)
    if skip:
        _corrupt(tmp_path / "images" / "img2.png")
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    opts = dict(flip=True, batch_size=2, chunk_size=2, on_error="skip")
    _run(ds, _opts(path, tmp_path / "ref", **opts))
    name = "_copy_rows" if skip else "replace"
    target = ex if skip else ex.os
    real, calls = getattr(target, name), []

    def dies(*a, **k):
        if name == "replace" and not str(a[0]).endswith(".partial.npy"):
            return real(*a, **k)                                  # progress-file writes
        calls.append(a[0])
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(target, name, dies)
    with pytest.raises(KeyboardInterrupt):
        _run(ds, _opts(path, tmp_path / "out", **opts))
    monkeypatch.undo()
    assert json.loads((tmp_path / "out" / ex.PROGRESS).read_text())["stage"] == "finalizing"
    assert not (tmp_path / "out" / "feats.json").exists()
    _run(ds, _opts(path, tmp_path / "out", **opts))
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_files_changed_during_an_interrupted_finalize_are_refused(tmp_path, small, monkeypatch):
    """Once rows are being compacted a chunk cannot be redone in place: a changed image then asks
    for --overwrite instead of keeping its stale row."""
    path, _ = small
    layouts.folder(tmp_path, n=4, labels=False, nested=False)
    _corrupt(tmp_path / "images" / "img1.png")
    ds = datasets.folder(tmp_path / "images")
    real = ex._copy_rows
    monkeypatch.setattr(ex, "_copy_rows", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(ds, _opts(path, tmp_path / "out"))
    monkeypatch.setattr(ex, "_copy_rows", real)
    w, h = Image.open(tmp_path / "images" / "img3.png").size
    Image.fromarray(np.full((h, w, 3), 9, np.uint8)).save(tmp_path / "images" / "img3.png")
    with pytest.raises(InputError, match=r"changed after it had finished extracting .*img0.png .*--overwrite"):
        _run(ds, _opts(path, tmp_path / "out"))
    meta = _run(ds, _opts(path, tmp_path / "out", overwrite=True))
    assert [s["image"] for s in meta["skipped"]] == ["img1.png"] and meta["shape"][0] == 3


def test_bad_arguments_are_one_line_errors(tmp_path, small):
    from omh_ref_cli.main import main

    path, _ = small
    layouts.folder(tmp_path, n=2, labels=False)
    run = CliRunner().invoke
    base = ["extract", "--out", str(tmp_path / "out"), "--quiet"]
    cases = [
        (["--model", str(tmp_path / "none.onnx"), "--images", str(tmp_path / "images")], "none.onnx: no such file"),
        (["--model", str(path), "--images", str(tmp_path / "images"), "--resolution", "64"],
         "--resolution 64: .* takes 32 px inputs"),
        (["--model", str(path)], "give either --images DIR or --dataset NAME --root DIR"),
        (["--model", str(path), "--dataset", "potsdam3"], "--dataset potsdam3: needs --root"),
        (["--model", str(path), "--images", str(tmp_path / "nope")], "nope: no such folder"),
        (["--model", str(path), "--images", str(tmp_path / "images"), "--batch-size", "0"],
         "--batch-size: expected a positive integer"),
        (["--model", str(tmp_path / "images" / "img0.png"), "--images", str(tmp_path / "images")],
         "img0.png: onnxruntime cannot load it"),
        (["--model", str(path), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "images" / "img0.png")],
         "img0.png: is a file \\(expected --out to be a folder"),
    ]
    for args, msg in cases:
        res = run(main, base + args)
        assert res.exit_code == 2, (args, res.output)
        line = res.output.strip().splitlines()[-1]
        assert line.startswith("error: ") and __import__("re").search(msg, line), (args, line)
        assert "Traceback" not in res.output


def test_gpu_without_cuda_provider_is_a_clear_error(tmp_path, small, monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(InputError, match="--device gpu: this onnxruntime has no CUDA provider"):
        backbone.providers("gpu")


def test_label_map_of_another_size_is_reported(tmp_path, small):
    """...and the image skipped in the middle of a forward batch leaves its neighbours' rows right."""
    path, _ = small
    layouts.folder(tmp_path, n=3, labels=True, nested=False)
    _run(datasets.folder(tmp_path / "images", tmp_path / "labels"), _opts(path, tmp_path / "ref"))
    Image.fromarray(np.zeros((5, 5), np.uint8), "L").save(tmp_path / "labels" / "img1.png")
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    meta = _run(ds, _opts(path, tmp_path / "out", on_error="skip"))  # one batch: img0, (img1), img2
    assert [s["image"] for s in meta["skipped"]] == ["img1.png"]
    assert "label map is 5x5 px but its image is" in meta["skipped"][0]["error"]
    for f in ("feats.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "out" / f), np.load(tmp_path / "ref" / f)[[0, 2]])


def test_an_image_too_small_for_five_crops_is_skipped(tmp_path, small):
    from omh_ref_cli.main import main

    path, _ = small
    layouts.folder(tmp_path, n=2, labels=False, nested=False)
    Image.fromarray(np.zeros((1, 30, 3), np.uint8)).save(tmp_path / "images" / "thin.png")
    res = CliRunner().invoke(main, ["extract", "--model", str(path), "--images", str(tmp_path / "images"),
                                    "--crop", "five", "--out", str(tmp_path / "out"), "--quiet"])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "out" / "feats.json").read_text())
    assert [s["image"] for s in meta["skipped"]] == ["thin.png"]
    assert "image of 30x1 px is too small for five crops" in meta["skipped"][0]["error"]
    res = CliRunner().invoke(main, ["extract", "--model", str(path), "--images", str(tmp_path / "images"),
                                    "--crop", "five", "--on-error", "fail", "--out", str(tmp_path / "out2")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "thin.png: image of 30x1 px is too small" in res.output.strip().splitlines()[-1]


def _tiny_onnx(path, batch="B", in_type=None, out_rank=4, int_output=False, mean_over_batch=False):
    """A stand-in backbone: (B, 3, 32, 32) -> the input's 2x2 average pool as (B, 16, 16, 3) channels
    last (or another rank / input type / fixed batch / integer output / batch of 1 out, to test
    the checks)."""
    import onnx
    from onnx import TensorProto, helper

    in_type = TensorProto.FLOAT if in_type is None else in_type
    x = helper.make_tensor_value_info("x", in_type, [batch, 3, 32, 32])
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Transpose", ["p"], ["y4"], perm=[0, 2, 3, 1])]
    out = "y4"
    if int_output:
        nodes.append(helper.make_node("Cast", ["y4"], ["yi"], to=TensorProto.INT64))
        out = "yi"
    if mean_over_batch:
        nodes.append(helper.make_node("ReduceMean", ["y4"], ["ym"], axes=[0], keepdims=1))
        out = "ym"
    if out_rank == 3:
        shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 256, 3])
        nodes.append(helper.make_node("Reshape", ["y4", "shape"], ["y3"]))
        graph_init = [shape]
        out = "y3"
    else:
        graph_init = []
    y = helper.make_tensor_value_info(out, TensorProto.INT64 if int_output else in_type, None)
    g = helper.make_graph(nodes, "tiny", [x], [y], initializer=graph_init)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_models_that_do_not_fit_are_refused_in_one_line(tmp_path):
    from onnx import TensorProto

    ok = backbone.inspect_model(_tiny_onnx(tmp_path / "ok.onnx"))
    assert (ok.resolution, ok.grid, ok.dim, ok.patch) == (32, (16, 16), 3, 2)
    cases = [(dict(batch=1), r"expected a dynamic batch axis, got a fixed batch of 1"),
             (dict(in_type=TensorProto.FLOAT16), r"expected a float32 input, got tensor\(float16\)"),
             (dict(out_rank=3), r"expected patch features \(B, h, w, C\)"),
             (dict(int_output=True), r"expected float features, got int64"),
             (dict(mean_over_batch=True), r"expected patch features \(B, h, w, C\) .* got \(1, 16, 16, 3\)")]
    for i, (kw, msg) in enumerate(cases):
        with pytest.raises(InputError, match=msg):
            backbone.inspect_model(_tiny_onnx(tmp_path / f"m{i}.onnx", **kw))


def test_a_failing_forward_is_one_line(tmp_path, small, monkeypatch):
    path, _ = small
    layouts.folder(tmp_path, n=2, labels=False)
    sess = backbone.session(str(path))

    def boom(*a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory\nmore detail")

    monkeypatch.setattr(sess, "run", boom, raising=False)
    with pytest.raises(InputError, match=r"onnxruntime failed on a batch of shape \(2, 3, 32, 32\) "
                                         r"\(RuntimeError: .*out of memory\)$"):
        backbone.inspect_model(str(path))


# ---- Dask ------------------------------------------------------------------------------------------
def test_dask_local_cluster_is_byte_identical(tmp_path, small):
    pytest.importorskip("distributed")
    path, _ = small
    layouts.folder(tmp_path, n=9, labels=True)
    _corrupt(tmp_path / "images" / "img4.png")
    opts = dict(dtype="float32", flip=True, batch_size=2, chunk_size=2, on_error="skip")
    _run(datasets.folder(tmp_path / "images", tmp_path / "labels"), _opts(path, tmp_path / "one", **opts))
    _run(datasets.folder(tmp_path / "images", tmp_path / "labels"),
         _opts(path, tmp_path / "dask", scheduler="local:2", **opts))
    one, two = _files(tmp_path / "one"), _files(tmp_path / "dask")
    assert sorted(one) == sorted(two) == ["feats.json", "feats.npy", "feats_flip.json", "feats_flip.npy", "labels.npy"]
    assert one == two
    assert np.load(tmp_path / "dask" / "feats.npy").shape == (8, 2, 2, 384)


def test_dask_on_error_fail_is_one_line_on_stderr(tmp_path, small):
    """Through the real command line (a subprocess, so the workers' own stderr is seen too)."""
    import subprocess

    pytest.importorskip("distributed")
    path, _ = small
    layouts.folder(tmp_path, n=3, labels=False)
    _corrupt(tmp_path / "images" / "img1.png")
    proc = subprocess.run([sys.executable, "-c", "from omh_ref_cli.main import main; main()", "extract",
                           "--model", str(path), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out"),
                           "--on-error", "fail", "--scheduler", "local:1", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "img1.png: cannot read image" in proc.stderr


def test_dask_resumes_a_partial_run(tmp_path, small, monkeypatch):
    """A run whose driver died after some chunks continues on Dask with only the missing chunks."""
    pytest.importorskip("distributed")
    path, _ = small
    layouts.folder(tmp_path, n=6, labels=False)
    ds = datasets.folder(tmp_path / "images")
    opts = dict(dtype="float32", batch_size=2, chunk_size=2)
    _run(ds, _opts(path, tmp_path / "ref", **opts))
    real = ex.run_chunk

    def die_on_third(task, on_batch=None):
        if task.chunk == 2:
            raise KeyboardInterrupt
        return real(task, on_batch=on_batch)

    monkeypatch.setattr(ex, "run_chunk", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(ds, _opts(path, tmp_path / "out", **opts))
    monkeypatch.undo()
    assert sorted(json.loads((tmp_path / "out" / ex.PROGRESS).read_text())["done"]) == ["0", "1"]
    _run(ds, _opts(path, tmp_path / "out", scheduler="local:2", **opts))
    assert _files(tmp_path / "out") == _files(tmp_path / "ref")


def test_extracted_features_train_and_evaluate(tmp_path, tmp_path_factory):
    """The user's path end to end: export -> extract (labels, flip) -> train -> eval, all by the CLI."""
    from omh_ref_cli.main import main

    path, _ = _export(tmp_path_factory, 16, 128, seed=4)
    layouts.folder(tmp_path / "data", n=10, seed=2)
    run = CliRunner().invoke
    feats = tmp_path / "feats"
    res = run(main, ["extract", "--model", str(path), "--images", str(tmp_path / "data" / "images"), "--labels",
                     str(tmp_path / "data" / "labels"), "--flip", "--out", str(feats), "--quiet"])
    assert res.exit_code == 0, res.output
    res = run(main, ["train", "--features", str(feats / "feats.npy"), "--out", str(tmp_path / "run"), "--steps", "3",
                     "--batch-size", "4", "--quiet"])
    assert res.exit_code == 0, res.output
    res = run(main, ["eval", "--checkpoint", str(tmp_path / "run" / "ckpt.npz"), "--features", str(feats / "feats.npy"),
                     "--labels", str(feats / "labels.npy"), "--flipped-features", str(feats / "feats_flip.npy"),
                     "--n-classes", "3", "--json", str(tmp_path / "scores.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    scores = json.loads((tmp_path / "scores.json").read_text())["cluster"]
    assert 0 <= scores["miou"] <= 100 and 0 < scores["acc"] <= 100 and len(scores["iou"]) == 3
    # a folder has no n_classes in feats.json (null): eval falls back to the eval level's K; without
    # --labels (and --train-labels) eval reads the labels file feats.json names, and scores the same
    res = run(main, ["eval", "--checkpoint", str(tmp_path / "run" / "ckpt.npz"), "--features", str(feats / "feats.npy"),
                     "--flipped-features", str(feats / "feats_flip.npy"), "--n-classes", "3",
                     "--train-features", str(feats / "feats.npy"), "--probe-epochs", "1",
                     "--json", str(tmp_path / "again.json"), "--quiet"])
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["cluster"] == scores and 0 < again["linear"]["acc"] <= 100
    res = run(main, ["eval", "--checkpoint", str(tmp_path / "run" / "ckpt.npz"), "--features", str(feats / "feats.npy"),
                     "--labels", str(feats / "labels.npy"), "--quiet"])
    assert res.exit_code == 0, res.output
    # features whose feats.json names no labels: a one-line error asking for --labels
    meta = json.loads((feats / "feats.json").read_text())
    (feats / "feats.json").write_text(json.dumps(dict(meta, labels=None)))
    res = run(main, ["eval", "--checkpoint", str(tmp_path / "run" / "ckpt.npz"), "--features", str(feats / "feats.npy"),
                     "--quiet"])
    assert res.exit_code == 2 and "--labels: not given, and " in res.output and "names no labels file" in res.output


def test_a_full_disk_during_a_chunk_says_what_is_intact_and_a_rerun_finishes(tmp_path, small, monkeypatch):
    path, _ = small
    layouts.folder(tmp_path, n=6, labels=True, nested=False)
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    opts = dict(dtype="float32", batch_size=2, chunk_size=2)           # chunks [0,1] [2,3] [4,5]
    _run(ds, _opts(path, tmp_path / "ref", **opts))
    real, calls = ex.RowWriter.write, []

    def full(self, row, rows):
        calls.append(row)
        if row == 2:                                                  # the second chunk's first rows
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, row, rows)

    monkeypatch.setattr(ex.RowWriter, "write", full)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=(rf"^{out}: cannot write extracted rows \(No space left on device\); "
                                          rf"the 1 chunk\(s\) of 3 recorded in {out / ex.PROGRESS} are intact; "
                                          r"run the same command again to continue$")):
        _run(ds, _opts(path, out, **opts))
    monkeypatch.undo()
    assert not [p for p in os.listdir(out) if ".tmp-" in p or p.startswith(".omh-ref.lock")]
    _run(ds, _opts(path, out, **opts))
    assert _files(out) == _files(tmp_path / "ref")


def test_two_extractions_into_one_folder(tmp_path, small):
    """A second extraction into a folder another process is writing is refused in one line."""
    path, _ = small
    layouts.folder(tmp_path, n=2, labels=False)
    out = tmp_path / "out"
    from tests.helpers import lock_holder

    p = lock_holder(out, "extract")
    try:
        with pytest.raises(InputError, match=rf"^{out}: another omh-ref extract \(pid {p.pid} on .*is writing here"):
            _run(datasets.folder(tmp_path / "images"), _opts(path, out))
    finally:
        p.kill()
        p.wait()
    assert sorted(os.listdir(out)) == [".omh-ref.lock"]                # nothing of ours was written
