"""HP's two extraction inputs as formulas (omh_ref/features/attention.py, augment.py), no model: the
attention window weights against a direct rendering of docs/hp_reading.md §7 (HP @ 8913644
DinoFeaturizer.py 161-171, 88-113) on known matrices and against HP's lines in torch (torch.quantile,
its neighbourhood table and mixed code at 28 x 28), and the photometric augmentation's draws and
transforms against their known properties (hp_reading §8) and, where torchvision is installed,
against torchvision's own tensor functions."""
import colorsys
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from omh_ref.features import attention as at
from omh_ref.extract import augment as ag
from omh_ref.extract.backbone import normalize


# --------------------------------------------------------------------------------------------------
# Attention: a direct rendering of §7, written loop by loop
# --------------------------------------------------------------------------------------------------
def _reference(logits, h, w, sigma=28.0, quantiles=(0.1, 0.9)):
    """(B, n, n) -> (B, h, w, 9) float64: per row, clip to numpy's 'linear' quantiles, softmax,
    times sigma, zero below the mean; then each cell's 3x3 window, row-major, 0 outside."""
    B, n, _ = logits.shape
    out = np.zeros((B, h, w, 9))
    for b in range(B):
        for p in range(n):
            row = logits[b, p].astype(np.float64)
            lo, hi = (np.quantile(row, q, method="linear") for q in quantiles)
            row = np.maximum(np.minimum(row, hi), lo)
            e = np.exp(row - row.max())
            s = sigma * e / e.sum()
            s[s < s.mean()] = 0.0
            y, x = divmod(p, w)
            for o, (dy, dx) in enumerate((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)):
                if 0 <= y + dy < h and 0 <= x + dx < w:
                    out[b, y, x, o] = s[(y + dy) * w + (x + dx)]
    return out


@pytest.mark.parametrize("n", [2, 4, 9, 12, 50, 784])
@pytest.mark.parametrize("q", [0.1, 0.9, 0.0, 0.5, 1.0])
def test_quantile_is_numpys_linear_method(n, q):
    a = (np.random.default_rng(n).standard_normal((3, 5, n)) * 4).astype(np.float32)
    want = np.quantile(a, q, axis=-1, keepdims=True, method="linear")
    got = at.quantile_linear(a, q)
    assert got.shape == (3, 5, 1) and got.dtype == np.float32
    assert np.allclose(got, want, rtol=1e-6, atol=1e-6)
    # torch.quantile's default interpolation is the same rule
    torch = pytest.importorskip("torch")
    assert np.allclose(got, torch.quantile(torch.from_numpy(a), q, dim=-1, keepdim=True).numpy(), rtol=1e-6, atol=1e-5)


def test_quantile_interpolates_between_ranks():
    """At n = 784 HP's quantiles sit between ranks: 0.1 at 78.3, 0.9 at 704.7 (hp_reading §7)."""
    row = np.arange(784, dtype=np.float32)[None] * 2.0       # sorted, value = 2 * rank
    assert at.quantile_linear(row, 0.1)[0, 0] == pytest.approx(2 * 78.3, abs=1e-4)
    assert at.quantile_linear(row, 0.9)[0, 0] == pytest.approx(2 * 704.7, abs=1e-3)
    shuffled = row[:, np.random.default_rng(0).permutation(784)]
    assert at.quantile_linear(shuffled, 0.9)[0, 0] == at.quantile_linear(row, 0.9)[0, 0]


def test_a_hand_computed_row():
    """n = 4 (a 2 x 2 grid): the row [0, 1, 2, 3] is clipped to [0.3, 2.7] (ranks 0.3 and 2.7,
    interpolated), softmaxed, times 28; the two entries below the mean 7 become 0."""
    logits = np.array([[[0, 1, 2, 3]] * 4], np.float32)
    e = [math.exp(v) for v in (0.3, 1.0, 2.0, 2.7)]
    s = [28 * v / sum(e) for v in e]
    assert s[0] < 7 and s[1] < 7 < s[2]                       # so the zeroing is what makes the first two 0
    got = at.row_weights(logits)
    assert np.allclose(got[0, 0], [0, 0, s[2], s[3]], rtol=1e-6)
    # without the clip the kept weights would differ (the 0.3 and 2.7 bounds are really applied)
    raw = [28 * math.exp(v) / sum(math.exp(u) for u in range(4)) for v in range(4)]
    assert abs(raw[3] - s[3]) > 0.5


