"""omh_ref.evaluate.metrics against a NumPy rendering of the logic of STEGO's ``UnsupervisedMetrics``.

``StegoLogic`` below follows STEGO's ``update`` and ``compute`` (mhamilton723/STEGO,
``src/utils.py``; HP's ``utils/seg_utils.py`` is the same) step by step, written for this test:
the mask ``(0 ≤ target < n_classes) & (0 ≤ preds < n_classes)`` (so pixels predicted into a
cluster id ≥ n_classes are dropped), the bincount of ``(n_classes + extra) · target + preds``
transposed into ``stats[pred, target]``, the two assignments with extra clusters (``stats`` for
the unmatched set, ``stats.T`` for the histogram's rows), the unmatched rows summed into one row,
a zero column, and IoU / accuracy in float32 (torch's true division of integer tensors, and the
float32 zero column, give float32). omh_ref's headline protocol ``stego`` must equal it exactly
(to float32 rounding); ``count_extra=True`` widens the mask to every cluster id, which is the
``strict`` protocol's definition, and omh_ref's ``strict`` scores must equal that.

Also: hypothesis properties (cluster relabelling, perfect prediction up to relabelling, streaming
over batches, the joint index against a naive count), the claim that SciPy solves a tall matrix
as its transpose (which lets one assignment stand for STEGO's two), and the error messages.
Strategies live here rather than in tests/strategies.py because they are specific to label maps.
"""
import zlib

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import linear_sum_assignment

from omh_ref.core.backend import to_host
from omh_ref.evaluate.metrics import (PROTOCOLS, ConfusionAccumulator, Match, confusion, hungarian,
                                      identity_match, matched_histogram, protocol_scores, scores,
                                      stego_confusion)

F32_RTOL = 1e-6   # STEGO computes IoU and accuracy in float32; ours is float64


@pytest.fixture
def rng(request):
    # one generator per test, seeded by the test's id (crc32 is stable across processes)
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


class StegoLogic:
    """The logic of STEGO's UnsupervisedMetrics.update / compute (see the module docstring).
    ``count_extra`` widens its prediction mask from ``preds < n_classes`` to every cluster id."""

    def __init__(self, n_classes, extra_clusters, compute_hungarian=True, count_extra=False):
        self.n, self.extra, self.hungarian, self.count_extra = n_classes, extra_clusters, compute_hungarian, count_extra
        self.stats = np.zeros((n_classes + extra_clusters, n_classes), dtype=np.int64)

    def update(self, preds, target):
        n, width = self.n, self.n + self.extra
        actual, preds = target.reshape(-1).astype(np.int64), preds.reshape(-1).astype(np.int64)
        limit = width if self.count_extra else n
        keep = (actual >= 0) & (actual < n) & (preds >= 0) & (preds < limit)
        counts = np.bincount(width * actual[keep] + preds[keep], minlength=n * width)
        self.stats += counts.reshape(n, width).T

    def compute(self):
        n, stats = self.n, self.stats
        if not self.hungarian:
            hist = stats
        elif self.extra == 0:
            rows, cols = linear_sum_assignment(stats, maximize=True)
            hist = stats[np.argsort(cols)]
        else:
            rows, _ = linear_sum_assignment(stats, maximize=True)
            _, rows_for_classes = linear_sum_assignment(stats.T, maximize=True)
            missing = sorted(set(range(n + self.extra)) - set(rows.tolist()))
            hist = np.concatenate([stats[rows_for_classes], stats[missing].sum(0, keepdims=True)])
            hist = np.concatenate([hist.astype(np.float32), np.zeros((n + 1, 1), np.float32)], axis=1)
        self.histogram = hist
        tp = np.diag(hist)
        fp, fn = hist.sum(0) - tp, hist.sum(1) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            self.iou = tp.astype(np.float32) / (tp + fp + fn).astype(np.float32)
            acc = np.float32(tp.sum()) / np.float32(hist.sum())
        return {"mIoU": 100 * float(self.iou[~np.isnan(self.iou)].mean()), "Accuracy": 100 * float(acc)}


def stego_run(batches, n_clusters, n_classes, count_extra=False, compute_hungarian=True):
    m = StegoLogic(n_classes, n_clusters - n_classes, compute_hungarian, count_extra)
    for pred, label in batches:
        m.update(pred, label)
    return m.compute(), m


