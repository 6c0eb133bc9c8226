"""An independent torch rendering of omh-ref's forward computations (float64, autograd).

Written from docs/METHOD.md and STEGO's published code, not translated from omh_ref's NumPy:
torch's own layers do the work (``F.linear``, 1x1 ``F.conv2d`` on NCHW, ``F.grid_sample``,
``F.interpolate``, ``F.normalize``, ``F.kl_div``), STEGO's correlation helper keeps its NCHW
einsum layout, and autograd supplies every gradient. ``tests/core/test_torch_crosscheck.py`` compares
omh_ref's values and hand-written gradients with these.

Conventions taken from omh_ref's docstrings (the contract an outside rendering must match):
channels-last arrays at the API, weights (out, in), sampling coordinates (N, S1, S2, 2) in (x, y)
order used as the grid unchanged, all random draws from :func:`omh_ref.core.model.draw`.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

DT = torch.float64
STEGO_EPS = 1e-10   # STEGO's norm(): F.normalize(t, dim=1, eps=1e-10)


def tensor(x, requires_grad=False):
    """A float64 torch tensor (a copy) of a numpy array or number."""
    t = torch.tensor(np.asarray(x, dtype=np.float64), dtype=DT)
    return t.requires_grad_(requires_grad)


def nchw(x):
    return x.permute(0, 3, 1, 2)


def nhwc(x):
    return x.permute(0, 2, 3, 1)


# ---------------------------------------------------------------- ops (channels-last at the API)

def linear(x, W, b):
    """x (..., C), W (D, C), b (D,) -> (..., D)."""
    return F.linear(x, W, b)


def relu(x):
    return F.relu(x)


def channel_dropout(x, mask):
    """Dropout2d with a given (already 1/(1-p)-scaled) mask broadcast over the grid."""
    return x * mask


def normalize(x, eps=1e-12):
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def cosine(z, M):
    """Cosine logits (..., K) of codes z (..., D) against centroids M (K, D)."""
    return torch.matmul(normalize(z), normalize(M).transpose(0, 1))


def softmax(x, tau=1.0):
    return torch.softmax(x / tau, dim=-1)


def log_softmax(x, tau=1.0):
    return torch.log_softmax(x / tau, dim=-1)


def kl_rows(q, logp):
    """KL(q || p) per row: Σ_k q_k (log q_k − log p_k), via torch's kl_div(input=log p, target=q)."""
    return F.kl_div(logp, q, reduction="none").sum(-1)


def grid_sample_nchw(x, coords):
    """x (N, C, H, W), coords (N, S1, S2, 2) -> (N, C, S1, S2)."""
    return F.grid_sample(x, coords, mode="bilinear", padding_mode="border", align_corners=True)


def grid_sample(x, coords):
    """Channels-last: x (N, H, W, C), coords (N, S1, S2, 2) -> (N, S1, S2, C)."""
    return nhwc(grid_sample_nchw(nchw(x), coords))


def resize(x, size):
    """Channels-last bilinear resize (align_corners=False): x (N, H, W, C) -> (N, Ho, Wo, C)."""
    return nhwc(F.interpolate(nchw(x), size=tuple(size), mode="bilinear", align_corners=False))


# ---------------------------------------------------------------- STEGO correlation loss

def _stego_norm(t):
    return F.normalize(t, dim=1, eps=STEGO_EPS)


def _tensor_correlation(a, b):
    return torch.einsum("nchw,ncij->nhwij", a, b)


def correlation_nchw(f1, f2, c1, c2, shift, pointwise=True, zero_clamp=True):
    """STEGO's ContrastiveCorrelationLoss.helper, then the mean, on NCHW sampled tensors."""
    with torch.no_grad():
        fd = _tensor_correlation(_stego_norm(f1), _stego_norm(f2))    # N,S1,S2,S1',S2'
        if pointwise:
            old_mean = fd.mean()
            fd = fd - fd.mean([3, 4], keepdim=True)
            fd = fd - fd.mean() + old_mean
    cd = _tensor_correlation(_stego_norm(c1), _stego_norm(c2))
    if zero_clamp:
        cd = cd.clamp(min=0.0)
    return -(cd * (fd - shift)).mean()


