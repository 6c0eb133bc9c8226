"""HP's two extraction inputs end to end (docs/hp_reading.md §14): ``omh-ref export --attention``'s
second output against the pre-softmax logits computed in torch from each family's own q and k, and
``omh-ref extract --attention`` / ``--augment``: ``attn.npy`` from that output, ``feats_aug.npy``
equal to the model on the augmented crop, the same bytes after an interruption, in other chunks and
on Dask, and the one-line refusals.

Every model is a small seeded random one (tests/builders.py: 2 blocks, 32 channels, 2 heads).
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from omh_ref.core.errors import InputError
from omh_ref.features import attention as at
from omh_ref.extract import augment as ag
from omh_ref.extract import datasets
from omh_ref.extract import job as ex
from omh_ref.extract.backbone import inspect_model, normalize
from omh_ref.extract.images import crops
from omh_ref_cli.main import main
from tests import builders, layouts

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from omh_ref.extract import export_dino as ed  # noqa: E402

TOL = 1e-4
# (family, tiny size, patch, registers): DINO, DINOv2 without and with registers, DINOv3 (RoPE, storage)
KINDS = [("dino", "vit_tiny", 8, 0), ("dinov2", "vit_tiny", 14, 0), ("dinov2", "vit_tiny", 14, 4),
         ("dinov3", "vit_tiny", 16, 4)]
IDS = ["dino", "v2", "v2-reg4", "v3"]


@pytest.fixture(scope="module", autouse=True)
def tiny():
    with builders.tiny_backbones(), builders.tiny_dino():
        yield


def _quiet(*_):
    pass


def _qk_logits(model, x):
    """The last block's pre-softmax logits from its own q and k, in torch: the qkv projection's
    output caught by a hook, cut into heads, DINOv3's RoPE applied to the patch tokens' q and k
    (x cos + rot(x) sin, rot(x1, x2) = (-x2, x1)), q kᵀ / sqrt(d), the class and register tokens'
    rows and columns dropped, the mean over heads. -> (B, n, n)."""
    attn = model.blocks[-1].attn
    got = {}
    hook = attn.qkv.register_forward_hook(lambda m, i, o: got.update(qkv=o))
    try:
        with torch.no_grad():
            model(torch.from_numpy(x))
    finally:
        hook.remove()
    B, N, _ = got["qkv"].shape
    heads, d = attn.heads, model.dim // attn.heads
    qkv = got["qkv"].reshape(B, N, 3, heads, d)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)      # (B, heads, N, d)
    first = 1 + model.registers
    if model.family == "dinov3":
        sin, cos = model.positions(x.shape[-2] // model.patch, x.shape[-1] // model.patch)

        def rope(t):
            tail = t[:, :, first:]
            rot = torch.cat((-tail[..., d // 2:], tail[..., :d // 2]), dim=-1)
            return torch.cat((t[:, :, :first], tail * cos + rot * sin), dim=-2)

        q, k = rope(q), rope(k)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(d)
    return logits[:, :, first:, first:].mean(dim=1).numpy()


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_the_attention_output_is_the_last_blocks_pre_softmax_logits(kind, tmp_path):
    fam, size, patch, regs = kind
    model = builders.random_vit(fam, size, patch, regs, seed=2)
    r = 3 * patch
    entry = ed.export_checked(model, r, tmp_path, source="test", random_seed=2, attention=True, say=_quiet)
    path = tmp_path / entry["file"]
    x = ed.random_batch(r, seed=4, batch=3)
    feats, logits = ed.ort_session(path).run(["features", "attention"], {"images": x})
    want = _qk_logits(model, x)
    assert logits.shape == want.shape == (3, 9, 9) and logits.dtype == np.float32
    assert np.abs(logits - want).max() <= TOL
    assert np.abs(logits.sum(-1) - 1).max() > 0.1                 # logits, not a softmax
    with torch.no_grad():
        assert np.abs(feats - model(torch.from_numpy(x)).numpy()).max() <= TOL
    assert entry["attention"]["check"]["pass"] and entry["attention"]["check"]["max_abs_diff"] <= TOL
    assert entry["attention"]["shape"] == ["batch", 9, 9]
    assert model.blocks[-1].attn.logits is None and not model.blocks[-1].attn.keep_logits   # nothing kept after


def test_the_attention_export_keeps_the_features_and_says_what_it_holds(tmp_path):
    """One model exported with and without --attention: the same features output, bit for bit;
    only the export with it has the second output and says so in its metadata; extraction's
    inspection knows which is which."""
    model = builders.random_vit("dinov2", "vit_tiny", 14, 4, seed=3)
    plain = ed.export(model, 42, tmp_path / "plain", metadata=ed.provenance(model, 42, "t", True))
    withattn = ed.export(model, 42, tmp_path / "attn", attention=True,
                         metadata=ed.provenance(model, 42, "t", True, attention=True))
    x = ed.random_batch(42, seed=1, batch=2)
    s_plain, s_attn = ed.ort_session(plain), ed.ort_session(withattn)
    assert [o.name for o in s_plain.get_outputs()] == ["features"]
    assert [o.name for o in s_attn.get_outputs()] == ["features", "attention"]
    assert np.array_equal(s_plain.run(["features"], {"images": x})[0], s_attn.run(["features"], {"images": x})[0])
    meta_plain = s_plain.get_modelmeta().custom_metadata_map
    meta_attn = s_attn.get_modelmeta().custom_metadata_map
    assert "omh_ref.attention" not in meta_plain and "pre-softmax" in meta_attn["omh_ref.attention"]
    assert {k: v for k, v in meta_attn.items() if k != "omh_ref.attention"} == dict(meta_plain)
    assert not inspect_model(plain).attention and inspect_model(withattn).attention
    assert inspect_model(withattn).provenance() == {**inspect_model(plain).provenance(),
                                                    "onnx_sha256": inspect_model(withattn).sha256}


def test_export_attention_through_the_command_line(tmp_path):
    res = CliRunner().invoke(main, ["export", "--arch", "dinov2_vitt14_reg", "--random-init", "--seed", "1",
                                    "--resolution", "28", "--attention", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "attention output, onnxruntime vs torch max abs diff" in res.output
    (entry,) = json.loads((tmp_path / "dinov2_vitt14_reg4_random1_28.manifest.json").read_text())["models"]
    assert entry["attention"]["output"] == "attention" and entry["attention"]["check"]["pass"]
    res = CliRunner().invoke(main, ["export", "--arch", "dinov2_vitt14_reg", "--random-init", "--seed", "1",
                                    "--resolution", "28", "--out", str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    (entry,) = json.loads((tmp_path / "plain" / "dinov2_vitt14_reg4_random1_28.manifest.json").read_text())["models"]
    assert "attention" not in entry


# --------------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A DINOv3 tiny model (RoPE, 4 storage tokens) at 48 px (a 3 x 3 grid), exported with and
    without the attention output: (with, without, torch model)."""
    with builders.tiny_backbones():
        model = builders.random_vit("dinov3", "vit_tiny", 16, 4, seed=5)
        d = tmp_path_factory.mktemp("hp_models")
        a = ed.export_checked(model, 48, d / "attn", source="t", random_seed=5, attention=True, say=_quiet)
        p = ed.export_checked(model, 48, d / "plain", source="t", random_seed=5, say=_quiet)
    return d / "attn" / a["file"], d / "plain" / p["file"], model