def ours_run(batches, n_clusters, n_classes):
    acc = ConfusionAccumulator(n_clusters, n_classes)
    for pred, label in batches:
        acc.update(pred, label)
    return acc.matrix, scores(acc.matrix)


def assert_matches_stego(batches, n_clusters, n_classes):
    """Headline (stego) against STEGO's logic, strict against the logic counting every cluster."""
    conf, s = ours_run(batches, n_clusters, n_classes)
    assert s["protocol"] == "stego"
    for protocol, ours, count_extra in (("stego", s, False), ("strict", s["strict"], True)):
        out, m = stego_run(batches, n_clusters, n_classes, count_extra)
        counted = conf if count_extra else stego_confusion(conf)
        np.testing.assert_array_equal(counted, m.stats)
        np.testing.assert_array_equal(matched_histogram(counted, ours["match"]), m.histogram)
        np.testing.assert_allclose(ours["miou"], out["mIoU"], rtol=F32_RTOL, err_msg=protocol)
        np.testing.assert_allclose(ours["acc"], out["Accuracy"], rtol=F32_RTOL, err_msg=protocol)
        np.testing.assert_allclose(ours["iou"], 100 * m.iou[:n_classes].astype(np.float64), rtol=F32_RTOL,
                                   equal_nan=True, err_msg=protocol)
        if n_clusters > n_classes:
            np.testing.assert_allclose(ours["iou_unmatched"], 100 * float(m.iou[n_classes]), rtol=F32_RTOL,
                                       equal_nan=True, err_msg=protocol)
        assert ours["pixels"] == m.histogram.sum()
    return s


def random_batches(rng, n_batches, shape, n_clusters, n_classes, label_dtype=np.int16,
                   ignore=(-1, 255), p_ignore=0.1, classes=None, clusters=None):
    """Random (pred, label) batches; a share p_ignore of labels is an ignore value. ``classes`` /
    ``clusters`` restrict the values drawn (to leave some absent)."""
    classes = np.arange(n_classes) if classes is None else np.asarray(classes)
    clusters = np.arange(n_clusters) if clusters is None else np.asarray(clusters)
    out = []
    for _ in range(n_batches):
        label = rng.choice(classes, size=shape)
        pred = rng.choice(clusters, size=shape)
        # correlate predictions with labels so the matching is not arbitrary
        same = rng.random(shape) < 0.5
        pred[same] = (label[same] * 3 + 1) % n_clusters
        drop = rng.random(shape) < p_ignore
        label[drop] = rng.choice(ignore, size=int(drop.sum()))
        out.append((pred.astype(np.int64), label.astype(label_dtype)))
    return out


# --- parity with STEGO ----------------------------------------------------------------------------

@pytest.mark.parametrize("label_dtype,ignore", [(np.int16, (-1, 255)), (np.uint8, (255,)),
                                                 (np.int64, (-1,))])
def test_stego_parity_square(rng, label_dtype, ignore):
    batches = random_batches(rng, 3, (2, 7, 11), 5, 5, label_dtype, ignore)
    s = assert_matches_stego(batches, 5, 5)
    # no extra cluster: the two protocols are one
    for key in ("miou", "acc", "pixels"):
        assert s[key] == s["strict"][key]
    np.testing.assert_array_equal(s["iou"], s["strict"]["iou"])


@pytest.mark.parametrize("n_clusters", [7, 11])
def test_stego_parity_extra_clusters(rng, n_clusters):
    """Extra clusters: the headline equals STEGO's code exactly (pixels predicted into cluster
    ids ≥ 5 dropped, an empty extra row), strict equals the logic counting every cluster."""
    batches = random_batches(rng, 3, (3, 9, 5), n_clusters, 5)
    s = assert_matches_stego(batches, n_clusters, 5)
    assert np.isnan(s["iou_unmatched"])          # STEGO: the extra row and column are empty
    assert s["strict"]["iou_unmatched"] == 0.0   # strict: the unmatched clusters hold pixels
    dropped = sum(int(((p >= 5) & (lab >= 0) & (lab < 5)).sum()) for p, lab in batches)
    assert dropped > 0 and s["pixels"] == s["strict"]["pixels"] - dropped