def correlation(f1, f2, c1, c2, shift, pointwise=True, zero_clamp=True):
    """Channels-last inputs (N, S1, S2, ·), as omh_ref.core.losses.correlation.forward."""
    return correlation_nchw(nchw(f1), nchw(f2), nchw(c1), nchw(c2), shift, pointwise, zero_clamp)


# ---------------------------------------------------------------- Sinkhorn

def sinkhorn(cost, a, b, eps, n_iters):
    """Log-domain Sinkhorn, differentiable by autograd through the loop.

    K = −C/ε; v₀ = 0; per iteration u = log a − LSE_j(K + v), then v = log b − LSE_i(K + u);
    plan = exp(K + u ⊕ v). cost (..., n, m), a (..., n), b (..., m)."""
    K = -cost / eps
    la, lb = torch.log(a), torch.log(b)
    v = torch.zeros(K.shape[:-2] + K.shape[-1:], dtype=K.dtype)
    for _ in range(int(n_iters)):
        u = la - torch.logsumexp(K + v.unsqueeze(-2), dim=-1)
        v = lb - torch.logsumexp(K + u.unsqueeze(-1), dim=-2)
    return torch.exp(K + u.unsqueeze(-1) + v.unsqueeze(-2))


# ---------------------------------------------------------------- losses (docs/METHOD.md)

def balanced_targets(s, eps_q, n_iters):
    """SwAV-style equipartitioned targets, detached: P · Sinkhorn(1 − s, 1/P, 1/K)."""
    s = s.detach()
    P, K = s.shape
    a = torch.full((P,), 1.0 / P, dtype=s.dtype)
    b = torch.full((K,), 1.0 / K, dtype=s.dtype)
    return P * sinkhorn(1.0 - s, a, b, eps_q, n_iters)


def relaxed_targets(s, eps_q, n_iters, rho):
    """Semi-relaxed entropic OT targets, detached: the pixel marginal 1/P is a hard constraint,
    the cluster marginal 1/K a KL penalty of weight rho, so the column scaling is the balanced
    one raised to rho/(rho+eps) (Chizat et al. 2018). Ends on a row update; rows sum to 1."""
    s = s.detach()
    P, K = s.shape
    logK = (s - 1.0) / eps_q
    power = rho / (rho + eps_q)
    g = torch.zeros(K, dtype=s.dtype)                    # log column scaling
    for _ in range(int(n_iters)):
        f = -math.log(P) - torch.logsumexp(logK + g, dim=1)
        g = power * (-math.log(K) - torch.logsumexp(logK + f[:, None], dim=0))
    f = -math.log(P) - torch.logsumexp(logK + g, dim=1)
    return P * torch.exp(logK + f[:, None] + g)


def hard_targets(s):
    s = s.detach()
    return F.one_hot(s.argmax(dim=-1), s.shape[-1]).to(s.dtype)


def cluster_loss(s, logp, target, Q=None, eps_q=0.05, n_iters_q=20, rho_q=0.1):
    """-> (loss, Q). relaxed / balanced: −mean Σ Q log p (Q from the OT targets); hard:
    −mean Σ onehot(argmax s) s."""
    P = s.shape[0]
    if target == "teacher":
        return -(Q * logp).sum() / P, Q
    if target in ("relaxed", "balanced"):
        if Q is None:
            Q = (balanced_targets(s, eps_q, n_iters_q) if target == "balanced"
                 else relaxed_targets(s, eps_q, n_iters_q, rho_q))
        return -(Q * logp).sum() / P, Q
    Q = hard_targets(s) if Q is None else Q
    return -(Q * s).sum() / P, Q


