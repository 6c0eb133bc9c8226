"""HP's hand-written pieces: the masked, weighted SupCon (losses/supcon.py), the neighbour mix and
the pairwise distance (ops/): float64 gradient checks, the edge cases where HP's code gives NaN,
a direct full-matrix evaluation, HP's own way in torch (docs/hp_reading.md §6, §7, §8), the strict
CuPy stand-in, and properties."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from omh_ref.core import backend, checks
from omh_ref.core import strict_device as sd
from omh_ref.core.backend import to_host
from omh_ref.core.gradcheck import TOLERANCES, check_jacobian, check_vjp
from omh_ref.core.losses import supcon
from omh_ref.core.ops import neighbour_mix, pairwise_distance
from tests.strategies import seeds

F32 = TOLERANCES["float32"]
TAU = 0.6


def _nrm(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _problem(seed, **kw):
    return checks.supcon_inputs(np.random.default_rng(seed), **kw)


def _stacked(fa, Ra, fs, Rs, lam, U, n, tau=TAU):
    """SupCon as (forward, backward) of the code arrays with one stacked output (check_vjp's form)."""
    def forward(*codes):
        losses, cache = supcon.forward(list(codes), fa, Ra, fs, Rs, lam, U, n, tau)
        return np.stack(losses), cache

    def backward(dout, cache):
        return tuple(supcon.backward(list(dout), cache))
    return forward, backward


def _direct(codes, fa, Ra, fs, Rs, lam, U, n, tau=TAU, base_tau=supcon.BASE_TAU):
    """The decisions' loss and gradients from full N x N matrices, written from the formula:
    -> (losses, dcodes for unit upstream gradients)."""
    N = fa.shape[0]
    B = N // n
    eye = np.eye(N, dtype=bool)
    Ca, Cs = fa @ fa.T, fs @ fs.T
    A = ((Ca > Ra[:, None]) | (Ca > Ra[None, :])) & ~eye
    Bm = ((Cs > Rs[:, None]) | (Cs > Rs[None, :])) & ~eye
    Wt = A + lam * Bm
    Uf = np.ones((N, N), bool) if U is None else U[np.arange(N) % n]      # row i draws U[p(i)]
    Den = (A | Uf) & ~eye
    valid, c = A.any(1), Wt.sum(1)
    img = np.arange(N) // n
    Wb = np.bincount(img, weights=np.where(valid, c, 0), minlength=B)
    losses, grads = [], []
    for code in codes:
        S = code @ code.T / tau
        Sm = np.where(Den, S, -np.inf)
        mx = np.where(Den.any(1), Sm.max(1), 0)
        with np.errstate(divide="ignore"):
            lse = np.log(np.exp(Sm - mx[:, None]).sum(1)) + mx             # -inf for an empty row
        rowsum = np.where(valid, (Wt * S).sum(1) - c * np.where(valid, lse, 0), 0)
        Lb = np.array([-(tau / base_tau) * rowsum[img == b].sum() / Wb[b] if Wb[b] > 0 else 0.0
                       for b in range(B)])
        losses.append(Lb.mean())
        pi = np.where(Den & valid[:, None], np.exp(Sm - np.where(valid, lse, 0)[:, None]), 0)
        coef = np.where(valid, -1 / (base_tau * B * np.where(Wb > 0, Wb, 1)[img]), 0)
        G = coef[:, None] * (Wt - c[:, None] * pi)
        grads.append((G + G.T) @ code)
    return losses, grads


def _isolate(codes, fa, Ra, fs, Rs, U, pixels):
    """Give ``pixels`` features orthogonal to every other pixel's (and to each other's), in both
    tests, with every threshold positive: they are nobody's positive and have none."""
    fa, fs = [np.concatenate([f, np.zeros((f.shape[0], len(pixels)))], axis=1) for f in (fa, fs)]
    for k, i in enumerate(pixels):
        for f in (fa, fs):
            f[i] = 0.0
            f[i, -len(pixels) + k] = 1.0
    Ra, Rs = np.maximum(Ra, 0.05), np.maximum(Rs, 0.05)
    return codes, fa, Ra, fs, Rs, U


# ---------------------------------------------------------------- gradient checks

@pytest.mark.parametrize("lam", [0.0, 0.45])
@pytest.mark.parametrize("rho", [0.3, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_supcon_gradient(lam, rho, seed):
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(seed, lam=lam, rho=rho)
    fwd, bwd = _stacked(fa, Ra, fs, Rs, lam, U, n)
    assert 0 < supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)[1].valid.mean() <= 1
    rep = check_vjp(fwd, bwd, tuple(codes), seed=seed, n_dirs=3)
    assert rep.passed, rep.row()


def test_supcon_full_jacobian_with_three_code_arrays():
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(3, B=2, n=3, D=3, n_codes=3)
    rep = check_jacobian(*_stacked(fa, Ra, fs, Rs, lam, U, n), tuple(codes))
    assert rep.passed, rep.row()


def test_supcon_gradient_check_sees_a_wrong_gradient():
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(4)
    fwd, bwd = _stacked(fa, Ra, fs, Rs, lam, U, n)
    assert not check_vjp(fwd, lambda d, c: tuple(g * 1.001 for g in bwd(d, c)), tuple(codes)).passed


@pytest.mark.parametrize("shape", [(2, 4, 5, 3), (1, 1, 4, 2), (3, 2, 2, 1), (1, 3, 1, 2)])
def test_neighbour_mix_gradient(shape):
    rng = np.random.default_rng(sum(shape))
    omega = checks.window_weights_like(rng, *shape[:3])
    z = rng.standard_normal(shape)
    fwd = lambda z: neighbour_mix.forward(z, omega)  # noqa: E731
    assert check_vjp(fwd, neighbour_mix.backward, (z,), seed=1).passed
    assert check_jacobian(fwd, neighbour_mix.backward, (z,)).passed


def test_pairwise_distance_gradient():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 4, 6))
    assert check_vjp(pairwise_distance.forward, pairwise_distance.backward, (a, b), n_dirs=3).passed
    assert check_jacobian(pairwise_distance.forward, pairwise_distance.backward, (a[0], b[0])).passed