def _opts(model, out, **kw):
    kw.setdefault("progress", False)
    return ex.ExtractOptions(model=str(model), out=str(out), **kw)


def _run(ds, opts):
    return ex.extract(ds, opts, log=_quiet)


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).iterdir())}


def _crops_of(ds, crop, resolution):
    """{row name: the crop's RGB} as extraction cuts them."""
    out = {}
    for it in ds.items:
        rgb, _ = ds.load(it)
        for name, (c, _) in zip(ex.row_names(it.name, crop), crops(rgb, None, crop, resolution)):
            out[name] = c
    return out


def test_extracted_attention_is_the_window_of_the_models_logits(tmp_path, models):
    """attn.npy (float16) holds, for each row, the window weights of the model's own attention
    output for that crop (the same forward batches: five crops of one image); feats.npy is what
    an extraction without --attention writes, bit for bit; feats.json records the file and σ."""
    with_attn, plain, _ = models
    layouts.folder(tmp_path, n=3, labels=False, nested=False)
    ds = datasets.folder(tmp_path / "images")
    meta = _run(ds, _opts(with_attn, tmp_path / "out", crop="five", batch_size=5, attention=True))
    _run(ds, _opts(plain, tmp_path / "ref", crop="five", batch_size=5))
    attn = np.load(tmp_path / "out" / "attn.npy")
    assert attn.shape == (15, 3, 3, 9) and attn.dtype == np.float16
    assert (np.load(tmp_path / "out" / "feats.npy") == np.load(tmp_path / "ref" / "feats.npy")).all()
    rows = _crops_of(ds, "five", 48)
    names = meta["images"]
    sess = ed.ort_session(with_attn)
    for i in range(3):
        x = normalize(np.stack([rows[n] for n in names[5 * i:5 * i + 5]]))
        logits = sess.run(["attention"], {"images": x})[0]
        assert np.array_equal(attn[5 * i:5 * i + 5], at.window_weights(logits, 3, 3).astype(np.float16))
    assert (attn[:, 0, 0, [0, 1, 2, 3, 6]] == 0).all() and (attn[:, 1, 1] != 0).any()
    rec = meta["attention"]
    assert (rec["file"], rec["sigma"], rec["quantiles"], rec["shape"]) == ("attn.npy", 28.0, [0.1, 0.9], [15, 3, 3, 9])
    assert json.loads((tmp_path / "out" / "feats.json").read_text())["attention"] == rec