def hierarchy_loss(logp_c, logp_p, M_c, M_p, eps, n_iters, lam_w, marginals="uniform"):
    """mean_pixels KL(p_c A || p_p) + λ_W <T, C>, C = 1 − cos(M_c, M_p), A = diag(1/a) T."""
    p_c, p_p = logp_c.exp(), logp_p.exp()
    C = 1.0 - cosine(M_c, M_p)                                         # Kc,Kp
    if marginals == "usage":
        # smoothed usage, as omh_ref's hierarchy docstring specifies: (mean p + δ) / (1 + K δ)
        def usage(p, delta=1e-6):
            return (p.mean(0) + delta) / (1.0 + p.shape[1] * delta)
        a, b = usage(p_c), usage(p_p)
    else:
        a = torch.full((C.shape[0],), 1.0 / C.shape[0], dtype=C.dtype)
        b = torch.full((C.shape[1],), 1.0 / C.shape[1], dtype=C.dtype)
    T = sinkhorn(C, a, b, eps, n_iters)
    A = T / a.unsqueeze(1)
    q = p_c @ A                                                        # P,Kp
    return lam_w * (T * C).sum() + kl_rows(q, logp_p).mean()


# ---------------------------------------------------------------- the whole objective

def stego_loss(cfg, f, x, z, B, draws, parts):
    """STEGO's correlation loss on sampled points (features undropped, as the frozen backbone's
    output): f (B, C, h, w) the main images' features, x (2B or B, C, h, w) with the partners', z
    their codes (NCHW). Writes the parts ``corr_*`` into ``parts``. -> the weighted sum."""
    c1, c2 = tensor(draws["coords1"]), tensor(draws["coords2"])
    fs1, zs1 = grid_sample_nchw(f, c1), grid_sample_nchw(z[:B], c1)
    parts["corr_intra"] = correlation_nchw(fs1, fs1, zs1, zs1, cfg.shift_intra, cfg.pointwise,
                                           cfg.zero_clamp)
    corr = cfg.weight_intra * parts["corr_intra"]
    if x.shape[0] > B:                                                 # the KNN partners
        fs2, zs2 = grid_sample_nchw(x[B:], c2), grid_sample_nchw(z[B:], c2)
        parts["corr_inter"] = correlation_nchw(fs1, fs2, zs1, zs2, cfg.shift_inter, cfg.pointwise,
                                               cfg.zero_clamp)
        corr = corr + cfg.weight_inter * parts["corr_inter"]
    if draws["perms"]:
        negs = []
        for perm in draws["perms"]:
            idx = torch.as_tensor(np.asarray(perm))
            fsn, zsn = grid_sample_nchw(f[idx], c2), grid_sample_nchw(z[:B][idx], c2)
            negs.append(correlation_nchw(fs1, fsn, zs1, zsn, cfg.shift_neg, cfg.pointwise,
                                         cfg.zero_clamp))
        parts["corr_neg"] = torch.stack(negs).mean()
        corr = corr + cfg.weight_neg * parts["corr_neg"]
    parts["corr"] = corr
    return corr


def smooseg_loss(cfg, f, x, z, B, draws, parts, G):
    """SmooSeg's smoothness loss on the dense grids, as docs/smooseg_reading.md §2-3 describes it
    (SmooSeg modules.py:244-288): teacher probabilities P = softmax(cos(z, G) / τ_t) (no gradient
    to G), and per pair mean((F − b)(1 − cos(P₁, P₂))) with F the (pointwise-centred) feature
    correlations at every pair of positions. f (B, C, h, w), x (2B or B, C, h, w), z their codes
    (NCHW). Writes ``smooth_*`` into ``parts``. -> the weighted sum."""
    zn = F.normalize(z, dim=1)                                         # torch's default eps
    Gn = F.normalize(G.detach(), dim=1)
    P = torch.softmax(torch.einsum("nchw,kc->nkhw", zn, Gn) / cfg.teacher_tau, dim=1)   # 2B,K,h,w

    def pair(f1, f2, p1, p2, shift):
        with torch.no_grad():
            Fc = _tensor_correlation(_stego_norm(f1), _stego_norm(f2))       # N,h,w,h',w'
            if cfg.pointwise:
                old_mean = Fc.mean()
                Fc = Fc - Fc.mean([3, 4], keepdim=True)
                Fc = Fc - Fc.mean() + old_mean
        cos = _tensor_correlation(_stego_norm(p1), _stego_norm(p2))
        if cfg.zero_clamp:
            cos = cos.clamp(min=0.0)
        return ((Fc - shift) * (1.0 - cos)).mean()

    parts["smooth_self"] = pair(f, f, P[:B], P[:B], cfg.shift_intra)
    loss = cfg.weight_intra * parts["smooth_self"]
    if x.shape[0] > B:
        parts["smooth_knn"] = pair(f, x[B:], P[:B], P[B:], cfg.shift_inter)
        loss = loss + cfg.weight_inter * parts["smooth_knn"]
    if draws["perms"]:
        negs = []
        for perm in draws["perms"]:
            idx = torch.as_tensor(np.asarray(perm))
            negs.append(pair(f, f[idx], P[:B], P[:B][idx], cfg.shift_neg))
        parts["smooth_neg"] = torch.stack(negs).mean()
        loss = loss + cfg.weight_neg * parts["smooth_neg"]
    parts["smooth"] = loss
    return loss


