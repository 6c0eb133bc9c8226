"""The synthetic demo data: determinism, shapes, files, and that its hierarchy and difficulty are real.

Images are drawn one after another from one stream and ``n_images`` takes no part in the draws,
so ``SynthSpec(n_images=n)`` is exactly the first n images of the default data set: the
statistical tests below look at a prefix of the default data, not at a look-alike.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import omh_ref
from omh_ref.features import synthetic
from omh_ref.features.meta import read as read_meta
from omh_ref.features.synthetic import SynthSpec, generate, iter_batches, write
from tests.strategies import seeds

# Odd, distinct tiny sizes so a swapped axis fails loudly (kept here rather than in
# tests/strategies.py: only this file uses them).
TINY = dict(n_images=5, grid=3, patch=5, dim=13, latent_dim=7, style_dim=2, n_super=2,
            classes_per_super=3, parts_per_class=2, max_regions=4)


@st.composite
def tiny_specs(draw):
    return SynthSpec(**dict(TINY, seed=draw(seeds), n_super=draw(st.integers(1, 3)),
                            classes_per_super=draw(st.integers(1, 4)),
                            parts_per_class=draw(st.integers(1, 3)), grid=draw(st.integers(2, 5)),
                            patch=draw(st.integers(1, 4))))


def patch_labels(labels, patch, n_classes):
    """Majority class of each patch and the fraction of its pixels that class covers. -> (N,h,w) x2"""
    N, H, W = labels.shape
    frac = np.zeros((N, H // patch, W // patch, n_classes))
    for k in range(n_classes):
        frac[..., k] = (labels == k).reshape(N, H // patch, patch, W // patch, patch).mean(axis=(2, 4))
    return frac.argmax(-1), frac.max(-1)


@pytest.fixture(scope="module")
def default_data():
    """The first 120 train and 60 val images of the default data set."""
    spec = SynthSpec(n_images=120)
    train = generate(spec)
    val = generate(dataclasses.replace(spec, n_images=60), split="val")
    return spec, train, val


# --- determinism --------------------------------------------------------------------------------

def test_same_seed_same_bytes_other_seed_differs():
    spec = SynthSpec(**TINY, seed=7)
    f1, l1, m1 = generate(spec)
    f2, l2, m2 = generate(SynthSpec(**TINY, seed=7))
    assert f1.tobytes() == f2.tobytes() and l1.tobytes() == l2.tobytes()
    assert m1["parts"].tobytes() == m2["parts"].tobytes()
    f3, l3, _ = generate(SynthSpec(**TINY, seed=8))
    assert not np.array_equal(f1, f3) and not np.array_equal(l1, l3)


def test_val_is_other_images_of_the_same_world():
    spec = SynthSpec(**TINY, seed=3)
    ft, lt, mt = generate(spec)
    fv, lv, mv = generate(spec, split="val")
    assert not np.array_equal(ft, fv) and not np.array_equal(lt, lv)
    assert mt["class_freq"] == mv["class_freq"]          # one world: same prototypes and frequencies
    assert mv["images"][0] == "synth_val_000000" and mt["images"][0] == "synth_000000"
    with pytest.raises(ValueError, match="split"):
        generate(spec, split="test")


@given(spec=tiny_specs(), batch=st.integers(1, 7))
def test_batches_do_not_change_the_data(spec, batch):
    feats, labels, meta = generate(spec)
    seen = 0
    for start, f, l, q in iter_batches(spec, batch=batch):
        assert start == seen and len(f) == min(batch, spec.n_images - start)
        np.testing.assert_array_equal(f, feats[start:start + len(f)])
        np.testing.assert_array_equal(l, labels[start:start + len(f)])
        np.testing.assert_array_equal(q, meta["parts"][start:start + len(f)])
        seen += len(f)
    assert seen == spec.n_images


@given(spec=tiny_specs(), batch=st.integers(1, 7))
def test_restyled_copies_keep_the_data_and_the_content(spec, batch):
    """The restyled copy (the stand-in for a photometric augmentation) leaves the data unchanged,
    does not depend on the batch, and differs from its image only by the style (offset, nuisance
    field) and the noise: content is the same, so image minus copy has no class signal left."""
    feats, labels, _ = generate(spec)
    copies = []
    for start, f, l, q, fa in iter_batches(spec, batch=batch, restyled=True):
        np.testing.assert_array_equal(f, feats[start:start + len(f)])
        np.testing.assert_array_equal(l, labels[start:start + len(f)])
        assert fa.shape == f.shape and fa.dtype == np.float32
        copies.append(fa)
    copies = np.concatenate(copies)
    again = np.concatenate([b[4] for b in iter_batches(spec, batch=7, restyled=True)])
    np.testing.assert_array_equal(copies, again)
    assert not np.allclose(copies, feats)
    world = synthetic.make_world(spec)
    # Without noise the difference lies in the style subspace (rows of style_c) alone.
    quiet = dataclasses.replace(spec, noise_scale=0.0)
    f0 = np.concatenate([b[1] for b in iter_batches(quiet, batch=3, restyled=True)])
    a0 = np.concatenate([b[4] for b in iter_batches(quiet, batch=3, restyled=True)])
    diff = (f0 - a0).reshape(-1, spec.dim)
    style = world["style_c"]                                             # Sd,C
    q_, _ = np.linalg.qr(style.T)                                         # C,Sd
    resid = diff - diff @ q_ @ q_.T
    assert np.abs(resid).max() <= 1e-4 * max(1.0, np.abs(diff).max())
    assert np.abs(diff).max() > 1e-3


def test_fewer_images_are_a_prefix():
    f5, l5, _ = generate(SynthSpec(**TINY))
    f8, l8, _ = generate(SynthSpec(**dict(TINY, n_images=8)))
    np.testing.assert_array_equal(f5, f8[:5])
    np.testing.assert_array_equal(l5, l8[:5])


# --- shapes, dtypes, ranges ---------------------------------------------------------------------

@given(spec=tiny_specs())
def test_shapes_dtypes_ranges(spec):
    feats, labels, meta = generate(spec)
    N, h, H = spec.n_images, spec.grid, spec.grid * spec.patch
    assert feats.shape == (N, h, h, spec.dim) and feats.dtype == np.float32
    assert labels.shape == (N, H, H) and labels.dtype == np.uint8
    assert meta["parts"].shape == (N, H, H) and meta["parts"].dtype == np.uint8
    assert np.isfinite(feats).all() and np.abs(feats).max() < 100     # safe in float16
    assert labels.max() < spec.n_classes and meta["parts"].max() < spec.parts_per_class
    assert len(meta["class_names"]) == spec.n_classes
    assert meta["hierarchy"]["superclass_of_class"] == [c // spec.classes_per_super
                                                        for c in range(spec.n_classes)]


def test_default_shapes_and_dino_like_cosines(default_data):
    spec, (feats, labels, _), _ = default_data
    assert feats.shape == (120, 16, 16, 384) and labels.shape == (120, 128, 128)
    # Raw cosines between patches of different images are positive (the shared mean), as DINO's.
    rng = np.random.default_rng(0)
    x = feats.reshape(120, 256, 384)
    i, j = rng.permutation(120)[:2 * 50].reshape(2, 50)
    a, b = x[i, rng.integers(0, 256, 50)], x[j, rng.integers(0, 256, 50)]
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert 0.2 < cos.mean() < 0.7


def test_bad_spec_fields_are_named():
    for field, value in [("n_images", 0), ("dim", 2.5), ("max_regions", 1), ("noise_scale", -1.0),
                         ("scene_bias", 1.5), ("latent_dim", 500), ("class_freq_ratio", 0.5)]:
        with pytest.raises(ValueError, match=field):
            SynthSpec(**{field: value})
    with pytest.raises(ValueError, match="uint8"):
        SynthSpec(n_super=16, classes_per_super=16)
    with pytest.raises(ValueError, match="'dim'"):
        SynthSpec(dim=3)                            # too few channels for the default hierarchy
    assert SynthSpec(dim=16).rank == 16 and SynthSpec().rank == 32   # latent rank follows small dims


# --- files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_write_equals_generate(tmp_path, dtype):
    spec = SynthSpec(**dict(TINY, n_images=7), seed=11)
    paths = write(spec, tmp_path, dtype=dtype, batch=3)
    feats, labels, meta = generate(spec)
    f = np.load(paths["feats"], mmap_mode="r")
    assert f.dtype == np.dtype(dtype) and f.shape == feats.shape
    np.testing.assert_array_equal(f, feats.astype(dtype))
    np.testing.assert_array_equal(np.load(paths["labels"]), labels)
    # the parts, numbered class·P + part, and the hierarchy that names them
    fine = np.load(paths["labels_fine"])
    np.testing.assert_array_equal(fine, labels * spec.parts_per_class + meta["parts"])
    hier = read_meta(paths["json"])["label_hierarchy"]
    assert [g["name"] for g in hier] == ["parts", "classes", "superclasses"]
    assert [g["n_classes"] for g in hier] == [spec.n_classes * spec.parts_per_class, spec.n_classes, spec.n_super]
    parent = np.array(hier[0]["parent"])
    np.testing.assert_array_equal(parent[fine], labels)                      # parts lie inside their class
    np.testing.assert_array_equal(np.array(hier[2]["map"])[labels], np.array(hier[1]["parent"])[labels])
    assert sorted(os.listdir(tmp_path)) == ["feats.json", "feats.npy", "labels.npy", "labels_fine.npy"]  # no temp files


def test_feats_json_fields(tmp_path):
    spec = SynthSpec(**TINY, seed=2)
    write(spec, tmp_path, split="val")
    with open(tmp_path / "feats.json") as fh:
        meta = json.load(fh)
    assert meta["backbone"] == "synthetic" and meta["onnx_sha256"] is None
    assert meta["resolution"] == 15 and meta["patch"] == 5 and meta["dtype"] == "float16"
    assert meta["grid"] == [3, 3] and meta["dim"] == 13 and meta["format"] == 1
    assert meta["shape"] == [5, 3, 3, 13] and meta["split"] == "val"
    assert meta["images"] == [f"synth_val_{i:06d}" for i in range(5)]
    assert meta["omh_ref_version"] == omh_ref.__version__
    assert meta["n_classes"] == 6 and meta["class_names"][4] == "s1.c4"
    assert meta["hierarchy"] == {"superclass_of_class": [0, 0, 0, 1, 1, 1], "n_super": 2, "n_parts": 2}
    assert SynthSpec(**meta["synth_spec"]) == spec          # the spec round-trips


def test_write_replaces_old_files_and_rejects_bad_dtype(tmp_path):
    write(SynthSpec(**TINY, seed=1), tmp_path, dtype="float32")
    spec = SynthSpec(**TINY, seed=2)
    paths = write(spec, tmp_path, dtype="float32")
    np.testing.assert_array_equal(np.load(paths["feats"]), generate(spec)[0])
    with pytest.raises(ValueError, match="dtype"):
        write(spec, tmp_path, dtype="int8")


# --- the data's structure -----------------------------------------------------------------------

def test_every_class_present_with_unequal_frequencies(default_data):
    spec, (_, labels, meta), _ = default_data
    counts = np.bincount(labels.ravel(), minlength=spec.n_classes)
    assert (counts > 0).all(), counts
    assert counts.max() > 2 * counts.min()                # real data is imbalanced
    assert max(meta["class_freq"]) / min(meta["class_freq"]) == pytest.approx(spec.class_freq_ratio)


def test_parts_are_spatial_halves(default_data):
    spec, (_, labels, meta), _ = default_data
    parts = meta["parts"]
    # Within a class region, horizontally adjacent pixels nearly always share their part
    # (stripes, not salt and pepper), and each part covers about half of every class.
    same_cls = labels[:, :, 1:] == labels[:, :, :-1]
    changes = (parts[:, :, 1:] != parts[:, :, :-1])[same_cls].mean()
    assert changes < 0.03
    for c in range(spec.n_classes):
        assert 0.3 < (parts[labels == c] == 0).mean() < 0.7


def test_boundary_patches_mix_region_features():
    """With every variation off, a patch is exactly the pixel-fraction mixture of its pure
    (class, part) features: boundaries are not patch-aligned and mix, as the spec says."""
    spec = SynthSpec(n_images=40, grid=8, dim=24, latent_dim=8, instance_scale=0.0,
                     image_scale=0.0, nuisance_scale=0.0, noise_scale=0.0, seed=5)
    feats, labels, meta = generate(spec)
    P, p = spec.parts_per_class, spec.patch
    seg = labels.astype(np.int64) * P + meta["parts"]                           # N,H,W
    N, h = spec.n_images, spec.grid
    frac = np.stack([(seg == k).reshape(N, h, p, h, p).mean(axis=(2, 4))
                     for k in range(spec.n_classes * P)], axis=-1)              # N,h,w,KP
    pure = frac.max(-1) == 1
    assert 0.05 < 1 - pure.mean() < 0.5                                         # many mixed patches
    proto = np.zeros((spec.n_classes * P, spec.dim))
    have = np.zeros(spec.n_classes * P, bool)
    for k in range(spec.n_classes * P):
        sel = pure & (frac[..., k] == 1)
        if sel.any():
            proto[k], have[k] = feats[sel][0], True
    usable = (frac[..., ~have].sum(-1) == 0) & ~pure
    assert usable.sum() > 50
    np.testing.assert_allclose(feats[usable], frac[usable] @ proto, atol=1e-4)


def test_hierarchy_in_cosines(default_data):
    """Mean-centred cosine between patches of different images: same class > same superclass,
    other class > other superclass, with clear gaps."""
    spec, (feats, labels, _), _ = default_data
    y, purity = patch_labels(labels, spec.patch, spec.n_classes)
    x = feats.reshape(-1, spec.dim)
    mean = x.mean(0, dtype=np.float64)
    img = np.repeat(np.arange(len(feats)), spec.grid ** 2)
    keep = np.flatnonzero(purity.ravel() == 1)                    # patches inside one class
    rng = np.random.default_rng(0)
    i, j = keep[rng.integers(0, len(keep), (2, 20000))]
    i, j = i[img[i] != img[j]], j[img[i] != img[j]]
    xi, xj = x[i] - mean, x[j] - mean
    cos = (xi * xj).sum(1) / np.linalg.norm(xi, axis=1) / np.linalg.norm(xj, axis=1)
    y = y.ravel()
    sup = np.asarray(synthetic.superclass_of_class(spec))
    same_class = y[i] == y[j]
    same_super = (sup[y[i]] == sup[y[j]]) & ~same_class
    other = sup[y[i]] != sup[y[j]]
    m_class, m_super, m_other = cos[same_class].mean(), cos[same_super].mean(), cos[other].mean()
    assert m_class > m_super + 0.05 and m_super > m_other + 0.2, (m_class, m_super, m_other)


def test_nearest_class_mean_is_good_but_not_perfect(default_data):
    """Class means from train patches, scored on val patches: high accuracy (the classes are
    linearly there) but not perfect (boundary patches, instance and style variation)."""
    spec, (ft, lt, _), (fv, lv, _) = default_data
    yt, _ = patch_labels(lt, spec.patch, spec.n_classes)
    yv, pv = patch_labels(lv, spec.patch, spec.n_classes)
    xt, xv = ft.reshape(-1, spec.dim).astype(np.float64), fv.reshape(-1, spec.dim).astype(np.float64)
    yt, yv, pv = yt.ravel(), yv.ravel(), pv.ravel()
    means = np.stack([xt[yt == k].mean(0) for k in range(spec.n_classes)])
    d = (xv ** 2).sum(1)[:, None] - 2 * xv @ means.T + (means ** 2).sum(1)
    right = d.argmin(1) == yv
    assert 0.85 < right.mean() < 0.99, right.mean()
    assert right[pv == 1].mean() > right[pv < 1].mean()                       # boundaries are harder


def test_hp_inputs_are_written_beside_the_features_and_read_by_the_store(tmp_path):
    """``write(hp=True)``: the same features, labels and record as without it, plus attn.npy (HP's
    window weights of the centred-feature logits) and feats_aug.npy (the restyled copies), named in
    feats.json and read by row through the store."""
    from omh_ref.features import attention
    from omh_ref.features.store import FeatureStore

    spec = SynthSpec(**TINY)
    plain = write(spec, tmp_path / "plain", dtype="float32")
    both = write(spec, tmp_path / "hp", dtype="float32", hp=True)
    for k in ("feats", "labels", "labels_fine"):
        np.testing.assert_array_equal(np.load(plain[k]), np.load(both[k]))
    store = FeatureStore(both["feats"])
    f = np.load(both["feats"])
    attn = store.open_attention().read(np.arange(spec.n_images))
    want = attention.window_weights(synthetic.attention_logits(f), spec.grid, spec.grid)
    np.testing.assert_array_equal(attn, want.astype(np.float16).astype(np.float32))
    assert (attn[:, 0, 0, [0, 1, 2, 3, 6]] == 0).all() and (attn >= 0).all() and (attn[..., 4] > 0).any()
    aug = store.open_augmented().read(np.arange(spec.n_images))
    restyled = np.concatenate([b[4] for b in iter_batches(spec, restyled=True)])
    np.testing.assert_array_equal(aug, restyled)
    # the logits: centred dot products, symmetric, scaled by sqrt(C)
    lg = synthetic.attention_logits(f[:1])
    fc = f[0].reshape(-1, spec.dim) - f[0].reshape(-1, spec.dim).mean(0)
    np.testing.assert_allclose(lg[0], fc @ fc.T / np.sqrt(spec.dim), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="attn.npy|names no attention"):
        FeatureStore(plain["feats"]).open_attention()