def test_pairwise_distance_at_zero_is_finite():
    a = np.zeros((2, 3))
    b = np.full((2, 3), pairwise_distance.EPS)          # a − b + eps = 0 exactly
    d, cache = pairwise_distance.forward(a, b)
    da, db = pairwise_distance.backward(np.ones(2), cache)
    assert np.all(d == 0) and np.all(da == 0) and np.all(db == 0)


# ---------------------------------------------------------------- SupCon's edge cases

def test_an_anchor_without_positives_and_an_empty_denominator_adds_nothing_and_no_nan():
    """HP's NaN (§12.11): pixel 5 has no agnostic (nor specific) positive and U misses all its
    candidates, and no other anchor's denominator holds it: its code enters nothing."""
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(6, rho=0.4)
    i = 5
    codes, fa, Ra, fs, Rs, U = _isolate(codes, fa, Ra, fs, Rs, U, [i])
    U[i % n] = False                      # its sampled denominator is empty ...
    U[:, i] = False                       # ... and nobody samples it
    losses, cache = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)
    assert not cache.valid[i] and cache.valid.sum() > n
    grads = supcon.backward([1.0, -0.7], cache)
    assert all(np.isfinite(x).all() for x in (*losses, *grads))
    assert all(np.all(g[i] == 0) for g in grads)                  # its row contributes 0
    moved = [c.copy() for c in codes]
    moved[0][i] = _nrm(np.random.default_rng(0).standard_normal(codes[0].shape[1]))
    np.testing.assert_allclose(supcon.forward(moved, fa, Ra, fs, Rs, lam, U, n, TAU)[0], losses, rtol=1e-12)
    want, wgrads = _direct(codes, fa, Ra, fs, Rs, lam, U, n)
    np.testing.assert_allclose(losses, want, rtol=1e-12)
    assert check_vjp(*_stacked(fa, Ra, fs, Rs, lam, U, n), tuple(codes)).passed


def test_hp_code_gives_nan_gradients_there():
    """The same case through HP's way (torch): the loss is finite but the gradient is NaN, which is
    what the decision above avoids."""
    torch = pytest.importorskip("torch")
    from omh_ref.core import torch_reference as tr

    codes, fa, Ra, fs, Rs, lam, U, n = _problem(6, rho=0.4)
    codes, fa, Ra, fs, Rs, U = _isolate(codes, fa, Ra, fs, Rs, U, [5])
    U[5 % n] = False
    tc = [tr.tensor(c, requires_grad=True) for c in codes]
    loss = tr.hp_supcon(tc, *(tr.tensor(x) for x in (fa, Ra, fs, Rs)), lam, U, n, TAU)
    (g,) = torch.autograd.grad(loss, [tc[0]])
    assert torch.isfinite(loss) and torch.isnan(g).any()