def model_loss(params, batch, cfg, draws, targets=None, state=None):
    """The OMH objective of docs/METHOD.md for one batch and one set of draws.

    params: dict of float64 tensors (``W1 b1 W2 b2 W3 b3 M0..``); batch: numpy ``feats`` and
    ``feats_pos`` (B, h, w, C); draws: :func:`omh_ref.core.model.draw`'s dict; targets: optional list
    of fixed per-level targets (else computed here, detached). The HP base: ``feats_aug`` in place
    of ``feats_pos`` (where its consistency term is on), ``attn`` in the batch and its pools in
    ``state`` (:func:`hp_loss`). -> (loss, parts, targets)."""
    f = tensor(batch["feats"])                                         # B,h,w,C
    fp = batch.get("feats_pos")
    if cfg.base == "hp":                                               # the augmented view, or none
        fp = batch.get("feats_aug") if cfg.consistency_weight > 0 else None
    B, h, w, C = f.shape
    x = f if fp is None else torch.cat([f, tensor(fp)])                # 2B,h,w,C (channels-last)
    x = nchw(x)                                                        # 2B,C,h,w
    f = nchw(f)
    xd = x
    if draws["keep"] is not None:
        keep = tensor(draws["keep"][: x.shape[0]].astype(np.float64))  # 2B,C
        xd = x * (keep / (1.0 - cfg.dropout))[:, :, None, None]        # Dropout2d

    def conv1x1(t, W, b):
        return F.conv2d(t, W[:, :, None, None], b)

    P_ = params
    act = F.silu if cfg.head_activation == "silu" else F.relu
    z = conv1x1(xd, P_["W1"], P_["b1"]) + conv1x1(act(conv1x1(xd, P_["W2"], P_["b2"])),
                                                    P_["W3"], P_["b3"])   # 2B,D,h,w
    parts = {}

    if cfg.base == "smooseg":
        loss = smooseg_loss(cfg, f, x, z, B, draws, parts, P_["G"])
    elif cfg.base == "hp":
        loss = hp_loss(cfg, xd, z, B, draws, parts, P_, tensor(batch["attn"]), state)
    else:
        loss = stego_loss(cfg, f, x, z, B, draws, parts)

    # Cluster levels on the main images' codes, pixels in (b, y, x) order.
    code = nhwc(z[:B]).reshape(-1, z.shape[1])                         # P,D
    if cfg.detach_clusters:
        code = code.detach()
    logps, used = [], []
    for i in range(len(cfg.levels)):
        s = cosine(code, P_[f"M{i}"])
        logp = log_softmax(s, cfg.tau)
        Q = None if targets is None else targets[i]
        if Q is None and cfg.cluster_target == "teacher":   # SmooSeg's student: the teacher's argmax
            Q = hard_targets(cosine(code, P_["G"]))
        lclu, Q = cluster_loss(s, logp, cfg.cluster_target, Q, cfg.eps_q, cfg.sinkhorn_iters_q, cfg.rho_q)
        parts[f"clu_{i}"] = lclu
        loss = loss + cfg.lam_clu * lclu
        logps.append(logp)
        used.append(Q)

    if cfg.lam_hier > 0:
        for i in range(len(cfg.levels) - 1):
            lh = hierarchy_loss(logps[i], logps[i + 1], P_[f"M{i}"], P_[f"M{i + 1}"], cfg.eps,
                                cfg.sinkhorn_iters, cfg.lam_w, cfg.marginals)
            parts[f"hier_{i}"] = lh
            loss = loss + cfg.lam_hier * lh
    parts["loss"] = loss
    return loss, parts, used