def test_zeroing_is_strictly_below_the_mean():
    """A flat row: every weight is sigma / n, the mean itself, and none is zeroed (HP's `<`)."""
    got = at.row_weights(np.zeros((1, 4, 4), np.float32))
    assert np.array_equal(got, np.full((1, 4, 4), 7.0, np.float32))


def test_window_weights_follow_the_formula_on_a_known_matrix():
    """A 3 x 4 grid (corners, edges and interior cells; not square), logits falling with the
    distance between patches plus noise: the nine weights are the reference's, the cells outside
    the grid exactly 0, the zeroing visible (far cells below the mean are 0)."""
    h, w = 3, 4
    n = h * w
    yx = np.stack(np.divmod(np.arange(n), w), axis=1).astype(np.float32)
    dist = ((yx[:, None] - yx[None]) ** 2).sum(-1)
    rng = np.random.default_rng(1)
    logits = np.stack([-dist + rng.normal(0, 0.3, (n, n)) for _ in range(2)]).astype(np.float32)
    want = _reference(logits, h, w)
    got = at.window_weights(logits, h, w)
    assert got.shape == (2, h, w, 9) and got.dtype == np.float32
    assert np.allclose(got, want, rtol=1e-5, atol=1e-6)
    inside = np.zeros((h, w, 9), bool)
    for y in range(h):
        for x in range(w):
            for o, (dy, dx) in enumerate(at.OFFSETS):
                inside[y, x, o] = 0 <= y + dy < h and 0 <= x + dx < w
    assert (got[:, ~inside] == 0).all()
    assert inside[0, 0].sum() == 4 and inside[0, 1].sum() == 6 and inside[1, 0].sum() == 6 and inside[1, 1].sum() == 9
    assert np.array_equal(at.cells_inside(h, w), inside.sum(-1))
    assert list(inside[0, 0]) == [0, 0, 0, 0, 1, 1, 0, 1, 1]   # corner: self, right, below, below-right
    assert list(inside[2, 3]) == [1, 1, 0, 1, 1, 0, 0, 0, 0]   # the opposite corner
    # the centre offset is the patch's own weight, the largest of its row here
    rows = at.row_weights(logits)
    assert np.array_equal(got[:, 1, 2, 4], rows[:, 1 * w + 2, 1 * w + 2])
    assert (got[..., 4] > 0).all()
    assert (rows == 0).sum() > n                               # the zeroing acts: far cells are 0


