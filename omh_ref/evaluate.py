"""Predictions, probes and scores for a trained checkpoint (DESIGN.md 1.6).

* Codes: the projection head without dropout, batch by batch over a memory-mapped feature file;
  with a flipped feature file, the flipped code is flipped back and averaged (STEGO).
* Cluster predictions: the eval level's cosine logits, bilinearly upsampled (align_corners=False)
  to label resolution, argmax; scored by Hungarian matching on the confusion over the whole split.
* Linear probe: a 1x1 layer D -> n_classes on detached codes, its logits upsampled to label
  resolution and trained with cross-entropy on the labelled pixels (STEGO), Adam, seeded;
  evaluated with the identity mapping.
"""
from __future__ import annotations

import numpy as np

from . import metrics
from .backend import get_array_module, to_device, to_host
from .data.store import FeatureStore
from .errors import InputError
from .model import Config
from .ops import cosine, linear, log_softmax, relu, resize
from .optim import adam_init, adam_step


def head(params, f):
    """z = W1 f + b1 + W3 relu(W2 f + b2) + b3 (no dropout). f (B, h, w, C) -> z (B, h, w, D)."""
    z1, _ = linear.forward(f, params["W1"], params["b1"])
    r, _ = relu.forward(linear.forward(f, params["W2"], params["b2"])[0])
    return z1 + linear.forward(r, params["W3"], params["b3"])[0]


def codes(params, store: FeatureStore, batch_size=16, flipped: FeatureStore | None = None, device="cpu"):
    """Yield (start, z) over the store; z (B, h, w, D) on ``device``."""
    dt = params["W1"].dtype
    for s, f in store.batches(batch_size):
        z = head(params, to_device(f.astype(dt), device))
        if flipped is not None:
            ff = to_device(flipped.read(np.arange(s, s + len(f))).astype(dt), device)
            z = (z + head(params, ff)[:, :, ::-1]) / 2
        yield s, z


def check_compat(params, cfg: Config, store: FeatureStore):
    if store.C != params["W1"].shape[1]:
        raise InputError(f"{store.path}: features have C={store.C} channels but the checkpoint's head expects "
                         f"{params['W1'].shape[1]}")


def label_shape(store: FeatureStore):
    if store.labels is None:
        raise InputError(f"{store.path}: no labels given (expected --labels labels.npy)")
    return store.labels.shape[1:]


def cluster_logits(params, cfg: Config, z, size):
    """Eval-level cosine logits of codes z (B, h, w, D), upsampled to size -> (B, H, W, K)."""
    cfg = cfg.effective()
    M = params[f"M{cfg.eval_level % len(cfg.levels)}"]
    s, _ = cosine.forward(z, M)
    return resize.forward(s, size)[0]


def cluster_eval(params, cfg: Config, store: FeatureStore, n_classes, batch_size=16, flipped=None,
                 device="cpu", keep=0, crf_workers=None, crf_timeout=600.0):
    """Confusion over the whole split, Hungarian matching and scores.

    crf_workers: None = no CRF; else refine every prediction with the dense CRF on the images
    that ``feats.json`` lists (serially for 1, a process pool otherwise).
    -> (result dict {'miou', 'acc', 'iou', 'match', 'unmatched', 'confusion'}, first ``keep`` predictions)."""
    check_compat(params, cfg, store)
    size = label_shape(store)
    K = cfg.effective().levels[cfg.effective().eval_level]
    acc = metrics.ConfusionAccumulator(K, n_classes)
    paths = _crf_images(store, size) if crf_workers is not None else None
    kept = []
    for s, z in codes(params, store, batch_size, flipped, device):
        logits = cluster_logits(params, cfg, z, size)
        if paths is None:
            pred = to_host(logits.argmax(axis=-1))
        else:
            from . import crf

            imgs = np.stack([_read_image(p, size[0]) for p in paths[s:s + len(z)]])
            pred = crf.refine_batch(imgs, to_host(logits), crf_workers, crf_timeout)
        _update(acc, pred, store, s)
        if len(kept) < keep:
            kept.extend(pred[: keep - len(kept)])
    return summarize(acc.matrix, store), np.asarray(kept)