@pytest.mark.parametrize("space", ["normalised", "rgb"])
def test_augmented_features_are_the_model_on_the_augmented_crop(tmp_path, models, space):
    """feats_aug.npy row r = the torch model on the crop augmented by the draw of (seed, row name);
    each crop its own draw; feats.npy unchanged."""
    _, plain, model = models
    layouts.folder(tmp_path, n=2, labels=False, nested=False)
    ds = datasets.folder(tmp_path / "images")
    meta = _run(ds, _opts(plain, tmp_path / "out", crop="five", dtype="float32", augment=True, seed=5,
                          augment_space=space))
    _run(ds, _opts(plain, tmp_path / "ref", crop="five", dtype="float32"))
    aug = np.load(tmp_path / "out" / "feats_aug.npy")
    feats = np.load(tmp_path / "out" / "feats.npy")
    assert aug.shape == feats.shape == (10, 3, 3, 32)
    assert np.array_equal(feats, np.load(tmp_path / "ref" / "feats.npy"))
    rows = _crops_of(ds, "five", 48)
    x = np.stack([ag.augmented_input(rows[n], 5, n, space) for n in meta["images"]])
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    assert np.abs(aug - want).max() <= TOL
    assert np.abs(aug - feats).max() > 0.01
    assert len({ag.draw(5, n) for n in meta["images"]}) == 10
    rec = meta["augmented"]
    assert (rec["file"], rec["seed"], rec["space"], rec["shape"]) == ("feats_aug.npy", 5, space, [10, 3, 3, 32])
    assert rec["transforms"]["color_jitter"]["hue"] == [-0.1, 0.1] and rec["transforms"]["grayscale_p"] == 0.2