def test_stego_protocol_by_hand():
    """2 classes, 3 clusters; conf rows = clusters, columns = classes."""
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1, 2])
    label = np.array([0, 0, 1, 1, 0, 1, 255, -1, 1, 0], dtype=np.int16)
    conf = confusion(pred, label, 3, 2)
    np.testing.assert_array_equal(conf, [[2, 0], [1, 3], [1, 1]])
    s = scores(conf)
    # strict: cluster 0 -> class 0, 1 -> 1, 2 unmatched (its 2 pixels are errors).
    # class 0: tp 2, predicted 2, labelled 4 -> 2/4; class 1: tp 3, predicted 4, labelled 4 -> 3/5;
    # the unmatched pseudo-class: tp 0 over 2 pixels -> 0
    st_ = s["strict"]
    np.testing.assert_array_equal(st_["match"].cluster_to_class, [0, 1, -1])
    np.testing.assert_allclose(st_["iou"], [50.0, 60.0])
    np.testing.assert_allclose([st_["miou"], st_["acc"]], [100 * (0.5 + 0.6 + 0) / 3, 100 * 5 / 8])
    assert st_["iou_unmatched"] == 0.0 and st_["pixels"] == 8
    # stego: the 2 pixels of cluster id 2 (>= n_classes) are dropped before anything else.
    # class 0: tp 2, predicted 2, labelled 3 -> 2/3; class 1: tp 3, predicted 4, labelled 3 -> 3/4
    np.testing.assert_array_equal(s["match"].cluster_to_class, [0, 1, -1])
    np.testing.assert_allclose(s["iou"], [100 * 2 / 3, 75.0])
    np.testing.assert_allclose([s["miou"], s["acc"]], [100 * (2 / 3 + 0.75) / 2, 100 * 5 / 6])
    assert np.isnan(s["iou_unmatched"]) and s["pixels"] == 6
    assert_matches_stego([(pred, label)], 3, 2)


def test_stego_protocol_drops_by_cluster_id_not_by_matching():
    """STEGO's mask is on the cluster's index: a cluster with id ≥ n_classes loses its pixels even
    when it is the best match of a class (here cluster 2 is class 1's), and strict is invariant to
    renaming clusters while stego is not. Both follow their code (assert_matches_stego)."""
    pred = np.array([0, 0, 0, 2, 2, 2, 2, 1])
    label = np.array([0, 0, 1, 1, 1, 1, 1, 1], dtype=np.int16)
    s = assert_matches_stego([(pred, label)], 3, 2)
    np.testing.assert_array_equal(s["strict"]["match"].cluster_to_class, [0, -1, 1])
    np.testing.assert_allclose([s["strict"]["miou"], s["strict"]["acc"]], [100 * (2 / 3 + 4 / 6 + 0) / 3, 75.0])
    # stego: cluster 2's 4 pixels are dropped; cluster 1 (one pixel) becomes class 1's match
    np.testing.assert_array_equal(s["match"].cluster_to_class, [0, 1, -1])
    np.testing.assert_allclose([s["miou"], s["acc"]], [100 * (2 / 3 + 1 / 2) / 2, 75.0])
    renamed = scores(confusion(np.array([0, 2, 1])[pred], label, 3, 2))   # ids 1 and 2 swapped
    assert renamed["strict"]["miou"] == s["strict"]["miou"] and renamed["strict"]["acc"] == s["strict"]["acc"]
    # now the one-pixel cluster has id 2 and is the one dropped
    np.testing.assert_allclose([renamed["miou"], renamed["acc"]], [100 * (2 / 3 + 4 / 5) / 2, 100 * 6 / 7])


def test_stego_parity_absent_classes_give_nan(rng):
    # class 3 never labelled and clusters 2, 6 never predicted: after matching, some class has
    # no pixels on either side and its IoU is NaN, left out of the mean by both implementations
    batches = random_batches(rng, 2, (5, 13), 7, 5, classes=[0, 1, 2, 4], clusters=[0, 1, 3, 4, 5])
    for n_clusters in (5, 7):
        b = [(np.where(p < n_clusters, p, 0), lab) for p, lab in batches]
        s = assert_matches_stego(b, n_clusters, 5)
        if n_clusters == 5:  # cluster 2 is empty and is the one left for class 3
            assert np.isnan(s["iou"]).sum() == 1 and np.isnan(s["iou"][3])