def test_an_image_without_a_valid_anchor_gives_zero_and_counts_in_the_mean():
    """HP: NaN (§12.12). Here L_b = 0 and the mean still divides by B."""
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(7, rho=0.5)
    img = list(range(n, 2 * n))                                   # image 1
    codes, fa, Ra, fs, Rs, U = _isolate(codes, fa, Ra, fs, Rs, U, img)
    U[:, img] = False                     # in no denominator either: the other images see no difference
    losses, cache = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)
    assert cache.W[1] == 0 and cache.W[0] > 0 and cache.W[2] > 0
    grads = supcon.backward([1.0, 1.0], cache)
    assert all(np.isfinite(x).all() for x in (*losses, *grads))
    want, wgrads = _direct(codes, fa, Ra, fs, Rs, lam, U, n)
    np.testing.assert_allclose(losses, want, rtol=1e-12)
    # the other two images' sum over 3, not over 2
    keep = np.r_[0:n, 2 * n:3 * n]
    sub = supcon.forward([c[keep] for c in codes], fa[keep], Ra[keep], fs[keep], Rs[keep], lam,
                         None if U is None else U[:, keep], n, TAU)[0]
    np.testing.assert_allclose(np.array(losses) * 3, np.array(sub) * 2, rtol=1e-12)
    assert check_vjp(*_stacked(fa, Ra, fs, Rs, lam, U, n), tuple(codes)).passed


def test_no_valid_anchor_at_all_gives_zero_loss_and_gradient():
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(8, B=2, n=2)
    codes, fa, Ra, fs, Rs, U = _isolate(codes, fa, Ra, fs, Rs, U, range(4))
    losses, cache = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)
    grads = supcon.backward([1.0, 1.0], cache)
    assert all(float(x) == 0 for x in losses) and all(np.all(g == 0) for g in grads)


def test_comparisons_are_strict():
    """A cosine equal to the threshold is not a positive (HP's ``<`` of the threshold)."""
    fa = np.zeros((4, 3))
    fa[[0, 1], 0] = 1.0                                           # pixels 0 and 1: cosine exactly 1
    fa[[2, 3], 1] = 1.0                                           # pixels 2 and 3 too
    codes = [_nrm(np.random.default_rng(0).standard_normal((4, 2)))]
    for R, want in ((1.0, [False] * 4), (np.nextafter(1.0, 0.0), [True] * 4)):
        Ra = np.full(4, R)
        cache = supcon.forward(codes, fa, Ra, fa, np.full(4, 2.0), 0.5, None, 2, TAU)[1]
        assert cache.valid.tolist() == want


def test_a_specific_positive_alone_does_not_make_an_anchor_valid():
    """Validity by agnostic positives only (§12.8): an anchor whose only positives are task-specific
    adds nothing, whatever λ."""
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(9)
    codes, fa, Ra, fs, Rs, U = _isolate(codes, fa, Ra, fs, Rs, U, [2])
    fs = fs.copy()
    fs[2] = fs[7]                                                  # a task-specific twin
    Rs = Rs.copy()
    Rs[2] = Rs[7] = 0.5
    cache = supcon.forward(codes, fa, Ra, fs, Rs, 0.8, U, n, TAU)[1]
    assert not cache.valid[2] and cache.c[2] >= 0.8


def test_bad_inputs_name_the_argument():
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(0)
    with pytest.raises(ValueError, match="n .pixels per image"):
        supcon.forward(codes, fa, Ra, fs, Rs, lam, U, 5, TAU)
    with pytest.raises(ValueError, match="U must be"):
        supcon.forward(codes, fa, Ra, fs, Rs, lam, U[:, :-1], n, TAU)
    with pytest.raises(ValueError, match=r"codes\[1\]"):
        supcon.forward([codes[0], codes[1][:-1]], fa, Ra, fs, Rs, lam, U, n, TAU)
    with pytest.raises(ValueError, match="Rs"):
        supcon.forward(codes, fa, Ra, fs, Rs[:-1], lam, U, n, TAU)
    with pytest.raises(ValueError, match="omega"):
        neighbour_mix.forward(np.zeros((1, 3, 3, 2)), np.zeros((1, 3, 3, 8)))
    with pytest.raises(ValueError, match="pairwise_distance"):
        pairwise_distance.forward(np.zeros((2, 3)), np.zeros((2, 4)))


