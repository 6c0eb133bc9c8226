"""The linear probe (the supervised diagnostic every USS paper reports): a 1x1 layer D -> n_classes
on detached codes, its logits bilinearly upsampled to label resolution and trained with
cross-entropy on the labelled pixels (STEGO), Adam, seeded; evaluated with the identity mapping
(cluster i = class i)."""
from __future__ import annotations

import numpy as np

from ..core.backend import get_array_module, to_device, to_host
from ..core.errors import InputError
from ..core.ops import linear, log_softmax, resize
from ..core.optim import adam_init, adam_step
from ..features.store import FeatureStore
from . import metrics
from .predict import codes, label_shape, summarize, update_confusion


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
                loss, grads = loss_and_grads(probe, z, lab, size, n_classes)
                adam_step(probe, grads, state, lr)
                bar.update(1)
                bar.set_postfix(ce=f"{float(loss):.3f}")
            if labelled == 0:
                raise InputError(f"{store.labels_path}: no labelled pixels to train the linear probe on "
                                 "(every label is ignore)")
    return to_host(probe)


def loss_and_grads(probe, z, lab, size, n_classes):
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
        update_confusion(acc, to_host(logits.argmax(axis=-1)), store, s)
    return summarize(acc.matrix, store, metrics.identity_match(n_classes, n_classes))