@pytest.mark.filterwarnings("ignore:Mean of empty slice", "ignore:invalid value encountered")
def test_every_pixel_in_an_extra_cluster():
    """STEGO's protocol then counts nothing (NaN, as its 0/0); strict still scores (clusters 3 and
    4 matched to classes 0 and 1: 2 of 3 pixels right)."""
    pred, label = np.array([3, 3, 4]), np.array([0, 1, 1], dtype=np.int16)
    out, _ = stego_run([(pred, label)], 5, 3)
    s = scores(confusion(pred, label, 5, 3))
    assert np.isnan(s["miou"]) and np.isnan(s["acc"]) and np.isnan(out["mIoU"]) and s["pixels"] == 0
    assert s["strict"]["acc"] == pytest.approx(200 / 3) and s["strict"]["pixels"] == 3


def test_stego_parity_identity_mapping(rng):
    # compute_hungarian=False (STEGO's linear probe): cluster c is class c
    batches = random_batches(rng, 2, (5, 11), 5, 5)
    out, m = stego_run(batches, 5, 5, compute_hungarian=False)
    conf, _ = ours_run(batches, 5, 5)
    s = scores(conf, identity_match(5, 5))
    np.testing.assert_allclose([s["miou"], s["acc"]], [out["mIoU"], out["Accuracy"]], rtol=F32_RTOL)
    assert s["strict"]["miou"] == s["miou"]


def test_protocols_are_named_and_checked():
    assert set(PROTOCOLS) == {"stego", "strict"}
    with pytest.raises(ValueError, match="protocol: expected one of"):
        protocol_scores(np.ones((3, 3)), protocol="loose")


# --- SciPy: one solve stands for STEGO's two ------------------------------------------------------

@given(hnp.arrays(np.int64, st.tuples(st.integers(2, 9), st.integers(1, 6)),
                  elements=st.integers(0, 2)))
def test_scipy_tall_matrix_is_solved_as_its_transpose(a):
    # many ties (entries 0..2): STEGO's histogram rows (from the transposed solve) and its
    # unmatched set (from the direct solve) come from one and the same matching
    assume(a.shape[0] >= a.shape[1])
    rows, cols = linear_sum_assignment(a, maximize=True)
    rows_t, cols_t = linear_sum_assignment(a.T, maximize=True)
    if a.shape[0] > a.shape[1]:
        np.testing.assert_array_equal(rows_t, np.arange(a.shape[1]))
        np.testing.assert_array_equal(cols_t, hungarian(a).class_to_cluster)
    np.testing.assert_array_equal(hungarian(a).class_to_cluster, rows[np.argsort(cols)])


# --- properties -----------------------------------------------------------------------------------

@st.composite
def label_maps(draw, max_side=7):
    """(pred, label, n_clusters, n_classes) with ignore values (−1, 255) in the labels and
    a few out-of-range predictions (which are dropped)."""
    n_classes = draw(st.integers(1, 6))
    n_clusters = n_classes + draw(st.integers(0, 3))
    shape = draw(st.tuples(st.integers(1, max_side), st.integers(1, max_side)))
    values = st.one_of(st.integers(0, n_classes - 1), st.sampled_from([-1, 255]))
    label = draw(hnp.arrays(np.int16, shape, elements=values))
    pred = draw(hnp.arrays(np.int32, shape, elements=st.integers(-1, n_clusters)))
    return pred, label, n_clusters, n_classes


def naive_confusion(pred, label, n_clusters, n_classes):
    conf = np.zeros((n_clusters, n_classes), dtype=np.int64)
    for p, c in zip(pred.ravel().tolist(), label.ravel().tolist()):
        if 0 <= c < n_classes and 0 <= p < n_clusters:
            conf[p, c] += 1
    return conf