# ---------------------------------------------------------------- against direct evaluations

@pytest.mark.parametrize("lam,rho", [(0.0, None), (0.35, 0.25), (0.9, 0.05), (0.2, None)])
@pytest.mark.parametrize("seed", [10, 11])
def test_blockwise_matches_the_full_matrices(lam, rho, seed):
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(seed, B=4, n=5, lam=lam, rho=rho)
    losses, cache = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)
    want, wgrads = _direct(codes, fa, Ra, fs, Rs, lam, U, n)
    np.testing.assert_allclose(losses, want, rtol=1e-12)
    for g, w in zip(supcon.backward([1.0, 1.0], cache), wgrads):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14 * np.abs(w).max())


def test_thresholds_blockwise_equal_the_full_product():
    rng = np.random.default_rng(12)
    u, pool = _nrm(rng.standard_normal((23, 4))), _nrm(rng.standard_normal((7, 4)))
    want = (u @ pool.T).max(1)
    for rows in (1, 5, 23, 4096):
        np.testing.assert_allclose(supcon.thresholds(u, pool, rows=rows), want, rtol=1e-15, atol=1e-15)
    with pytest.raises(ValueError, match="thresholds"):
        supcon.thresholds(u, pool[:, :3])


@pytest.mark.parametrize("tau", [0.005, 0.05])
def test_small_temperatures_stay_finite_in_float32(tau):
    """Logits of ±1/τ: the shift over the denominator and the clip outside it keep every exp in
    range, so float32 agrees with the float64 full matrices."""
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(14, rho=0.3)
    want, wgrads = _direct(codes, fa, Ra, fs, Rs, lam, U, n, tau=tau)
    f32 = [x.astype(np.float32) for x in (fa, Ra, fs, Rs)]
    losses, cache = supcon.forward([c.astype(np.float32) for c in codes], *f32[:2], *f32[2:], lam, U, n, tau)
    grads = supcon.backward([1.0, 1.0], cache)
    assert all(np.isfinite(x).all() for x in (*losses, *grads))
    np.testing.assert_allclose(losses, want, rtol=1e-3)
    for g, w in zip(grads, wgrads):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-3 * np.abs(w).max())


def test_u_all_true_is_u_none():
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(13)
    ones = np.ones_like(U)
    a = supcon.forward(codes, fa, Ra, fs, Rs, lam, ones, n, TAU)
    b = supcon.forward(codes, fa, Ra, fs, Rs, lam, None, n, TAU)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-14)
    for x, y in zip(supcon.backward([1.0, 2.0], a[1]), supcon.backward([1.0, 2.0], b[1])):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- HP's way, in torch

def _hp_inputs(seed, lam, rho):
    """A problem where HP's code is finite: every image has a valid anchor, every denominator one
    candidate (the NaN cases are tested apart)."""
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(seed, B=3, n=6, lam=lam, rho=rho)
    want = _direct(codes, fa, Ra, fs, Rs, lam, U, n)[0]
    cache = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)[1]
    N = fa.shape[0]
    eye = np.eye(N, dtype=bool)
    Ca = fa @ fa.T
    A = ((Ca > Ra[:, None]) | (Ca > Ra[None, :])) & ~eye
    Uf = np.ones((N, N), bool) if U is None else U[np.arange(N) % n]
    assert ((A | Uf) & ~eye).any(1).all() and np.all(cache.W > 0) and not cache.valid.all(), "pick another seed"
    return codes, fa, Ra, fs, Rs, lam, U, n, want


@pytest.mark.parametrize("lam,rho", [(0.0, 0.3), (0.4, 0.3), (0.4, None), (0.0, None)])
def test_supcon_matches_hp_in_torch(lam, rho):
    torch = pytest.importorskip("torch")
    from omh_ref.core import torch_reference as tr

    codes, fa, Ra, fs, Rs, lam, U, n, _ = _hp_inputs(20, lam, rho)
    tc = [tr.tensor(c, requires_grad=True) for c in codes]
    hp = tr.hp_supcon(tc, *(tr.tensor(x) for x in (fa, Ra, fs, Rs)), lam, U, n, TAU)
    tgrads = torch.autograd.grad(hp, tc)
    losses, cache = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)
    # HP's total is the mean of the two terms (loss.py's 1/(2B)); its gradient, half of each
    np.testing.assert_allclose(sum(losses) / 2, hp.item(), rtol=1e-10)
    for g, t in zip(supcon.backward([0.5, 0.5], cache), tgrads):
        np.testing.assert_allclose(g, t.numpy(), rtol=1e-8, atol=1e-12 * np.abs(t.numpy()).max())
    # each term alone as well: HP's rendering of one code array
    one = tr.hp_supcon(tc[1:], *(tr.tensor(x) for x in (fa, Ra, fs, Rs)), lam, U, n, TAU)
    np.testing.assert_allclose(losses[1], one.item(), rtol=1e-10)