def _update(acc, pred, store, start):
    """Accumulate one batch; bad labels become an InputError naming the labels file."""
    try:
        acc.update(pred, store.read_labels(np.arange(start, start + len(pred))))
    except ValueError as e:
        raise InputError(f"{store.labels_path}: {e}") from None


def _crf_images(store, size):
    from .data.images import image_paths

    if size[0] != size[1]:
        raise InputError(f"{store.labels_path}: --crf needs square label maps (STEGO crops), got {size}")
    paths = image_paths(store.meta, store.path)
    if paths is None:
        raise InputError(f"{store.path.with_suffix('.json')}: --crf needs the images, but the feature "
                         "file's metadata lists none that exist (fields 'images', 'image_root')")
    return paths


def _read_image(path, size):
    from .data.images import load_rgb

    img = load_rgb(path, size)
    if img is None:
        raise InputError(f"{path}: cannot read this image (needed by --crf)")
    return img


def scores_json(res) -> dict:
    """JSON-ready scores: miou, acc, per-class iou (None for NaN) and the match when present."""
    out = {"miou": res["miou"], "acc": res["acc"],
           "iou": [None if np.isnan(v) else float(v) for v in res["iou"]]}
    if "match" in res:
        out["match"] = res["match"].to_dict()
    return out


def summarize(conf, store, match=None):
    """Scores of a confusion matrix (Hungarian matching unless ``match`` is given); a split with
    no labelled pixel is an InputError naming the labels file."""
    if conf.sum() == 0:
        raise InputError(f"{store.labels_path}: no labelled pixels in this split (every label is "
                         "ignore, 255 or -1, or outside [0, n_classes)); nothing to score")
    match = metrics.hungarian(conf) if match is None else match
    return {**metrics.scores(conf, match), "match": match, "confusion": conf}