@given(label_maps())
def test_confusion_equals_naive_count(case):
    pred, label, K, C = case
    want = naive_confusion(pred, label, K, C)
    np.testing.assert_array_equal(confusion(pred, label, K, C), want)
    if not (label == -1).any():
        np.testing.assert_array_equal(confusion(pred, label.astype(np.uint8), K, C), want)
    np.testing.assert_array_equal(confusion(pred.astype(np.int64), label.astype(np.int64), K, C),
                                  want)


@given(label_maps(), st.randoms(use_true_random=False))
def test_cluster_relabelling_leaves_scores_unchanged(case, rnd):
    pred, label, K, C = case
    conf = confusion(pred, label, K, C)
    assume(conf.sum() > 0)
    perm = np.array(rnd.sample(range(K), K))
    conf_p = confusion(np.where((pred >= 0) & (pred < K), perm[np.clip(pred, 0, K - 1)], pred),
                       label, K, C)
    np.testing.assert_array_equal(conf_p[perm], conf)
    # the strict protocol does not depend on the clusters' names (STEGO's does: it drops ids >= C,
    # see test_stego_protocol_drops_by_cluster_id_not_by_matching)
    s, s_p = scores(conf)["strict"], scores(conf_p)["strict"]
    np.testing.assert_allclose(s_p["acc"], s["acc"], rtol=1e-12)  # the optimum is unique in value
    m, m_p = hungarian(conf), hungarian(conf_p)
    if np.array_equal(perm[m.class_to_cluster], m_p.class_to_cluster):
        np.testing.assert_array_equal(s_p["iou"], s["iou"])
        np.testing.assert_array_equal(s_p["miou"], s["miou"])
    else:  # a tie: another matching with the same matched pixel count
        total = conf[m.class_to_cluster, np.arange(C)].sum()
        assert total == conf_p[m_p.class_to_cluster, np.arange(C)].sum()


@given(st.integers(1, 5), st.integers(0, 2), st.data())
def test_cluster_relabelling_with_a_unique_optimum(C, extra, data):
    # counts with a tie-breaking low part, 2^(k·C + c) in cell (k, c): every matching then has a
    # distinct total, the optimum is unique, and every score must be exactly invariant
    K = C + extra
    high = data.draw(hnp.arrays(np.int64, (K, C), elements=st.integers(0, 3)))
    conf = (high << (K * C)) | (np.int64(1) << np.arange(K * C, dtype=np.int64).reshape(K, C))
    perm = np.array(data.draw(st.permutations(range(K))))
    conf_p = np.empty_like(conf)
    conf_p[perm] = conf                  # cluster k is called perm[k]
    m, m_p = hungarian(conf), hungarian(conf_p)
    np.testing.assert_array_equal(m_p.class_to_cluster, perm[m.class_to_cluster])
    s, s_p = scores(conf, m)["strict"], scores(conf_p, m_p)["strict"]
    np.testing.assert_array_equal(s_p["iou"], s["iou"])
    assert s_p["miou"] == s["miou"] and s_p["acc"] == s["acc"]


@given(label_maps(), st.randoms(use_true_random=False))
def test_perfect_prediction_up_to_relabelling_scores_100(case, rnd):
    pred, label, K, C = case
    valid = (label >= 0) & (label < C)
    assume(valid.any())
    relabel = np.array(rnd.sample(range(K), C))            # injective class -> cluster
    pred = np.where(valid, relabel[np.clip(label, 0, C - 1)], pred)
    both = scores(confusion(pred, label, K, C))
    s = both["strict"]
    assert s["miou"] == 100.0 and s["acc"] == 100.0
    present = np.isin(np.arange(C), label)
    assert np.all(s["iou"][present] == 100.0) and np.all(np.isnan(s["iou"][~present]))
    assert np.isnan(s["iou_unmatched"])  # the leftover clusters hold no pixels
    # stego: classes predicted into a cluster id >= C lose their pixels (IoU NaN); the rest is 100
    kept = present & (relabel < C)
    assert np.all(both["iou"][kept] == 100.0) and np.all(np.isnan(both["iou"][~kept]))
    if kept.any():
        assert both["miou"] == 100.0 and both["acc"] == 100.0


@given(st.lists(label_maps(max_side=5), min_size=1, max_size=4), st.integers(1, 6),
       st.integers(0, 2))