def test_window_is_each_patchs_neighbourhood_in_row_major_order():
    """With ω[p, q] = 100 p + q (no row processing), offset o of cell (y, x) holds 100 p + q for
    q = (y + dy, x + dx): the order is (-1,-1), (-1,0), ..., (1,1)."""
    h, w = 4, 3
    n = h * w
    full = (100 * np.arange(n)[:, None] + np.arange(n)[None]).astype(np.float32)[None]
    got = at.window(full, h, w)
    y, x = 2, 1
    p = y * w + x
    assert list(got[0, y, x]) == [100 * p + (y + dy) * w + (x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert list(got[0, 0, 2]) == [0, 0, 0, 100 * 2 + 1, 100 * 2 + 2, 0, 100 * 2 + 4, 100 * 2 + 5, 0]


def _hp_rows_torch(torch, a):
    """HP's row processing (DinoFeaturizer.py 165-171) in torch on (B, n, n) float32 logits."""
    hi = torch.quantile(a, 0.9, dim=2, keepdim=True)
    lo = torch.quantile(a, 0.1, dim=2, keepdim=True)
    t = torch.max(torch.min(a, hi), lo).softmax(dim=-1) * 28
    t[t < torch.mean(t, dim=2, keepdim=True)] = 0.0
    return t


@pytest.mark.parametrize("n", [64, 784])      # 784: HP's 28 x 28 grid, quantile ranks 78.3 and 704.7
def test_row_processing_against_hp_lines_in_torch(n):
    """HP's own lines in torch (torch.quantile, softmax, the mean) on random logits: the same
    weights and the same zeros."""
    torch = pytest.importorskip("torch")
    a = torch.from_numpy((np.random.default_rng(n).standard_normal((2, n, n)) * 3).astype(np.float32))
    t = _hp_rows_torch(torch, a).numpy()
    got = at.row_weights(a.numpy())
    assert np.array_equal(got == 0, t == 0)
    assert 0.3 < (t == 0).mean() < 0.9                         # the zeroing acts, and not on everything
    assert np.allclose(got, t, rtol=1e-5, atol=1e-6)


def _hp_neighbourhood(torch, sz):
    """HP's table (DinoFeaturizer.py 88-113), case by case as HP lists them: for each patch i of a
    sz x sz grid the indices of its window cut at the border -> (index mask (n, n) float16, the
    number of cells (n, 1))."""
    n = sz * sz
    mask, count = torch.zeros((n, n), dtype=torch.float16), torch.zeros(n, dtype=torch.long)
    for i in range(n):
        if i == 0:
            idx = [i, i + 1, i + sz, i + sz + 1]
        elif i == sz - 1:
            idx = [i - 1, i, i + sz - 1, i + sz]
        elif i == n - sz:
            idx = [i - sz, i - sz + 1, i, i + 1]
        elif i == n - 1:
            idx = [i - sz - 1, i - sz, i - 1, i]
        elif 1 <= i <= sz - 2:
            idx = [i - 1, i, i + 1, i + sz - 1, i + sz, i + sz + 1]
        elif n - sz + 1 <= i <= n - 2:
            idx = [i - sz - 1, i - sz, i - sz + 1, i - 1, i, i + 1]
        elif i % sz == 0:
            idx = [i - sz, i - sz + 1, i, i + 1, i + sz, i + sz + 1]
        elif (i + 1) % sz == 0:
            idx = [i - sz - 1, i - sz, i - 1, i, i + sz - 1, i + sz]
        else:
            idx = [i - sz - 1, i - sz, i - sz + 1, i - 1, i, i + 1, i + sz - 1, i + sz, i + sz + 1]
        mask[i, idx] = 1.0
        count[i] = len(idx)
    return mask, count[:, None]


def _mix(window, cells, z):
    """The mixed code from what attn.npy stores: m[b, y, x] = (1 / n_yx) sum_o ω[b, y, x, o]
    z[b, y + dy, x + dx] (hp_reading §16), z (B, h, w, D) -> (B, h, w, D) float64."""
    B, h, w, _ = window.shape
    zp = np.pad(z.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    m = sum(window[..., o, None].astype(np.float64) * zp[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
            for o, (dy, dx) in enumerate(at.OFFSETS))
    return m / cells[None, :, :, None]


def test_stored_windows_give_hps_mixed_code_in_torch():
    """End to end at HP's size (28 x 28, n = 784): HP's torch lines (DinoFeaturizer.py 165-171,
    the weights masked by its neighbourhood table and summed over the code, divided by the cell
    count, 198-210) give the same mixed code as the nine stored weights per patch with
    ``cells_inside``; from the float16 file within float16's rounding."""
    torch = pytest.importorskip("torch")
    sz, B, D = 28, 2, 8
    n = sz * sz
    rng = np.random.default_rng(11)
    yx = np.stack(np.divmod(np.arange(n), sz), axis=1).astype(np.float32)
    dist = ((yx[:, None] - yx[None]) ** 2).sum(-1)
    logits = np.stack([-0.02 * dist + rng.normal(0, 1.0, (n, n)) for _ in range(B)]).astype(np.float32)
    code = rng.standard_normal((B, D, sz, sz)).astype(np.float32)
    mask, count = _hp_neighbourhood(torch, sz)
    t = _hp_rows_torch(torch, torch.from_numpy(logits)) * mask.unsqueeze(0)
    flat = torch.from_numpy(code).reshape(B, D, n).permute(0, 2, 1)              # (B, n, D)
    want = torch.stack([(t[b].unsqueeze(-1) * flat[b].unsqueeze(0)).sum(dim=1) / count for b in range(B)])
    want = want.permute(0, 2, 1).reshape(B, D, sz, sz).permute(0, 2, 3, 1).numpy()   # (B, h, w, D)
    assert np.array_equal(at.cells_inside(sz, sz).reshape(n), count[:, 0].numpy())
    win = at.window_weights(logits, sz, sz)
    assert np.array_equal(win != 0, at.window(t.numpy(), sz, sz) != 0)
    z = np.moveaxis(code, 1, -1)
    got = _mix(win, at.cells_inside(sz, sz), z)
    assert np.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want).max() > 0.1 and (win[:, 1:-1, 1:-1] == 0).any()         # non-trivial weights and zeros
    stored = _mix(win.astype(np.float16), at.cells_inside(sz, sz), z)
    assert np.allclose(stored, want, rtol=2e-3, atol=2e-3)
    # a window in another offset order would not give HP's code
    assert not np.allclose(_mix(win[..., ::-1], at.cells_inside(sz, sz), z), want, rtol=1e-2, atol=1e-2)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"shape \(B, n, n\)"):
        at.row_weights(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="attention of 9 patches for a 2x4 grid"):
        at.window(np.zeros((1, 9, 9), np.float32), 2, 4)


# --------------------------------------------------------------------------------------------------
# The augmentation: draws
# --------------------------------------------------------------------------------------------------
def test_same_seed_and_name_same_draw_and_bytes():
    rgb = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    assert ag.draw(0, "a.jpg#tl") == ag.draw(0, "a.jpg#tl")
    for space in ag.SPACES:
        one = ag.augmented_input(rgb, 0, "a.jpg#tl", space)
        assert one.tobytes() == ag.augmented_input(rgb, 0, "a.jpg#tl", space).tobytes()
        assert one.shape == (3, 20, 24) and one.dtype == np.float32
    assert ag.draw(0, "a.jpg#tl") != ag.draw(0, "a.jpg#tr")      # another crop of the image
    assert ag.draw(0, "a.jpg#tl") != ag.draw(1, "a.jpg#tl")      # another seed


def test_draws_over_many_crops_cover_the_ranges_and_rates():
    draws = [ag.draw(7, f"img{i}.png") for i in range(600)]
    assert len({d.order for d in draws}) == 24                   # every order of the four
    for key, (lo, hi) in (("brightness", ag.BRIGHTNESS), ("contrast", ag.CONTRAST),
                          ("saturation", ag.SATURATION), ("hue", ag.HUE)):
        v = np.array([getattr(d, key) for d in draws])
        assert lo <= v.min() < lo + 0.05 and hi - 0.05 < v.max() <= hi, key
    gray = np.mean([d.grayscale for d in draws])
    blur = [d.blur_sigma for d in draws if d.blur_sigma is not None]
    assert 0.15 < gray < 0.25 and 0.44 < len(blur) / 600 < 0.56
    assert 0.1 <= min(blur) < 0.2 and 1.9 < max(blur) <= 2.0


# --------------------------------------------------------------------------------------------------
# The augmentation: each transform
# --------------------------------------------------------------------------------------------------
def _unit(seed=0, shape=(3, 9, 11)):
    return np.random.default_rng(seed).random(shape, dtype=np.float32)


def _draw(**kw):
    base = dict(order=(), brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0, grayscale=False, blur_sigma=None)
    return ag.Draw(**{**base, **kw})


def test_grayscale_makes_equal_channels_of_the_luma():
    x = _unit()
    got = ag.apply(x, _draw(grayscale=True))
    assert np.array_equal(got[0], got[1]) and np.array_equal(got[1], got[2])
    assert np.allclose(got[0], 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2], atol=1e-6)


def test_neutral_factors_are_the_identity_on_a_unit_image():
    x = _unit(1)
    got = ag.apply(x, _draw(order=(3, 1, 0, 2)))
    assert np.allclose(got, x, atol=2e-6)
    assert not np.allclose(ag.apply(x, _draw(order=(3,), hue=0.05)), x, atol=1e-3)


def test_brightness_scales_and_clamps():
    x = _unit(2)
    assert np.array_equal(ag.adjust_brightness(x, 0.8), np.clip(np.float32(0.8) * x, 0, 1))
    assert (ag.adjust_brightness(x, 1.3) <= 1).all() and (ag.adjust_brightness(x, 1.3) == 1).any()
    # in normalised space (HP's) the clamp squeezes: brightness 1 is not the identity there
    z = normalize(np.random.default_rng(0).integers(0, 256, (9, 11, 3), dtype=np.uint8))
    assert z.min() < 0 and z.max() > 1
    assert np.array_equal(ag.adjust_brightness(z, 1.0), np.clip(z, 0, 1))


def test_contrast_and_saturation_blend_towards_grey():
    x = _unit(3)
    gray = ag.grayscale(x)
    assert np.allclose(ag.adjust_contrast(x, 0.0), np.broadcast_to(gray.mean(), x.shape), atol=1e-6)
    assert np.allclose(ag.adjust_saturation(x, 0.0), np.broadcast_to(gray, x.shape), atol=1e-6)
    assert np.allclose(ag.adjust_saturation(x, 0.5), 0.5 * x + 0.5 * gray, atol=1e-6)


def test_hue_shift_is_colorsys_rotation_on_unit_colours():
    x = _unit(4, (3, 5, 6))
    for f in (0.1, -0.1, 1 / 3, -0.5):
        got = ag.adjust_hue(x, f)
        for y in range(5):
            for xx in range(6):
                hh, s, v = colorsys.rgb_to_hsv(*x[:, y, xx].astype(float))
                want = colorsys.hsv_to_rgb((hh + f) % 1.0, s, v)
                assert np.allclose(got[:, y, xx], want, atol=1e-5), (f, y, xx)
    red = np.zeros((3, 1, 1), np.float32)
    red[0] = 1
    assert np.allclose(ag.adjust_hue(red, 1 / 3)[:, 0, 0], [0, 1, 0], atol=1e-6)


def test_hue_on_normalised_values_keeps_v_and_clamps_the_rest():
    """Out of [0, 1] (HP's normalised image) torchvision's HSV round trip keeps each pixel's value
    v = max channel as it is and clamps p, q, t to [0, 1]: every output value is either the
    pixel's max or in [0, 1] -- so even a zero shift is not the identity there."""
    z = normalize(np.random.default_rng(9).integers(0, 256, (7, 8, 3), dtype=np.uint8))
    vmax = z.max(axis=0)
    for f in (0.0, 0.07, -0.1):
        got = ag.adjust_hue(z, f)
        assert (np.isclose(got, vmax[None], atol=1e-6) | ((got >= 0) & (got <= 1))).all(), f
    assert not np.allclose(ag.adjust_hue(z, 0.0), z, atol=1e-3)
    # two pixels by hand through the formulas: (-1, -0.5, -2): v = -0.5, s = 1.5 / -0.5 = -3,
    # h = (2 + 1/3 - 1) / 6 -> sector 1: (q, v, p) = (0, -0.5, 0) once clamped; (0.5, -0.5, 2):
    # v = 2, s = 1.25, h = 4.4 / 6 -> sector 4, f = 0.4: (t, p, v) = (0.5, 0, 2)
    px = np.array([[-1.0, 0.5], [-0.5, -0.5], [-2.0, 2.0]], np.float32)[:, None, :]
    assert np.allclose(ag.adjust_hue(px, 0.0)[:, 0, :], [[0, 0.5], [-0.5, 0], [0, 2.0]], atol=1e-6)


def test_blur_keeps_a_constant_image_and_spreads_an_impulse_as_its_kernel():
    const = np.full((3, 8, 9), 0.37, np.float32)
    for sigma in (0.1, 0.7, 2.0):
        assert np.allclose(ag.gaussian_blur(const, sigma), const, atol=1e-6)
    k = ag.gaussian_kernel(1.3)
    assert k.shape == (5, 5) and abs(k.sum() - 1) < 1e-6 and np.allclose(k, k.T) and np.allclose(k, k[::-1])
    imp = np.zeros((3, 11, 11), np.float32)
    imp[:, 5, 5] = 1
    assert np.allclose(ag.gaussian_blur(imp, 1.3)[0, 3:8, 3:8], k, atol=1e-7)
    # reflect padding (no edge repeat), torch's F.pad(mode="reflect") then a depthwise conv
    torch = pytest.importorskip("torch")
    x = _unit(5, (3, 7, 8))
    t = torch.nn.functional.pad(torch.from_numpy(x)[None], (2, 2, 2, 2), mode="reflect")
    want = torch.nn.functional.conv2d(t, torch.from_numpy(k).expand(3, 1, 5, 5), groups=3)[0].numpy()
    assert np.allclose(ag.gaussian_blur(x, 1.3), want, atol=1e-6)


def test_the_order_is_applied():
    x = _unit(6)
    a = ag.apply(x, _draw(order=(0, 3), brightness=1.3, hue=0.1))
    b = ag.apply(x, _draw(order=(3, 0), brightness=1.3, hue=0.1))
    assert not np.allclose(a, b, atol=1e-3)


def test_the_two_spaces():
    """normalised: the draw acts on the normalised crop; rgb: on the [0, 1] crop, normalised after."""
    rgb = np.random.default_rng(8).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    d = ag.draw(3, "x.png")
    assert np.array_equal(ag.normalise_unit(ag.to_unit(rgb)), normalize(rgb))       # the same arithmetic
    assert np.array_equal(ag.augmented_input(rgb, 3, "x.png", "normalised"), ag.apply(normalize(rgb), d))
    assert np.array_equal(ag.augmented_input(rgb, 3, "x.png", "rgb"), ag.normalise_unit(ag.apply(ag.to_unit(rgb), d)))
    with pytest.raises(ValueError, match="expected one of normalised, rgb"):
        ag.augmented_input(rgb, 3, "x.png", "lab")


def _torchvision_tensor_functions():
    """torchvision's ``transforms/_functional_tensor.py``, loaded from its file alone (it needs only
    torch, so a torchvision whose compiled ops do not match the installed torch still serves);
    the test is skipped where torchvision is not installed."""
    pytest.importorskip("torch")
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchvision is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "transforms" / "_functional_tensor.py"
    mod_spec = importlib.util.spec_from_file_location("_tv_functional_tensor", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("space", ag.SPACES)
def test_the_transforms_against_torchvisions_own(space):
    """Each adjustment and whole draws against torchvision's tensor functions, on [0, 1] images
    and on normalised ones (HP's: out of [0, 1], where the clamps and the HSV round trip act)."""
    import torch

    ft = _torchvision_tensor_functions()
    fns = (ft.adjust_brightness, ft.adjust_contrast, ft.adjust_saturation, ft.adjust_hue)
    rng = np.random.default_rng(12)
    for trial in range(8):
        rgb = rng.integers(0, 256, (17, 13, 3), dtype=np.uint8)
        x = ag.to_unit(rgb) if space == "rgb" else normalize(rgb)
        t = torch.from_numpy(x.copy())
        f, hue, sigma = float(rng.uniform(0.7, 1.3)), float(rng.uniform(-0.1, 0.1)), float(rng.uniform(0.1, 2.0))
        for ours, theirs, v in zip(ag.ADJUST, fns, (f, f, f, hue)):
            assert np.allclose(ours(x, v), theirs(t, v).numpy(), atol=1e-6), (ours.__name__, trial)
        assert np.array_equal(np.repeat(ag.grayscale(x), 3, axis=0), ft.rgb_to_grayscale(t, 3).numpy())
        assert np.allclose(ag.gaussian_blur(x, sigma), ft.gaussian_blur(t, [5, 5], [sigma, sigma]).numpy(), atol=1e-6)
        d = ag.draw(trial, f"img{trial}.png")
        y = t
        for i in d.order:
            y = fns[i](y, (d.brightness, d.contrast, d.saturation, d.hue)[i])
        if d.grayscale:
            y = ft.rgb_to_grayscale(y, 3)
        if d.blur_sigma is not None:
            y = ft.gaussian_blur(y, [5, 5], [d.blur_sigma, d.blur_sigma])
        assert np.allclose(ag.apply(x, d), y.numpy(), atol=1e-5), trial
