"""The linear probe (the supervised diagnostic every USS paper reports): a 1x1 layer D -> n_classes
on detached codes, its logits bilinearly upsampled to label resolution and trained with
cross-entropy on the labelled pixels (STEGO), Adam, seeded; evaluated with the identity mapping
(cluster i = class i)."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..core.backend import get_array_module, to_device, to_host
from ..core.errors import InputError
from ..core.ops import linear, log_softmax, resize
from ..core.optim import adam_init, adam_step
from ..features.rows import RowWriter, create_npy
from ..features.store import FeatureStore
from . import metrics
from .predict import code, codes, label_shape, summarize, update_confusion


CACHE_MODES = ("auto", "memmap", "none")
SHOW_EVERY = 25    # the bar shows the probe's loss every this many steps (each read waits for the device)


def linear_probe(params, store: FeatureStore, n_classes, epochs=10, batch_size=16, lr=1e-3, seed=0,
                 device="cpu", progress=True, cache="auto", cache_dir=None, say=None, *, cfg):
    """Train the probe on detached codes of ``store`` (features + labels). -> (W, b) on host.

    Streams: each epoch visits the images in a seeded random order, a batch at a time, so what is
    resident does not grow with N. The codes come from :class:`CodeSource` (``cache``): computed
    once into a temporary code file and read back batch by batch (``memmap``; the same numbers
    as holding them in memory), or recomputed from the features every epoch (``none``); ``auto``
    caches when the file fits in half of the free space of ``cache_dir`` (the system's temporary
    folder by default). Which one ran is told through ``say``."""
    from ..core.progress import bar as progress_bar

    size = label_shape(store)
    D = params["W1"].shape[0]
    rng = np.random.default_rng(seed)
    bound = 1 / np.sqrt(D)
    probe = {"W": rng.uniform(-bound, bound, (n_classes, D)).astype(np.float32),
             "b": np.zeros(n_classes, np.float32)}
    probe = to_device(probe, device)
    state = adam_init(probe)
    ok = get_array_module(probe["W"]).asarray(True)   # every step's gradients finite so far (read once an epoch)
    steps = epochs * ((store.N + batch_size - 1) // batch_size)
    labelled = done = 0
    with CodeSource(params, store, batch_size, device, cache, cache_dir, say or (lambda m: None), progress,
                    cfg=cfg) as source, \
            progress_bar(steps, "linear probe", progress, unit="step") as bar:
        for epoch in range(epochs):
            order = rng.permutation(store.N)
            for s in range(0, store.N, batch_size):
                idx = np.sort(order[s:s + batch_size])
                z = source.read(idx)
                host = store.read_labels(idx).astype(np.int64)
                valid = (host >= 0) & (host < n_classes)
                if epoch == 0:   # every label is seen once in the first epoch
                    bad = ~valid & ~np.isin(host, metrics.IGNORE)
                    if bad.any():
                        raise InputError(f"{store.labels_path}: label value {int(host[bad][0])} is neither a "
                                         f"class in [0, {n_classes}) nor ignore (255 or -1)")
                    labelled += int(valid.sum())
                lab = to_device(host, device)
                loss, grads = loss_and_grads(probe, z, lab, size, n_classes, count=int(valid.sum()))
                ok = adam_step(probe, grads, state, lr, ok=ok)
                bar.update(1)
                done += 1
                if progress and (done % SHOW_EVERY == 0 or done == steps):   # reading the loss is a device sync
                    bar.set_postfix(ce=f"{float(loss):.3f}")
            if labelled == 0:
                raise InputError(f"{store.labels_path}: no labelled pixels to train the linear probe on "
                                 "(every label is ignore)")
            if not bool(to_host(ok)):
                raise InputError(f"linear probe: non-finite gradients in epoch {epoch + 1} on the codes of "
                                 f"{store.path} (are the features and the checkpoint finite?)")
    return to_host(probe)


class CodeSource:
    """Codes of rows of ``store`` by index, on ``device``; a context manager that removes its
    temporary code file on every exit path. See :func:`linear_probe` for the modes."""

    def __init__(self, params, store: FeatureStore, batch_size, device, cache="auto", cache_dir=None,
                 say=lambda m: None, progress=False, *, cfg):
        if cache not in CACHE_MODES:
            raise InputError(f"--probe-cache: expected one of {', '.join(CACHE_MODES)}, got {cache!r}")
        self.params, self.store, self.batch_size, self.device = params, store, batch_size, device
        self.mode, self.cache_dir, self.say, self.progress = cache, cache_dir, say, progress
        self.tmp, self.codes, self.cfg = None, None, cfg

    def __enter__(self):
        s = self.store
        D = self.params["W1"].shape[0]
        nbytes = s.N * s.h * s.w * D * np.dtype(self.params["W1"].dtype).itemsize
        base = Path(self.cache_dir or tempfile.gettempdir())
        mode = self.mode
        if mode == "auto":
            mode = "memmap" if nbytes <= shutil.disk_usage(base).free // 2 else "none"
        if mode == "none":
            self.say(f"linear probe: codes recomputed from {s.path} every epoch (a code file of "
                     f"{nbytes / 2**30:.1f} GiB would not fit in {base})" if self.mode == "auto" else
                     f"linear probe: codes recomputed from {s.path} every epoch")
            return self
        self.tmp = Path(tempfile.mkdtemp(prefix="omh-ref-codes-", dir=base))
        path = self.tmp / "codes.npy"
        self.say(f"linear probe: caching the codes in {path} ({nbytes / 2**30:.2f} GiB, removed afterwards)")
        try:
            create_npy(path, (s.N, s.h, s.w, D), self.params["W1"].dtype)
            w = RowWriter(path)
            try:
                for start, z in codes(self.params, s, self.batch_size, device=self.device, cfg=self.cfg):
                    w.write(start, to_host(z))
            finally:
                w.close()
            self.codes = FeatureStore(path)
        except BaseException:
            self.__exit__()
            raise
        return self

    def read(self, idx):
        """Codes (len(idx), h, w, D) of rows ``idx`` (sorted), on the device."""
        if self.codes is not None:
            return to_device(self.codes.read(idx, dtype=self.params["W1"].dtype), self.device)
        f = to_device(self.store.read(idx).astype(self.params["W1"].dtype), self.device)
        return code(self.params, f, self.cfg)

    def __exit__(self, *exc):
        self.codes = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None


def loss_and_grads(probe, z, lab, size, n_classes, count=None):
    """Mean cross-entropy over labelled pixels of upsampled logits; -> (loss, grads). ``count``:
    the number of labelled pixels, when the caller knows it from the host labels (otherwise it is
    read from the device, a synchronisation)."""
    xp = get_array_module(z)
    logits, lc = linear.forward(z, probe["W"], probe["b"])                   # B,h,w,n
    up, rc = resize.forward(logits, size)                                    # B,H,W,n
    logp, sc = log_softmax.forward(up)
    valid = (lab >= 0) & (lab < n_classes)
    count = max(int(valid.sum()) if count is None else count, 1)
    # one-hot of the label where labelled (ignored pixels get an all-zero row)
    target = ((lab[..., None] == xp.arange(n_classes)) & valid[..., None]).astype(logp.dtype)
    loss = -(target * logp).sum() / count
    dlogp = target * logp.dtype.type(-1.0 / count)
    dup = log_softmax.backward(dlogp, sc)
    dlogits = resize.backward(dup, rc)
    _, dW, db = linear.backward(dlogits, lc)
    return loss, {"W": dW, "b": db}


def linear_eval(params, probe, store: FeatureStore, n_classes, batch_size=16, flipped=None, device="cpu", *, cfg):
    """Scores of the probe with the identity mapping (cluster i = class i)."""
    size = label_shape(store)
    acc = metrics.ConfusionAccumulator(n_classes, n_classes)
    P = to_device(probe, device)
    for s, z in codes(params, store, batch_size, flipped, device, cfg=cfg):
        logits = resize.forward(linear.forward(z, P["W"], P["b"])[0], size)[0]
        update_confusion(acc, to_host(logits.argmax(axis=-1)), store, s)
    return summarize(acc.matrix, store, metrics.identity_match(n_classes, n_classes))