def test_streaming_over_batches_equals_one_shot(cases, C, extra):
    K = C + extra
    batches = []
    for pred, label, _, _ in cases:
        label = np.where((label >= C) & (label != 255), label % C, label).astype(np.int16)
        batches.append((np.where(pred >= K, -1, pred), label))
    acc = ConfusionAccumulator(K, C)
    for pred, label in batches:
        acc.update(pred, label)
    one = confusion(np.concatenate([p.ravel() for p, _ in batches]),
                    np.concatenate([lab.ravel() for _, lab in batches]), K, C)
    np.testing.assert_array_equal(acc.matrix, one)
    assert acc.n_pixels == one.sum()


def test_streaming_reuses_its_buffer_across_dtypes(rng):
    # the scratch index buffer changes dtype and size between batches: -1 and 255 labels need
    # 257 rows, an out-of-range prediction one more column, so 257·256 bins need uint32
    acc = ConfusionAccumulator(255, 5)
    small = random_batches(rng, 1, (4, 5), 255, 5, np.uint8, (255,))[0]
    big = random_batches(rng, 1, (9, 9), 255, 5, np.int16)[0]
    big[0][0, 0] = 999
    acc.update(*small)
    assert acc._scratch.dtype == np.uint16
    acc.update(*big)
    assert acc._scratch.dtype == np.uint32
    acc.update(*small)
    want = 2 * naive_confusion(*small, 255, 5) + naive_confusion(*big, 255, 5)
    np.testing.assert_array_equal(acc.matrix, want)


@pytest.mark.parametrize("label_dtype",
                         [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.int64])
@pytest.mark.parametrize("pred_dtype", [np.uint8, np.int16, np.int32, np.int64, np.uint64])
def test_integer_dtypes(rng, label_dtype, pred_dtype):
    ignore = {np.uint8: (255,), np.uint16: (255,), np.int8: (-1,)}.get(label_dtype, (-1, 255))
    pred, label = random_batches(rng, 1, (6, 7), 9, 5, np.int64, ignore)[0]
    pred[0, 0] = 12  # out of range: dropped
    want = naive_confusion(pred, label, 9, 5)
    got = confusion(pred.astype(pred_dtype), label.astype(label_dtype), 9, 5)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_array_modules(xp, rng):
    pred, label = random_batches(rng, 1, (3, 5, 7), 7, 5)[0]
    got = confusion(xp.asarray(pred), xp.asarray(label), 7, 5)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, confusion(pred, label, 7, 5))
    np.testing.assert_array_equal(to_host(got), naive_confusion(pred, label, 7, 5))


def test_more_than_255_classes_makes_255_a_class():
    label = np.array([255, 255, 7, -1], dtype=np.int16)
    pred = np.array([1, 1, 0, 0])
    conf = confusion(pred, label, 300, 300)
    assert conf[1, 255] == 2 and conf[0, 7] == 1 and conf.sum() == 3


def test_match_is_consistent_and_serialisable(rng):
    batches = random_batches(rng, 1, (9, 11), 8, 5)
    m = hungarian(confusion(*batches[0], 8, 5))
    assert isinstance(m, Match)
    matched = m.cluster_to_class >= 0
    np.testing.assert_array_equal(m.cluster_to_class[m.class_to_cluster], np.arange(5))
    np.testing.assert_array_equal(np.flatnonzero(~matched), m.unmatched)
    assert sorted(m.to_dict()["class_to_cluster"]) == sorted(np.flatnonzero(matched).tolist())


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("pred,label,match", [
    (np.zeros((2, 3), int), np.zeros((3, 2), np.int16), "pred: shape"),
    (np.zeros(4, int), np.array([0, 1, 5, 2], np.int16), "label: .*found 5"),
    (np.zeros(4, int), np.array([0, 1, 100, 2], np.uint8), "label: .*found 100 \\(1 pixels\\)"),
    (np.zeros(4, int), np.array([0, -2, 1, 2], np.int16), "label: .*found -2"),
    (np.zeros(4, int), np.array([0, 254, 1, 2], np.int16), "label: .*found 254"),
    (np.zeros(4, int), np.array([0, 1, 2, 1000], np.int32), "label: .*found 1000"),
    (np.zeros(4), np.zeros(4, np.int16), "pred: expected an integer array"),
    (np.zeros(4, int), np.zeros(4, bool), "label: expected an integer array"),
])
def test_bad_input_raises_one_line_error(pred, label, match):
    with pytest.raises(ValueError, match=match) as e:
        confusion(pred, label, 5, 5)
    assert "\n" not in str(e.value)