# ---------------------------------------------------------------- HP's pieces (hynnsk/HP @ 8913644)

def neighbour_mix(z, omega):
    """HP's local mix (docs/hp_reading.md §7), by ``F.unfold``: each patch's 3 x 3 window of z
    (B, h, w, D) with zero padding, weighted by omega (B, h, w, 9), summed and divided by the count
    of window cells inside the grid (the unfold of a ones image). -> (B, h, w, D)."""
    B, h, w, D = z.shape
    cols = F.unfold(nchw(z), kernel_size=3, padding=1).reshape(B, D, 9, h * w)   # channel, then ky, kx
    wts = omega.reshape(B, h * w, 9).transpose(1, 2)[:, None]                      # B,1,9,hw
    count = F.unfold(torch.ones(1, 1, h, w, dtype=z.dtype), kernel_size=3, padding=1).sum(1)   # 1,hw
    m = (cols * wts).sum(2) / count                                                # B,D,hw
    return m.transpose(1, 2).reshape(B, h, w, D)


def pairwise_distance(a, b, eps=1e-6):
    """torch.nn.PairwiseDistance (p = 2): ‖a − b + eps‖ over the last axis."""
    return torch.nn.PairwiseDistance(p=2.0, eps=eps)(a, b)


def hp_supcon(codes, fa, Ra, fs, Rs, lam, U, n, tau, base_tau=0.07):
    """HP's SupConLoss.forward with ``loss_version`` 1 and ``reweighting`` 1, as its code computes it
    (docs/hp_reading.md §5-§7; loss.py), in float64 and without its float16 casts: per anchor image
    the full (n, N) masks, the self mask rolled with the image, the max-shifted logits, the
    denominator mask (the agnostic positives or U), the anchors with an agnostic positive kept by
    indexing, w = a + λ b, the per-anchor mean μ_i = Σ_j w_ij log p_ij / c_i, the weights
    ν_i = c_i/Σc / mean(c/Σc), −mean(τ/τ_0 · μ ν) per image and code array, then the sum over images
    and code arrays divided by B and by the number of code arrays (HP: 2). ``U`` (n, N) bool or None
    (every pixel). An anchor whose denominator is empty gives NaN gradients here, as in HP's code."""
    N = fa.shape[0]
    B = N // n
    selfmask = torch.ones(n, N, dtype=DT).scatter(1, torch.arange(n).view(-1, 1), 0.0)   # 0 at the anchor
    ubase = torch.ones(n, N, dtype=torch.bool) if U is None else torch.as_tensor(U)
    loss = torch.zeros((), dtype=DT)
    for b in range(B):
        rows = slice(b * n, (b + 1) * n)
        cos_a = fa[rows] @ fa.T
        a = ((Ra[rows, None] < cos_a) | (Ra[None, :] < cos_a)).to(DT)
        den = (a.bool() | ubase).to(DT) * selfmask
        a = a * selfmask
        cos_s = fs[rows] @ fs.T
        bm = ((Rs[rows, None] < cos_s) | (Rs[None, :] < cos_s)).to(DT) * selfmask
        keep = torch.where(a.sum(1) != 0)
        wm = (a[keep] + bm[keep] * lam).detach()
        pnm = wm.sum(1)
        pnm = pnm / pnm.sum()
        pnm = pnm / pnm.mean()
        for z in codes:
            logits = (z[rows] @ z.T) / tau
            logits = logits - logits.max(dim=1, keepdim=True).values.detach()
            log_prob = logits - torch.log((torch.exp(logits) * den).sum(1, keepdim=True))
            mu = (wm * log_prob[keep]).sum(1) / wm.sum(1)
            loss = loss - torch.mean((tau / base_tau) * mu * pnm)
        selfmask = torch.roll(selfmask, n, dims=1)
    return loss / B / len(codes)