def test_neighbour_mix_matches_hp_unfold_in_torch():
    torch = pytest.importorskip("torch")
    from omh_ref.core import torch_reference as tr

    rng = np.random.default_rng(21)
    for shape in ((2, 5, 4, 3), (1, 1, 3, 2), (2, 3, 1, 4)):
        z, omega = rng.standard_normal(shape), checks.window_weights_like(rng, *shape[:3])
        m, cache = neighbour_mix.forward(z, omega)
        dm = rng.standard_normal(m.shape)
        tz = tr.tensor(z, requires_grad=True)
        tm = tr.neighbour_mix(tz, tr.tensor(omega))
        (tg,) = torch.autograd.grad((tm * tr.tensor(dm)).sum(), [tz])
        np.testing.assert_allclose(m, tm.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(neighbour_mix.backward(dm, cache), tg.numpy(), rtol=1e-12, atol=1e-14)


def test_pairwise_distance_matches_torch():
    torch = pytest.importorskip("torch")
    from omh_ref.core import torch_reference as tr

    rng = np.random.default_rng(22)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    b[3] = a[3] + 1e-6                                            # a − b + eps = 0: torch's subgradient 0
    d, cache = pairwise_distance.forward(a, b)
    dd = rng.standard_normal(7)
    ta, tb = tr.tensor(a, requires_grad=True), tr.tensor(b, requires_grad=True)
    td = tr.pairwise_distance(ta, tb)
    ga, gb = torch.autograd.grad((td * tr.tensor(dd)).sum(), [ta, tb])
    np.testing.assert_allclose(d, td.detach().numpy(), rtol=1e-12)
    for got, want in zip(pairwise_distance.backward(dd, cache), (ga, gb)):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-15)


# ---------------------------------------------------------------- the device

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_supcon_runs_on_the_device_without_host_reads(xp, dtype):
    codes, fa, Ra, fs, Rs, lam, U, n = _problem(30)
    want = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)
    wgrads = supcon.backward([1.0, -0.5], want[1])
    dev = lambda x: xp.asarray(x.astype(dtype) if x.dtype.kind == "f" else x)  # noqa: E731
    sd.reset_conversions()
    losses, cache = supcon.forward([dev(c) for c in codes], dev(fa), dev(Ra), dev(fs), dev(Rs), lam, dev(U), n, TAU)
    grads = supcon.backward([1.0, xp.asarray(-0.5, dtype=dtype)], cache)
    if backend.strict_device_active():
        assert sd.conversions() == []
    tol = dict(rtol=1e-12) if dtype == np.float64 else F32
    for got, w in zip((*losses, *grads), (*want[0], *wgrads)):
        got = to_host(got)
        assert got.dtype == dtype
        np.testing.assert_allclose(got, w, rtol=tol["rtol"], atol=tol.get("atol", 0) * np.abs(w).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ops_run_on_the_device_without_host_reads(xp, dtype):
    rng = np.random.default_rng(31)
    z, omega = rng.standard_normal((2, 4, 3, 5)), checks.window_weights_like(rng, 2, 4, 3).astype(np.float16)
    a, b = rng.standard_normal((6, 5)), rng.standard_normal((6, 5))
    m, mc = neighbour_mix.forward(z, omega)
    d, dc = pairwise_distance.forward(a, b)
    want = (m, neighbour_mix.backward(m, mc), d, *pairwise_distance.backward(d, dc))
    dev = lambda x: xp.asarray(x.astype(dtype))  # noqa: E731
    sd.reset_conversions()
    m_, mc_ = neighbour_mix.forward(dev(z), xp.asarray(omega))
    d_, dc_ = pairwise_distance.forward(dev(a), dev(b))
    got = (m_, neighbour_mix.backward(m_, mc_), d_, *pairwise_distance.backward(d_, dc_))
    if backend.strict_device_active():
        assert sd.conversions() == []
    for g, w in zip(got, want):
        g = to_host(g)
        assert g.dtype == dtype
        f64 = dtype == np.float64
        np.testing.assert_allclose(g, w, rtol=1e-12 if f64 else F32["rtol"], atol=0 if f64 else F32["atol"])


# ---------------------------------------------------------------- properties

@given(seed=seeds, B=st.integers(2, 4), n=st.integers(1, 4), lam=st.sampled_from([0.0, 0.3]),
       rho=st.sampled_from([None, 0.5]))
def test_permuting_the_images_permutes_everything(seed, B, n, lam, rho):
    """Images are exchangeable: reordering them (U's columns with them; its rows are positions)
    leaves the losses and permutes the gradients."""
    rng = np.random.default_rng(seed)
    codes, fa, Ra, fs, Rs, lam, U, n = checks.supcon_inputs(rng, B=B, n=n, lam=lam, rho=rho)
    perm = (rng.permutation(B)[:, None] * n + np.arange(n)).ravel()
    losses, cache = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)
    grads = supcon.backward([1.0, 0.3], cache)
    pl, pc = supcon.forward([c[perm] for c in codes], fa[perm], Ra[perm], fs[perm], Rs[perm], lam,
                            None if U is None else U[:, perm], n, TAU)
    np.testing.assert_allclose(pl, losses, rtol=1e-12, atol=1e-15)
    for g, pg in zip(grads, supcon.backward([1.0, 0.3], pc)):
        np.testing.assert_allclose(pg, g[perm], rtol=1e-10, atol=1e-13)
        assert pg.shape == codes[0].shape