def test_rejected_batch_leaves_matrix_unchanged(rng):
    acc = ConfusionAccumulator(5, 5)
    acc.update(*random_batches(rng, 1, (4, 4), 5, 5)[0])
    before = acc.matrix.copy()
    with pytest.raises(ValueError, match="label"):
        acc.update(np.zeros(3, int), np.array([0, 9, 1], np.int16))
    np.testing.assert_array_equal(acc.matrix, before)


@pytest.mark.parametrize("n_clusters,n_classes,match", [
    (3, 5, "n_clusters: must be >= n_classes"), (5, 0, "n_classes"), (2.5, 2, "n_clusters"),
])
def test_bad_sizes(n_clusters, n_classes, match):
    with pytest.raises(ValueError, match=match):
        ConfusionAccumulator(n_clusters, n_classes)


def test_no_valid_pixels_is_an_error_at_scores_time():
    conf = confusion(np.zeros(0, int), np.zeros(0, np.int16), 5, 5)
    np.testing.assert_array_equal(conf, 0)
    conf2 = confusion(np.array([1, 2]), np.array([255, -1], np.int16), 5, 5)
    for c in (conf, conf2):
        with pytest.raises(ValueError, match="conf: no valid pixels"):
            scores(c)


def test_bad_conf_and_match():
    with pytest.raises(ValueError, match="conf: expected"):
        hungarian(np.zeros(5))
    with pytest.raises(ValueError, match="conf: needs n_clusters >= n_classes"):
        hungarian(np.ones((2, 3)))
    with pytest.raises(ValueError, match="conf: counts"):
        hungarian(-np.ones((3, 3)))
    with pytest.raises(ValueError, match="match: made for 3 clusters"):
        scores(np.ones((4, 3)), identity_match(3, 3))


# ------------------------------------------------------------------ many-to-one

def test_many_to_one_by_hand():
    """3 clusters, 2 classes: clusters 0 and 2 are mostly class 0, cluster 1 class 1."""
    from omh_ref.evaluate.metrics import many_to_one_scores

    conf = np.array([[8, 2], [1, 9], [5, 0]])
    r = many_to_one_scores(conf)
    assert r["cluster_to_class"].tolist() == [0, 1, 0]
    # predicted class 0 = clusters 0 + 2: [13, 2]; class 1 = cluster 1: [1, 9]
    assert r["acc"] == pytest.approx(100 * 22 / 25)
    assert r["iou"] == pytest.approx([100 * 13 / (15 + 14 - 13), 100 * 9 / (10 + 11 - 9)])
    assert r["miou"] == pytest.approx(np.mean(r["iou"])) and r["pixels"] == 25


def test_many_to_one_perfect_blind_and_permuted():
    """Known answers: a refinement of the classes scores 100; one cluster holding everything
    scores the majority share as accuracy; cluster ids (rows) do not matter; an empty cluster
    has no class."""
    from omh_ref.evaluate.metrics import many_to_one_scores

    rng = np.random.default_rng(0)
    refine = np.zeros((12, 4), dtype=np.int64)
    refine[np.arange(12), np.arange(12) % 4] = rng.integers(1, 50, size=12)
    assert many_to_one_scores(refine)["miou"] == pytest.approx(100.0)
    blind = np.zeros((6, 3), dtype=np.int64)
    blind[2] = [5, 3, 2]
    r = many_to_one_scores(blind)
    assert r["acc"] == pytest.approx(50.0) and r["cluster_to_class"].tolist() == [-1, -1, 0, -1, -1, -1]
    assert r["iou"] == pytest.approx([50.0, 0.0, 0.0])
    conf = rng.integers(0, 30, size=(9, 4))
    a, b = many_to_one_scores(conf), many_to_one_scores(conf[rng.permutation(9)])
    assert a["miou"] == b["miou"] and a["acc"] == b["acc"] and np.array_equal(a["iou"], b["iou"])
