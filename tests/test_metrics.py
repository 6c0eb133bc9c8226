"""omh_ref.evaluate.metrics against an independent torch rendering of STEGO's ``UnsupervisedMetrics``.

``StegoMetrics`` below is STEGO's class (mhamilton723/STEGO, ``src/utils.py``) written as STEGO
wrote it, minus the torchmetrics base class (its state is a plain tensor here), plus two test
hooks: ``official_mask`` picks STEGO's own prediction mask (``preds < n_classes``, which drops
every pixel predicted into an extra cluster) or the corrected one (``preds < n_classes +
extra_clusters``) that omh_ref implements; and ``compute`` keeps ``iou`` and ``histogram`` on
``self`` so per-class values can be compared. STEGO's values are float32 (its default-dtype
division, and the float32 zero column with extra clusters), so agreement is to float32 rounding.

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
from omh_ref.evaluate.metrics import (ConfusionAccumulator, Match, confusion, hungarian, identity_match,
                             matched_histogram, scores)

F32_RTOL = 1e-6   # STEGO computes IoU and accuracy in float32; ours is float64


@pytest.fixture
def rng(request):
    # one generator per test, seeded by the test's id (crc32 is stable across processes)
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


def make_stego(torch):
    """STEGO's UnsupervisedMetrics, as written in STEGO's src/utils.py (see the module docstring)."""

    class StegoMetrics:
        def __init__(self, prefix, n_classes, extra_clusters, compute_hungarian, official_mask):
            self.n_classes = n_classes
            self.extra_clusters = extra_clusters
            self.compute_hungarian = compute_hungarian
            self.prefix = prefix
            self.official_mask = official_mask
            self.stats = torch.zeros(n_classes + self.extra_clusters, n_classes, dtype=torch.int64)

        def update(self, preds, target):
            with torch.no_grad():
                actual = target.reshape(-1)
                preds = preds.reshape(-1)
                n_pred = self.n_classes if self.official_mask else self.n_classes + self.extra_clusters
                mask = (actual >= 0) & (actual < self.n_classes) & (preds >= 0) & (preds < n_pred)
                actual = actual[mask]
                preds = preds[mask]
                self.stats += torch.bincount(
                    (self.n_classes + self.extra_clusters) * actual + preds,
                    minlength=self.n_classes * (self.n_classes + self.extra_clusters)) \
                    .reshape(self.n_classes, self.n_classes + self.extra_clusters).t().to(self.stats.device)

        def compute(self):
            if self.compute_hungarian:
                self.assignments = linear_sum_assignment(self.stats.detach().cpu(), maximize=True)
                if self.extra_clusters == 0:
                    self.histogram = self.stats[np.argsort(self.assignments[1]), :]
                if self.extra_clusters > 0:
                    self.assignments_t = linear_sum_assignment(self.stats.detach().cpu().t(), maximize=True)
                    histogram = self.stats[self.assignments_t[1], :]
                    missing = list(set(range(self.n_classes + self.extra_clusters)) - set(self.assignments[0]))
                    new_row = self.stats[missing, :].sum(0, keepdim=True)
                    histogram = torch.cat([histogram, new_row], axis=0)
                    new_col = torch.zeros(self.n_classes + 1, 1, device=histogram.device)
                    self.histogram = torch.cat([histogram, new_col], axis=1)
            else:
                self.assignments = (torch.arange(self.n_classes).unsqueeze(1),
                                    torch.arange(self.n_classes).unsqueeze(1))
                self.histogram = self.stats

            tp = torch.diag(self.histogram)
            fp = torch.sum(self.histogram, dim=0) - tp
            fn = torch.sum(self.histogram, dim=1) - tp

            iou = tp / (tp + fp + fn)
            prc = tp / (tp + fn)  # noqa: F841 (STEGO computes it and does not report it)
            opc = torch.sum(tp) / torch.sum(self.histogram)
            self.iou = iou  # test hook

            metric_dict = {self.prefix + "mIoU": iou[~torch.isnan(iou)].mean().item(),
                           self.prefix + "Accuracy": opc.item()}
            return {k: 100 * v for k, v in metric_dict.items()}

    return StegoMetrics


def stego_run(batches, n_clusters, n_classes, official_mask=False, compute_hungarian=True):
    torch = pytest.importorskip("torch")
    m = make_stego(torch)("", n_classes, n_clusters - n_classes, compute_hungarian, official_mask)
    for pred, label in batches:
        m.update(torch.as_tensor(pred.astype(np.int64)), torch.as_tensor(label.astype(np.int64)))
    out = m.compute()
    return out, m


def ours_run(batches, n_clusters, n_classes):
    acc = ConfusionAccumulator(n_clusters, n_classes)
    for pred, label in batches:
        acc.update(pred, label)
    return acc.matrix, scores(acc.matrix, hungarian(acc.matrix))


def assert_matches_stego(batches, n_clusters, n_classes, official_mask=False):
    out, m = stego_run(batches, n_clusters, n_classes, official_mask)
    conf, s = ours_run(batches, n_clusters, n_classes)
    if not official_mask:
        np.testing.assert_array_equal(conf, m.stats.numpy())
    np.testing.assert_array_equal(matched_histogram(conf, hungarian(conf)), m.histogram.numpy())
    np.testing.assert_allclose(s["miou"], out["mIoU"], rtol=F32_RTOL)
    np.testing.assert_allclose(s["acc"], out["Accuracy"], rtol=F32_RTOL)
    stego_iou = 100 * m.iou.double().numpy()
    np.testing.assert_allclose(s["iou"], stego_iou[:n_classes], rtol=F32_RTOL, equal_nan=True)
    if n_clusters > n_classes:
        np.testing.assert_allclose(s["iou_unmatched"], stego_iou[n_classes], rtol=F32_RTOL,
                                   equal_nan=True)
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
    assert_matches_stego(batches, 5, 5)


@pytest.mark.parametrize("n_clusters", [7, 11])
def test_stego_parity_extra_clusters(rng, n_clusters):
    batches = random_batches(rng, 3, (3, 9, 5), n_clusters, 5)
    s = assert_matches_stego(batches, n_clusters, 5)
    assert s["iou_unmatched"] == 0.0  # unmatched clusters hold pixels, so they count as a 0


def test_stego_parity_absent_classes_give_nan(rng):
    # class 3 never labelled and clusters 2, 6 never predicted: after matching, some class has
    # no pixels on either side and its IoU is NaN, left out of the mean by both implementations
    batches = random_batches(rng, 2, (5, 13), 7, 5, classes=[0, 1, 2, 4], clusters=[0, 1, 3, 4, 5])
    for n_clusters in (5, 7):
        b = [(np.where(p < n_clusters, p, 0), lab) for p, lab in batches]
        s = assert_matches_stego(b, n_clusters, 5)
        if n_clusters == 5:  # cluster 2 is empty and is the one left for class 3
            assert np.isnan(s["iou"]).sum() == 1 and np.isnan(s["iou"][3])


def test_stego_official_mask_drops_extra_cluster_pixels(rng):
    # STEGO's own mask (preds < n_classes) is ours with extra-cluster predictions removed
    batches = random_batches(rng, 2, (7, 9), 8, 5)
    out, _ = stego_run(batches, 8, 5, official_mask=True)
    dropped = [(np.where(p < 5, p, -1), lab) for p, lab in batches]
    _, s = ours_run(dropped, 8, 5)
    np.testing.assert_allclose([s["miou"], s["acc"]], [out["mIoU"], out["Accuracy"]], rtol=F32_RTOL)


def test_stego_parity_identity_mapping(rng):
    # compute_hungarian=False (STEGO's linear probe): cluster c is class c
    batches = random_batches(rng, 2, (5, 11), 5, 5)
    out, m = stego_run(batches, 5, 5, compute_hungarian=False)
    conf, _ = ours_run(batches, 5, 5)
    s = scores(conf, identity_match(5, 5))
    np.testing.assert_allclose([s["miou"], s["acc"]], [out["mIoU"], out["Accuracy"]], rtol=F32_RTOL)


def test_stego_parity_fixed_case():
    # hand-checked: 2 classes, 3 clusters. conf rows = clusters, columns = classes
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1])
    label = np.array([0, 0, 1, 1, 0, 1, 255, -1, 1], dtype=np.int16)
    conf = confusion(pred, label, 3, 2)
    np.testing.assert_array_equal(conf, [[2, 0], [1, 3], [0, 1]])
    m = hungarian(conf)
    np.testing.assert_array_equal(m.cluster_to_class, [0, 1, -1])
    np.testing.assert_array_equal(m.unmatched, [2])
    s = scores(conf, m)
    # class 0: tp 2, predicted 2, labelled 3 -> 2/3; class 1: tp 3, 4, 4 -> 3/5; unmatched: 0
    np.testing.assert_allclose(s["iou"], [100 * 2 / 3, 60.0])
    np.testing.assert_allclose(s["miou"], 100 * (2 / 3 + 0.6 + 0) / 3)
    np.testing.assert_allclose(s["acc"], 100 * 5 / 7)
    assert s["iou_unmatched"] == 0.0


def test_stego_parity_fixed_case_torch():
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 0, 1])
    label = np.array([0, 0, 1, 1, 0, 1, 255, -1, 1], dtype=np.int16)
    assert_matches_stego([(pred, label)], 3, 2)


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
    s, s_p = scores(conf), scores(conf_p)
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
    s, s_p = scores(conf, m), scores(conf_p, m_p)
    np.testing.assert_array_equal(s_p["iou"], s["iou"])
    assert s_p["miou"] == s["miou"] and s_p["acc"] == s["acc"]


@given(label_maps(), st.randoms(use_true_random=False))
def test_perfect_prediction_up_to_relabelling_scores_100(case, rnd):
    pred, label, K, C = case
    valid = (label >= 0) & (label < C)
    assume(valid.any())
    relabel = np.array(rnd.sample(range(K), C))            # injective class -> cluster
    pred = np.where(valid, relabel[np.clip(label, 0, C - 1)], pred)
    s = scores(confusion(pred, label, K, C))
    assert s["miou"] == 100.0 and s["acc"] == 100.0
    present = np.isin(np.arange(C), label)
    assert np.all(s["iou"][present] == 100.0) and np.all(np.isnan(s["iou"][~present]))
    assert np.isnan(s["iou_unmatched"])  # the leftover clusters hold no pixels


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