def test_interrupted_chunked_and_dask_runs_give_the_same_bytes(tmp_path, models, monkeypatch):
    """--attention --augment --flip: a run stopped in the middle of its second chunk and run again,
    a run in other chunks, and a run on two Dask workers write the bytes of one uninterrupted run."""
    with_attn, _, _ = models
    layouts.folder(tmp_path, n=5, labels=True, nested=False)
    ds = datasets.folder(tmp_path / "images", tmp_path / "labels")
    opts = dict(attention=True, augment=True, flip=True, seed=2, batch_size=2)
    _run(ds, _opts(with_attn, tmp_path / "ref", chunk_size=2, **opts))
    ref = _files(tmp_path / "ref")
    assert {"attn.npy", "feats_aug.npy", "feats_flip.npy", "feats_flip.json"} <= set(ref)
    flip_meta = json.loads(ref["feats_flip.json"])
    assert flip_meta["attention"] is None and flip_meta["augmented"] is None

    real, calls = ex.run_chunk, []

    def interrupted(task, on_batch=None):
        calls.append(task.chunk)
        if len(calls) == 2:           # Ctrl-C in the middle of the second chunk, after one batch
            real(ex.ChunkTask(task.chunk, task.items[:1], task.dataset, task.opts, task.backbone, task.files))
            raise KeyboardInterrupt
        return real(task, on_batch=on_batch)

    monkeypatch.setattr(ex, "run_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt, match=r"^1 of 3 chunk\(s\) are recorded"):
        _run(ds, _opts(with_attn, tmp_path / "out", chunk_size=2, **opts))
    assert (tmp_path / "out" / "attn.partial.npy").is_file() and (tmp_path / "out" / "feats_aug.partial.npy").is_file()
    monkeypatch.setattr(ex, "run_chunk", real)
    _run(ds, _opts(with_attn, tmp_path / "out", chunk_size=2, **opts))
    assert _files(tmp_path / "out") == ref

    _run(ds, _opts(with_attn, tmp_path / "chunks", chunk_size=4, **opts))
    other = _files(tmp_path / "chunks")
    for name in ("feats.npy", "attn.npy", "feats_aug.npy", "feats_flip.npy", "labels.npy"):
        assert other[name] == ref[name], name

    pytest.importorskip("distributed")
    _run(ds, _opts(with_attn, tmp_path / "dask", chunk_size=2, scheduler="local:2", **opts))
    assert _files(tmp_path / "dask") == ref


def test_a_skipped_image_keeps_the_other_rows_and_their_draws(tmp_path, models):
    """--on-error skip compacts attn.npy and feats_aug.npy with the features; a crop's draw is
    its own (seeded by its name), so the other images' augmented rows are unchanged."""
    with_attn, _, _ = models
    layouts.folder(tmp_path, n=4, labels=False, nested=False)
    ds = datasets.folder(tmp_path / "images")
    opts = dict(attention=True, augment=True, batch_size=1, chunk_size=2, on_error="skip")
    _run(ds, _opts(with_attn, tmp_path / "all", **opts))
    (tmp_path / "images" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    meta = _run(datasets.folder(tmp_path / "images"), _opts(with_attn, tmp_path / "skip", **opts))
    assert meta["images"] == ["img0.png", "img2.png", "img3.png"]
    for name in ("feats.npy", "attn.npy", "feats_aug.npy"):
        assert np.array_equal(np.load(tmp_path / "skip" / name), np.load(tmp_path / "all" / name)[[0, 2, 3]]), name


def _one_line_error(args):
    res = CliRunner().invoke(main, args)
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output
    return lines[0]


def test_one_line_refusals(tmp_path, models, monkeypatch):
    with_attn, plain, _ = models
    layouts.folder(tmp_path, n=2, labels=False, nested=False)
    base = ["extract", "--images", str(tmp_path / "images"), "--quiet"]
    line = _one_line_error([*base, "--model", str(plain), "--out", str(tmp_path / "a"), "--attention"])
    assert line == (f"error: --attention: {plain} has no 'attention' output (export the backbone with "
                    "omh-ref export --attention)")
    line = _one_line_error([*base, "--model", str(plain), "--out", str(tmp_path / "b"), "--augment-space", "rgb"])
    assert line == "error: --augment-space goes with --augment (the augmented features' draws)"
    line = _one_line_error([*base, "--model", str(plain), "--out", str(tmp_path / "b"), "--seed", "3"])
    assert line == "error: --seed goes with --augment (the augmented features' draws)"
    res = CliRunner().invoke(main, [*base, "--model", str(plain), "--out", str(tmp_path / "b"), "--augment",
                                    "--seed", "-1"])
    assert res.exit_code == 2 and "-1 is not in the range x>=0" in res.output
    with pytest.raises(InputError, match=r"^--seed: expected a non-negative integer, got -2$"):
        _run(datasets.folder(tmp_path / "images"), _opts(plain, tmp_path / "c", augment=True, seed=-2))
    # an unfinished run without the attention is not continued with it
    monkeypatch.setattr(ex, "run_chunk", lambda t, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(datasets.folder(tmp_path / "images"), _opts(with_attn, tmp_path / "d"))
    monkeypatch.undo()
    with pytest.raises(InputError, match=r"unfinished extraction with other settings \(attention differ\)"):
        _run(datasets.folder(tmp_path / "images"), _opts(with_attn, tmp_path / "d", attention=True))
    # nor one with other augmentation draws (the seed or the space)
    monkeypatch.setattr(ex, "run_chunk", lambda t, **kw: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(datasets.folder(tmp_path / "images"), _opts(plain, tmp_path / "e", augment=True, seed=1))
    monkeypatch.undo()
    for other in (dict(seed=2), dict(seed=1, augment_space="rgb")):
        with pytest.raises(InputError, match=r"unfinished extraction with other settings \(augment differ\)"):
            _run(datasets.folder(tmp_path / "images"), _opts(plain, tmp_path / "e", augment=True, **other))


def test_a_model_whose_attention_output_has_the_wrong_shape_is_refused(tmp_path):
    """An 'attention' output that is not (B, n, n) for the features' grid: one line at inspection."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3, 20, 20])
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Transpose", ["p"], ["y"], perm=[0, 2, 3, 1]),
             helper.make_node("ReduceMean", ["x"], ["attention"], axes=[1], keepdims=0)]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "attention")]
    graph = helper.make_graph(nodes, "bad_attention", [x], outs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    with pytest.raises(InputError, match=r"m.onnx: its 'attention' output has shape \(2, 20, 20\), expected "
                                         r"\(B, n, n\) = \(2, 25, 25\) for its 5x5 grid \(export it with omh-ref "
                                         r"export --attention\)$"):
        inspect_model(tmp_path / "m.onnx")


@pytest.mark.parametrize("omh", [True, False])
def test_hp_trains_evaluates_and_segments_from_the_extracted_inputs(tmp_path, models, omh):
    """The whole path on the command line: a model exported with its attention output, extract
    --attention --augment (five crops, labels), train --base hp (with and without OMH), resume, eval
    and segment with that model: HP's inputs come from extraction, not from a test's builder."""
    with_attn, _, _ = models
    layouts.folder(tmp_path, n=4, labels=True, nested=False)

    def cli(*args):
        res = CliRunner().invoke(main, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res.output

    cli("extract", "--model", with_attn, "--images", tmp_path / "images", "--labels", tmp_path / "labels",
        "--crop", "five", "--attention", "--augment", "--out", tmp_path / "f", "--quiet")
    feats = tmp_path / "f" / "feats.npy"
    assert (tmp_path / "f" / "attn.npy").is_file() and (tmp_path / "f" / "feats_aug.npy").is_file()
    run = tmp_path / "run"
    small = ["--batch-size", 4, "--levels", "8,4" if omh else "4", "--dim", 6, "--pool-size", 12, "--warmup", 1,
             "--renew-interval", 2, "--denominator-share", 0.5]
    cli("train", "--base", "hp", "--omh" if omh else "--no-omh", "--features", feats, "--out", run, "--steps", 3,
        *small, "--quiet")
    cli("train", "--resume", run / "ckpt.npz", "--steps", 5, "--quiet")
    cli("eval", "--checkpoint", run / "ckpt.npz", "--features", feats, "--json", tmp_path / "scores.json", "--quiet")
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert 0 <= scores["cluster"]["miou"] <= 100
    cli("segment", "--model", with_attn, "--checkpoint", run / "ckpt.npz", "--images", tmp_path / "images", "--out",
        tmp_path / "seg", "--quiet")
    assert len(list((tmp_path / "seg").glob("*.clusters.png"))) == 4