@given(seed=seeds, B=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), D=st.integers(1, 4))
def test_neighbour_mix_of_a_constant_with_unit_weights_is_the_constant(seed, B, h, w, D):
    """With weight 1 on every in-grid cell, the mix divides a sum of n_yx equal codes by n_yx."""
    rng = np.random.default_rng(seed)
    z = np.broadcast_to(rng.standard_normal((B, 1, 1, D)), (B, h, w, D)).copy()
    ones = checks.window_weights_like(np.random.default_rng(0), B, h, w) * 0 + 1.0
    inside = neighbour_mix.cells_inside(np, h, w, np.float64)
    for o, (dy, dx) in enumerate(neighbour_mix.OFFSETS):   # 0 outside the grid, as stored
        ys, xs = np.arange(h)[:, None] + dy, np.arange(w)[None, :] + dx
        ones[..., o] *= (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    np.testing.assert_allclose(ones.sum(-1), np.broadcast_to(inside[..., 0], (B, h, w)))
    m, _ = neighbour_mix.forward(z, ones)
    np.testing.assert_allclose(m, z, rtol=1e-13)


def test_cells_inside_counts_hp_s_divisors():
    np.testing.assert_array_equal(neighbour_mix.cells_inside(np, 4, 3, np.float64)[..., 0],
                                  [[4, 6, 4], [6, 9, 6], [6, 9, 6], [4, 6, 4]])


@given(seed=seeds, shape=st.tuples(st.integers(1, 4), st.integers(1, 6)))
def test_pairwise_distance_is_the_norm_of_the_shifted_difference(seed, shape):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal(shape), rng.standard_normal(shape)
    d, _ = pairwise_distance.forward(a, b)
    np.testing.assert_allclose(d, np.linalg.norm(a - b + 1e-6, axis=-1), rtol=1e-13)
    assert d.shape == shape[:-1]


# ---------------------------------------------------------------- memory

def test_supcon_peak_memory_is_a_few_blocks():
    """The module's claim, measured by tracemalloc (NumPy's allocations): forward and backward each
    peak at ≤ (3s + 1) bytes per entry of one n x N block (s = 4 in float32), plus O(N·D); an N x N
    matrix would be B times more."""
    import tracemalloc

    B, n = 8, 96
    codes, fa, Ra, fs, Rs, lam, U, n = checks.supcon_inputs(np.random.default_rng(40), B=B, n=n, C=32, Ds=32,
                                                            D=32, dtype=np.float32)
    block, small = n * B * n, 64 * B * n * 32                    # an n x N block; room for O(N·D)
    tracemalloc.start()
    losses, cache = supcon.forward(codes, fa, Ra, fs, Rs, lam, U, n, TAU)
    fwd = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    supcon.backward([1.0, 1.0], cache)
    bwd = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert fwd <= 13 * block + small and bwd <= 13 * block + small, (fwd / block, bwd / block)