def linear_probe(params, store: FeatureStore, n_classes, epochs=10, batch_size=16, lr=1e-3, seed=0,
                 device="cpu", progress=True):
    """Train the probe on detached codes of ``store`` (features + labels). -> (W, b) on host."""
    from tqdm import tqdm

    size = label_shape(store)
    Z = np.concatenate([to_host(z) for _, z in codes(params, store, batch_size, device=device)])  # N,h,w,D
    D = Z.shape[-1]
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(D)
    probe = {"W": rng.uniform(-bound, bound, (n_classes, D)).astype(np.float32),
             "b": np.zeros(n_classes, np.float32)}
    probe = to_device(probe, device)
    state = adam_init(probe)
    steps = epochs * ((store.N + batch_size - 1) // batch_size)
    labelled = 0
    with tqdm(total=steps, desc="linear probe", unit="step", disable=not progress) as bar:
        for epoch in range(epochs):
            order = rng.permutation(store.N)
            for s in range(0, store.N, batch_size):
                idx = np.sort(order[s:s + batch_size])
                z = to_device(Z[idx], device)
                host = store.read_labels(idx).astype(np.int64)
                if epoch == 0:   # every label is seen once in the first epoch
                    valid = (host >= 0) & (host < n_classes)
                    bad = ~valid & ~np.isin(host, metrics.IGNORE)
                    if bad.any():
                        raise InputError(f"{store.labels_path}: label value {int(host[bad][0])} is neither a "
                                         f"class in [0, {n_classes}) nor ignore (255 or -1)")
                    labelled += int(valid.sum())
                lab = to_device(host, device)
                loss, grads = _probe_loss_and_grads(probe, z, lab, size, n_classes)
                adam_step(probe, grads, state, lr)
                bar.update(1)
                bar.set_postfix(ce=f"{float(loss):.3f}")
            if labelled == 0:
                raise InputError(f"{store.labels_path}: no labelled pixels to train the linear probe on "
                                 "(every label is ignore)")
    return to_host(probe)


def _probe_loss_and_grads(probe, z, lab, size, n_classes):
    """Mean cross-entropy over labelled pixels of upsampled logits; -> (loss, grads)."""
    xp = get_array_module(z)
    logits, lc = linear.forward(z, probe["W"], probe["b"])                   # B,h,w,n
    up, rc = resize.forward(logits, size)                                    # B,H,W,n
    logp, sc = log_softmax.forward(up)
    valid = (lab >= 0) & (lab < n_classes)
    count = max(int(valid.sum()), 1)
    # one-hot of the label where labelled (ignored pixels get an all-zero row)
    target = ((lab[..., None] == xp.arange(n_classes)) & valid[..., None]).astype(logp.dtype)
    loss = -(target * logp).sum() / count
    dlogp = target * logp.dtype.type(-1.0 / count)
    dup = log_softmax.backward(dlogp, sc)
    dlogits = resize.backward(dup, rc)
    _, dW, db = linear.backward(dlogits, lc)
    return loss, {"W": dW, "b": db}


def linear_eval(params, probe, store: FeatureStore, n_classes, batch_size=16, flipped=None, device="cpu"):
    """Scores of the probe with the identity mapping (cluster i = class i)."""
    size = label_shape(store)
    acc = metrics.ConfusionAccumulator(n_classes, n_classes)
    P = to_device(probe, device)
    for s, z in codes(params, store, batch_size, flipped, device):
        logits = resize.forward(linear.forward(z, P["W"], P["b"])[0], size)[0]
        _update(acc, to_host(logits.argmax(axis=-1)), store, s)
    return summarize(acc.matrix, store, metrics.identity_match(n_classes, n_classes))


def hierarchy_plans(params, cfg: Config):
    """Row-normalised plans A_l = K_l · T_l (K_l x K_{l+1}) between adjacent levels, from the
    centroids alone: cost 1 − cos(M_l, M_{l+1}), uniform marginals (no batch, so no usage), the
    config's ε and iterations. Row i is child cluster i's soft parent assignment."""
    from .sinkhorn import sinkhorn

    cfg = cfg.effective()
    plans = []
    for i in range(len(cfg.levels) - 1):
        cs, _ = cosine.forward(params[f"M{i}"], params[f"M{i + 1}"])
        xp = get_array_module(cs)
        Kc, Kp = cs.shape
        T, _ = sinkhorn(1 - cs, xp.full(Kc, 1.0 / Kc, dtype=cs.dtype), xp.full(Kp, 1.0 / Kp, dtype=cs.dtype),
                        cfg.eps, cfg.sinkhorn_iters)
        plans.append(to_host(T * Kc))
    return plans


def hierarchy_text(plans, class_of_cluster=None, class_names=None, threshold=0.5, named_level=-1):
    """Lines 'level l+1 cluster j <- level l clusters [i (share), ...]' for every adjacent pair.
    The clusters of ``named_level`` (the eval level, whose clusters ``class_of_cluster`` maps to
    classes; the last by default) carry their matched class, as parents or as children."""
    named = named_level % (len(plans) + 1)

    def tag(k):
        if class_of_cluster is None or class_of_cluster[k] < 0:
            return ""
        c = int(class_of_cluster[k])
        return f" [{class_names[c] if class_names else c}]"

    lines = []
    for lvl, A in enumerate(plans):
        parent = A.argmax(axis=1)
        for j in range(A.shape[1]):
            kids = [f"{i}{tag(i) if lvl == named else ''} ({A[i, j]:.2f})"
                    for i in np.flatnonzero(parent == j) if A[i, j] >= threshold]
            name = f"L{lvl + 1}:{j}" + (tag(j) if lvl + 1 == named else "")
            lines.append(f"{name:<28} <- L{lvl}: {', '.join(kids) if kids else '(none)'}")
    return lines