# ---------------------------------------------------------------- the HP base's step

def hp_denominator(seed, n, N, share):
    """U (n, N) bool: entry e = r·N + k is 1 where lowbias32(lowbias32(e·0x9E3779B9 + k₀) ^ k₁)
    < share·2³², k₀ and k₁ the seed's low and high 32 bits (the base's hash, written out here in
    int64 arithmetic masked to 32 bits); None where ``share`` is 1."""
    if share >= 1:
        return None
    m32 = 0xFFFFFFFF

    def mix(x):                                                        # Chris Wellons' lowbias32
        x = x ^ (x >> 16)
        x = (x * 0x21F0AAAD) & m32
        x = x ^ (x >> 15)
        x = (x * 0x735A2D97) & m32
        return x ^ (x >> 15)
    e = torch.arange(n * N, dtype=torch.int64)
    x = mix(mix(((e * 0x9E3779B9) + (seed & m32)) & m32) ^ ((seed >> 32) & m32))
    return (x < min(round(share * 2.0 ** 32), m32)).reshape(n, N)


def hp_loss(cfg, xd, z, B, draws, parts, P_, omega, state):
    """HP's step (docs/hp_reading.md §2-§8, with omh-ref's one dropout mask): xd (2B or B, C, h, w)
    the head's dropped input, z (NCHW) its codes (main, then the augmented view), omega (B, h, w, 9)
    the window weights, ``state`` the pools (numpy, unit rows). ẑ = normalise(project_head(z)),
    m̂ likewise of the window mix; the agnostic features are the dropped input, the specific ones
    the moving-average head's code on it (no gradient); thresholds are the maxima of their cosines
    to the pools; both SupCon terms by :func:`hp_supcon` (one code array each, so each is its own
    (1/B) Σ_b L_b), averaged; the consistency term by ``PairwiseDistance``. Writes ``supcon_*``
    and ``consistency`` into ``parts``. -> the base's loss."""
    D, h, w = z.shape[1], z.shape[2], z.shape[3]
    n, N = h * w, B * h * w

    def conv1x1(t, W, b):
        return F.conv2d(t, W[:, :, None, None], b)

    def project(t):                                                    # t (B, D, h, w) -> (N, D) unit rows
        return normalize(linear(nhwc(t).reshape(N, D), P_["PW"], P_["Pb"]))

    with torch.no_grad():
        xb = xd[:B]
        fa = normalize(nhwc(xb).reshape(N, -1))
        act = F.silu if cfg.head_activation == "silu" else F.relu
        e = conv1x1(xb, P_["EW1"], P_["Eb1"]) + conv1x1(act(conv1x1(xb, P_["EW2"], P_["Eb2"])), P_["EW3"], P_["Eb3"])
        fs = normalize(nhwc(e).reshape(N, D))
        Ra = (fa @ tensor(state["pool_ag"]).T).max(dim=1).values
        Rs = (fs @ tensor(state["pool_sp"]).T).max(dim=1).values
    zh = project(z[:B])
    mh = normalize(linear(neighbour_mix(nhwc(z[:B]), omega).reshape(N, D), P_["PW"], P_["Pb"]))
    U = hp_denominator(draws.get("u_seed", 0), n, N, cfg.denominator_share)
    lam = float(draws.get("lam", 0.0))
    parts["supcon_global"] = hp_supcon([zh], fa, Ra, fs, Rs, lam, U, n, cfg.supcon_tau)
    parts["supcon_local"] = hp_supcon([mh], fa, Ra, fs, Rs, lam, U, n, cfg.supcon_tau)
    loss = (parts["supcon_global"] + parts["supcon_local"]) / 2
    if cfg.consistency_weight > 0 and z.shape[0] > B:
        parts["consistency"] = pairwise_distance(zh, project(z[B:2 * B])).mean()
        loss = loss + cfg.consistency_weight * parts["consistency"]
    parts["supcon"] = loss
    return loss
