"""The training loop: memory-mapped features in, checkpoints and ``log.jsonl`` out.

One seeded generator drives everything (data order, KNN partner ranks, the model's dropout masks,
sampling points and negative permutations, a base's state draws: HP's pool crops and patches and
the seed of its denominator draw), and its state is checkpointed with the parameters, the Adam
moments, the position in the current epoch's order and the base's state (HP's pools), so
``--resume`` continues bit-exactly: 100 steps straight equal 50 steps + resume + 50 steps.

A base may ask for AdamW's decoupled weight decay and global-norm clipping of the head's gradients
(``weight_decay``, ``grad_clip``: HP's optimiser; off for STEGO and SmooSeg), and for batch inputs
besides the features (HP: the batch's rows of ``attn.npy`` and ``feats_aug.npy``, read with them).

Ctrl-C (SIGINT) is caught between steps: the step in flight finishes, a checkpoint is written,
and the loop returns ``interrupted=True``.

A step that meets NaN or inf (in a Sinkhorn input, the loss or the gradients) raises
:class:`~omh_ref.core.errors.NonFiniteError` before it changes anything; the loop saves the state
from before that step as ``diverged.npz`` and stops with a one-line error. Other exceptions are
bugs and propagate unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..core import bases, head, model
from ..core.backend import get_array_module, host_floats, resolve_device, to_device
from ..core.config import merge, parse_shifts, with_base_defaults
from ..core.errors import InputError
from ..core.files import write_text
from ..core.lock import FolderLock
from ..core.options import default
from ..core.ops import grid_sample, normalize
from ..core.optim import adam_init, adam_step, clip_by_norm
from ..core.optim import finite as finite_grads
from ..features.knn import build_knn, cached_table, certifies_finite, default_path, load_knn
from ..features import provenance
from ..features.store import FeatureStore
from . import checkpoint


@dataclass
class TrainOptions:
    """What the loop needs besides the model config (``omh-ref train``'s flags)."""

    features: str
    out: str
    knn: str | None = None           # default: <features dir>/knn.npy, built when missing
    steps: int = default("steps")
    batch_size: int = default("batch_size")
    lr: float = default("lr")  # projection head (STEGO's net lr)
    lr_clusters: float = default("lr_clusters")  # centroids (STEGO's cluster-probe lr)
    seed: int = default("seed")
    device: str = default("device")
    resume: str | None = None
    ckpt_every: int = default("ckpt_every")
    log_every: int = default("log_every")
    knn_k: int = default("knn_k")  # partners drawn from ranks 1..knn_k
    shifts_auto: bool = False
    progress: bool = True
    overwrite: bool = False          # start over in a folder that already holds a checkpoint
    val_every: int = default("val_every")  # steps between validations, when train() is given a validator
    keep_best: bool = False          # keep best.npz, the checkpoint of the best validation mIoU
    allow_backbone_mismatch: bool = False   # validate on features of another backbone (said, not refused)
    prefetch: bool | None = None     # read the next batch in a background thread during a step;
                                     # None: on a GPU only (docs/benchmarks.md: on 2 busy CPU cores
                                     # the reader thread cost more than it hid)
    weight_decay: float | None = None   # AdamW's decoupled decay of the head's parameters (0: off);
                                        # None: the base's (HP 0.1), the checkpoint's on resume
    grad_clip: float | None = None      # the head's gradients clipped to this global norm (0: off);
                                        # None: the base's (HP 10), the checkpoint's on resume

    def validate(self):
        for name in ("steps", "batch_size", "ckpt_every", "log_every", "knn_k", "val_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise InputError(f"--{name.replace('_', '-')}: expected a positive integer, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"--seed: expected an integer >= 0, got {self.seed!r}")
        for name in ("lr", "lr_clusters"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)):
                raise InputError(f"--{name.replace('_', '-')}: expected a positive number, got {v!r}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                                      and math.isfinite(v)):
                raise InputError(f"{name}: expected a number >= 0 (0: off), got {v!r}")
        try:
            resolve_device(self.device)
        except ValueError as e:
            raise InputError(str(e)) from None


FILE_KEYS = ("steps", "batch_size", "lr", "lr_clusters", "seed", "ckpt_every", "log_every", "val_every",
             "weight_decay", "grad_clip")
OPTIMISER_KEYS = ("weight_decay", "grad_clip")   # a base's choices (None: its own), recorded in checkpoints


def optimiser_settings(opts, base_name, before=None) -> dict:
    """``weight_decay`` and ``grad_clip`` of a run: the options' where given, else (``None``) the
    checkpoint's (``before``, a resumed run's recorded options), else the base's ``LOOP_DEFAULTS``,
    else 0 (off)."""
    own = bases.get(base_name).LOOP_DEFAULTS
    out = {}
    for k in OPTIMISER_KEYS:
        v = getattr(opts, k)
        if v is None:
            v = (before or {}).get(k)
        out[k] = float(own.get(k, 0.0) if v is None else v)
    return out


def loop_settings(flags: dict, file_table: dict, explicit, source, base_name=None) -> dict:
    """The loop options of a run: a config file's ``[train]`` table (keys in :data:`FILE_KEYS`)
    over a new run's base's own loop values (``base_name``'s ``LOOP_DEFAULTS``: SmooSeg's learning
    rates and batch; None for a resumed run, whose settings are the checkpoint's) over the command
    line's defaults; flags given explicitly (named in ``explicit``) win."""
    out = dict(flags)
    for key, value in (bases.get(base_name).LOOP_DEFAULTS if base_name else {}).items():
        if key in out and key not in explicit:
            out[key] = value
    for key, value in file_table.items():
        if key not in FILE_KEYS:
            raise InputError(f"{source}: unknown [train] field {key!r} (known: {', '.join(FILE_KEYS)})")
        if key not in explicit:
            out[key] = value
    return out


def resumed(resume, features, out, given: dict, explicit, say=print):
    """What ``--resume CKPT`` alone means -> (features, out, loop settings): the checkpoint's
    feature file when ``features`` is None, its folder when ``out`` is None, and its loop settings
    (``--steps`` included) for every key of ``given`` not in ``explicit``. A ``--steps`` other
    than the run's is allowed and said; other changed settings are said when the run opens."""
    info = checkpoint.load(resume)["info"]
    checkpoint.refuse_imported(resume, info)
    before = info.get("options", {})
    if features is None:
        features = info.get("features")
        if not features:
            raise InputError(f"{resume}: the checkpoint does not name its feature file; pass --features")
        if not Path(features).is_file():
            raise InputError(f"{resume}: its feature file {features} is not there (moved?); pass --features "
                             "with its new path")
        say(f"resuming on the checkpoint's feature file {features}")
    out = str(Path(resume).parent) if out is None else out
    given = {k: (v if k in explicit or k not in before else before[k]) for k, v in given.items()}
    if "steps" in explicit and before.get("steps") not in (None, given["steps"]):
        say(f"note: --steps {given['steps']}: the run was started with --steps {before['steps']}; it now trains "
            f"to step {given['steps']}")
    return features, out, given


def model_config(store: FeatureStore, file_fields: dict, flags: dict, shifts=None, resume=None,
                 source="config"):
    """The model config of a run -> (Config, shifts_auto). A new run: the defaults, then the config
    file's fields, then the flags given (``None`` = not given), ``in_dim`` from the features. A
    resumed run starts from the checkpoint's config instead; :func:`train` then refuses any field
    that differs from it."""
    if "in_dim" in file_fields and file_fields["in_dim"] != store.C:
        raise InputError(f"{source}: in_dim {file_fields['in_dim']!r} but {store.path} has C={store.C} channels "
                         "(in_dim comes from the features; leave it out)")
    if resume:
        base = checkpoint.load(resume)["config"]
        if file_fields:
            base = merge(base, file_fields, {"in_dim": base.in_dim}, source=source)
    else:   # the chosen base's own values under the file's and the flags'
        chosen = flags.get("base") or file_fields.get("base") or "stego"
        base = merge(with_base_defaults({"base": chosen}), file_fields, {"in_dim": store.C}, source=source)
    shift_fields, auto = parse_shifts(shifts)
    return merge(base, flags, shift_fields), auto


class _Interrupt:
    """SIGINT sets a flag the loop reads between steps (a second Ctrl-C still kills at once)."""

    def __init__(self):
        self.hit = False
        self.prev = None

    def __enter__(self):
        try:
            self.prev = signal.signal(signal.SIGINT, self._handle)
        except ValueError:   # not the main thread: no handler, Ctrl-C behaves as usual
            self.prev = None
        return self

    def _handle(self, signum, frame):
        if self.hit:   # the second Ctrl-C: stop now (the last checkpoint stays as it was)
            if self.prev is not None:
                signal.signal(signal.SIGINT, self.prev)
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


def auto_shifts(store: FeatureStore, knn, cfg: model.Config, rng, n_images=64):
    """Each pair type's mean raw feature correlation on a sample of the training set
    (``--shifts auto``, docs/METHOD.md): intra = an image with itself, inter = with a KNN partner (ranks 1..k),
    neg = with a random other image. -> {'shift_intra', 'shift_inter', 'shift_neg'}."""
    n = min(n_images, store.N)
    idx = np.sort(rng.choice(store.N, size=n, replace=False))
    partners = knn[idx, rng.integers(1, knn.shape[1], size=n)]
    others = (idx + rng.integers(1, store.N, size=n)) % store.N if store.N > 1 else idx
    S = cfg.feature_samples

    def sampled(rows):
        coords = rng.uniform(-1, 1, size=(n, S, S, 2)).astype(np.float32)
        f = grid_sample.forward(store.read(rows), coords)[0].reshape(n, S * S, -1)
        return normalize.forward(f)[0]

    a = sampled(idx)
    corr = lambda x, y: float(np.matmul(x, y.transpose(0, 2, 1)).mean())  # noqa: E731
    return {"shift_intra": corr(a, a), "shift_inter": corr(a, sampled(partners)),
            "shift_neg": corr(a, sampled(others))}


def _ensure_knn(store, opts, say):
    """The KNN table: the one given (checked), or the features' cached table
    (:func:`~omh_ref.features.knn.cached_table`), built when missing and rebuilt when it belongs to
    another version of the file. A build holds the features folder's lock; a run that finds
    another process building the same table waits for it and then reads its table.
    -> (table, path, certified): ``certified`` when the table's sidecar records that building it
    found every row of these features finite (the loop then skips the per-batch check)."""
    if opts.knn:
        path = Path(opts.knn)
        return load_knn(path, store, min_k=1), path, certifies_finite(path, store)
    found = cached_table(store, opts.knn_k, say)
    if found is not None:
        return (*found, certifies_finite(found[1], store))
    with FolderLock(default_path(store).parent, "knn", wait=True, say=say):
        found = cached_table(store, opts.knn_k, say)    # built by the process we waited for
        if found is not None:
            return (*found, certifies_finite(found[1], store))
        path = default_path(store)
        say(f"knn: building {path} (k={opts.knn_k}) from {store.path}")
        try:
            build_knn(store, path, k=opts.knn_k)
        except OSError as e:
            raise InputError(f"{path}: cannot write the KNN table ({e.strerror}); the features are untouched, "
                             "and training has not started") from None
    return load_knn(path, store, min_k=1), path, certifies_finite(path, store)


def _next_batch(state, N, B, rng):
    """Indices of the next batch: epochs are seeded permutations, the last partial batch dropped."""
    if state["pos"] + B > N:
        state["order"] = rng.permutation(N)
        state["pos"] = 0
        state["epoch"] += 1
    idx = state["order"][state["pos"]:state["pos"] + B]
    state["pos"] += B
    return idx


def _trim_log(log_path, step):
    """On resume, drop log lines past the checkpoint's step (they will be written again)."""
    if not log_path.is_file():
        return
    keep = []
    for ln in log_path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError, TypeError):
            pass   # a line torn by a kill mid-write, or not ours: dropped
    write_text(log_path, "".join(ln + "\n" for ln in keep))


def _lr_table(params, opts):
    """The centroids at ``lr_clusters``, every other parameter with a gradient (the head, a base's
    own: HP's project_head) at ``lr``; a teacher's keys are listed but get no gradient."""
    return {k: (opts.lr_clusters if k.startswith("M") else opts.lr) for k in params}


def _inputs(store, cfg) -> dict:
    """The row files a step of the base reads besides the features (HP: attn.npy, and
    feats_aug.npy where the consistency term is on), opened and checked against the features;
    a missing or mismatched one is one line naming it (the store's)."""
    openers = {"attn": store.open_attention, "feats_aug": store.open_augmented}
    return {k: openers[k]() for k in bases.inputs(bases.get(cfg.base), cfg)}


def _patch_reader(store):
    """``read(rows, cells) -> (P, C)`` float32: one patch (cell = y·w + x) of each row, read
    through the memmap (a few bytes a row, in file order), finite or one line naming the row."""
    f = store.feats
    opened = getattr(f, "offset", 0) + f.size * f.dtype.itemsize

    def read(rows, cells):
        rows, cells = np.asarray(rows, np.int64), np.asarray(cells, np.int64)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), store.C), np.float32)
        try:   # a file shrunk meanwhile would kill the process (SIGBUS) on a memmap read: named first
            if os.stat(store.path).st_size < opened:
                raise InputError(f"{store.path}: the feature file shrank while in use (overwritten or truncated?); "
                                 "the reference pool cannot be read")
            out[order] = np.asarray(f[rows[order], cells[order] // store.w, cells[order] % store.w], dtype=np.float32)
        except OSError as e:
            raise InputError(f"{store.path}: cannot read the reference pool's patches ({e.strerror or e})") from None
        store.release()
        bad = ~np.isfinite(out).all(axis=1)
        if bad.any():
            raise InputError(f"{store.path}: row {int(rows[np.argmax(bad)])} contains NaN or inf (expected finite "
                             "features)")
        return out
    return read


def train(cfg: model.Config, opts: TrainOptions, say=print, validate=None) -> dict:
    """Train; returns {'step', 'checkpoint', 'log', 'interrupted', 'config', 'best'}.

    ``cfg.in_dim`` must match the features' C. On resume the checkpoint's config must equal
    ``cfg`` (an InputError names the fields that differ). The run holds the lock of ``opts.out``
    (:class:`~omh_ref.core.lock.FolderLock`) from before its first write to its end.

    ``validate(params, cfg) -> {"val_miou", "val_acc", ...}`` (evaluation's job, e.g.
    :class:`omh_ref.evaluate.validation.Validator`; the loop knows no labels) runs every
    ``opts.val_every`` steps and after the last; its numbers go to ``log.jsonl`` and the progress
    bar, and with ``opts.keep_best`` the best-scoring state is kept as ``best.npz``. Selecting a
    checkpoint on validation labels is supervision (STEGO's training does it too)."""
    opts.validate()
    if opts.keep_best and validate is None:
        raise InputError("--keep-best: needs a validation split (--val-features)")
    store = FeatureStore(opts.features)
    if cfg.in_dim != store.C:
        raise InputError(f"{store.path}: features have C={store.C} channels but the config says in_dim={cfg.in_dim}")
    if opts.batch_size > store.N:
        raise InputError(f"--batch-size {opts.batch_size}: larger than the {store.N} images in {store.path}")
    if bases.negatives(bases.get(cfg.base), cfg) and opts.batch_size < 2:
        raise InputError("--batch-size: negative pairs need at least 2 images per batch")
    base = bases.get(cfg.base)
    if hasattr(base, "check_batch"):   # a base's limits on the batch (HP's denominator draw), before anything runs
        try:
            base.check_batch(cfg, opts.batch_size, store.h * store.w)
        except ValueError as e:
            raise InputError(f"--batch-size {opts.batch_size}: {e}") from None
    inputs = _inputs(store, cfg)     # before the lock and the folder: a missing file is named first
    _check_backbones(store, opts, say, validate)
    with FolderLock(opts.out, "train", say=say):
        return _Run(cfg, opts, say, store, validate, inputs).run()


def _check_backbones(store, opts, say, validate):
    """Features of random weights are said; a validation split (a ``validate`` with a
    ``provenance``, as :class:`~omh_ref.evaluate.validation.Validator` has) of another backbone is
    refused unless ``opts.allow_backbone_mismatch``."""
    mine = provenance.of_meta(store.meta) if store.meta else None
    note = provenance.random_note(mine, f"the training features {store.path}")
    if note:
        say(note)
    theirs = getattr(validate, "provenance", None)
    if mine and theirs:
        provenance.require_same(mine, theirs, given_what="the --val-features", trained_what=f"{store.path}",
                                allow=opts.allow_backbone_mismatch, say=say)


class _Due(NamedTuple):
    log: bool
    validate: bool
    save: bool


class _Run:
    """One training run under ``opts.out``: opened (new, or resumed from a checkpoint), stepped,
    looked at (log, validation, checkpoint; the one host read), closed. Its state is its fields:

    params, opt_state, rng, step, loop (data order and position), best (the best validation so
    far), state (the base's arrays outside the parameters: HP's pools), cfg and opts as the run
    records them; ``saved_step`` the last step on disk; the divergence watch
    ``ok``/``bad_at``/``bad_why`` (device scalars) and ``window`` (step -> generator state, data
    position, Adam count, rows and base state before it, since the last look)."""

    def __init__(self, cfg, opts, say, store, validate, inputs=None):
        self.cfg, self.opts, self.say, self.store, self.validate = cfg, opts, say, store, validate
        self.inputs, self.read_patches = inputs or {}, _patch_reader(store)
        knn, self.knn_path, self.knn_certified = _ensure_knn(store, opts, say)
        self.knn = knn[:, : opts.knn_k + 1]
        self.out = Path(opts.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_path, self.log_path = self.out / "ckpt.npz", self.out / "log.jsonl"
        self.fingerprint = store.fingerprint()
        if opts.resume:
            self._resume()
        else:
            self._start()
        if self.opts.device == "gpu":
            st = self.opt_state
            self.params = to_device(self.params, "gpu")
            self.opt_state = {"t": st["t"], "m": to_device(st["m"], "gpu"), "v": to_device(st["v"], "gpu")}
            self.state = to_device(self.state, "gpu")
        self.lr = _lr_table(self.params, self.opts)
        base = bases.get(self.cfg.base)
        self.buffers = bool(bases.teacher_keys(base))
        # AdamW's decay and the clipping act on the head's parameters (HP: every one, biases included,
        # not project_head and not the probes; docs/hp_reading.md §9)
        self.decay = {k: self.opts.weight_decay for k in head.KEYS} if self.opts.weight_decay else None
        self.clip = self.opts.grad_clip or None
        self.saved_step = checkpoint.step_of(self.ckpt_path) if self.opts.resume else None
        # A divergence (NaN or inf in the loss or the gradients) is watched on the device, without
        # a synchronisation a step: Adam applies a step only while `ok` holds, so from the first
        # bad step on the parameters and moments stay as they were before it; `bad_at`/`bad_why`
        # remember which step and what. The loop reads them (with the loss parts, in one transfer)
        # whenever it logs, validates, checkpoints or stops, and then saves the state from before
        # the bad step.
        self.xp = get_array_module(*self.params.values())
        self.ok, self.bad_at, self.bad_why = self.xp.asarray(True), self.xp.asarray(-1), self.xp.asarray(0)
        self.window = {}

    # ---- opening ---------------------------------------------------------------------------------
    def _resume(self):
        opts, store, out = self.opts, self.store, self.out
        same_run = Path(opts.resume).resolve().parent == out.resolve()
        if self.ckpt_path.exists() and not same_run and not opts.overwrite:
            raise InputError(f"{self.ckpt_path}: --out holds another run's checkpoint; resume {opts.resume} with "
                             f"--out {Path(opts.resume).parent}, or pass --overwrite to replace that run")
        ck = checkpoint.load(opts.resume)
        checkpoint.refuse_imported(opts.resume, ck["info"])
        self._check_resumable(ck)
        self.params, self.opt_state, self.rng, self.step = ck["params"], ck["opt_state"], ck["rng"], ck["step"]
        self.state = {k: ck["state"][k] for k in bases.state_names(bases.get(self.cfg.base))}
        self.loop = {"order": ck["arrays"]["order"], "pos": int(ck["info"]["pos"]), "epoch": int(ck["info"]["epoch"])}
        self.best = dict(ck["info"].get("best") or {"step": None, "val_miou": None})
        if len(self.loop["order"]) != store.N:
            raise InputError(f"{opts.resume}: checkpoint's data order has {len(self.loop['order'])} images, "
                             f"{store.path} has {store.N}")
        _trim_log(self.log_path, self.step)
        self.say(f"resuming from {opts.resume} at step {self.step}")
        before = ck["info"].get("options", {})
        opts = dataclasses.replace(opts, **optimiser_settings(opts, self.cfg.base, before))
        keys = ("batch_size", "lr", "lr_clusters", "knn_k", *OPTIMISER_KEYS)
        changed = [k for k in keys if k in before and before[k] != getattr(opts, k)]
        if hasattr(bases.get(self.cfg.base), "schedule") and before.get("steps") not in (None, opts.steps):
            changed.append("steps")   # the base's schedule (HP's λ) runs to the run's last step
        if changed:   # allowed (a lower --lr after a divergence), but said: the run is no longer one
            self.say("note: " + ", ".join(f"--{k.replace('_', '-')} {before[k]} -> {getattr(opts, k)}" for k in changed)
                     + " since the checkpoint; the continuation differs from an uninterrupted run"
                     + (f" (the {self.cfg.base} base's λ follows the run's steps)" if "steps" in changed else ""))
        self.opts = dataclasses.replace(opts, seed=before.get("seed", opts.seed))   # the run's seed, in its records

    def _check_resumable(self, ck):
        """The checkpoint is whole and finite, of this config and of these features."""
        opts, cfg = self.opts, self.cfg
        checkpoint.check_params(opts.resume, ck["params"], ck["config"])
        names = bases.state_names(bases.get(ck["config"].base))
        missing = [k for k in names if k not in ck["state"]]
        if missing:
            raise InputError(f"{opts.resume}: holds no {', '.join(missing)} (the {ck['config'].base} base's state); "
                             "it cannot be resumed bit-exactly, start a new run")
        base = bases.get(ck["config"].base)
        want = base.state_shapes(ck["config"]) if hasattr(base, "state_shapes") else {}
        wrong = [f"state/{k} {tuple(ck['state'][k].shape)} (expected {shape})" for k, shape in want.items()
                 if tuple(ck["state"][k].shape) != shape]
        if wrong:
            raise InputError(f"{opts.resume}: {', '.join(wrong)}: not this config's state; start a new run")
        arrays = {**ck["params"], **{f"adam_{m}/{k}": v for m in ("m", "v") for k, v in ck["opt_state"][m].items()},
                  **{f"state/{k}": ck["state"][k] for k in names}}
        bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
        if bad:   # a run resumed from here would diverge at its first step
            raise InputError(f"{opts.resume}: non-finite values in {', '.join(bad)}; resume from an earlier "
                             "checkpoint (a diverged run's diverged.npz holds the state before the bad step)")
        diff = [f.name for f in dataclasses.fields(cfg) if getattr(ck["config"], f.name) != getattr(cfg, f.name)]
        if diff:
            raise InputError(f"{opts.resume}: checkpoint has another config (differs in {', '.join(diff)})")
        if ck["info"].get("features_fingerprint") not in (None, self.fingerprint):
            raise InputError(f"{opts.resume}: checkpoint was trained on another feature file than {self.store.path} "
                             f"({ck['info'].get('features')}; --resume alone takes the checkpoint's own)")

    def _start(self):
        opts, store = self.opts, self.store
        if self.ckpt_path.exists() and not opts.overwrite:
            raise InputError(f"{self.ckpt_path}: a checkpoint is already there; continue it with --resume "
                             f"{self.ckpt_path}, or pass --overwrite to start over")
        self.rng = np.random.default_rng(opts.seed)
        if opts.shifts_auto:
            shifts = auto_shifts(store, self.knn, self.cfg, np.random.default_rng([opts.seed, 1]))
            self.cfg = dataclasses.replace(self.cfg, **shifts)
            self.say("shifts auto: " + ", ".join(f"{k}={v:.4f}" for k, v in shifts.items()))
        self.params = model.init_params(self.cfg, self.rng, dtype=np.float32)
        self.opt_state = adam_init(self.params)
        self.step = 0
        self.loop = {"order": self.rng.permutation(store.N), "pos": 0, "epoch": 0}
        self.state = model.start_state(self.cfg, self.params, self.read_patches, store.N, store.h * store.w, self.rng)
        self.opts = dataclasses.replace(opts, **optimiser_settings(opts, self.cfg.base))
        self.best = {"step": None, "val_miou": None}
        if self.log_path.exists():
            self.log_path.unlink()

    # ---- saving and divergence -------------------------------------------------------------------
    def intact(self) -> str:
        if self.saved_step is None:
            return "no checkpoint of this run was written yet"
        return f"the step-{self.saved_step} checkpoint {self.ckpt_path} is intact; continue with --resume {self.ckpt_path}"

    def save(self, path, rng, loop):
        """The run's state at ``self.step`` with the generator ``rng`` and data position ``loop``."""
        info = {"pos": loop["pos"], "epoch": loop["epoch"], "features": str(self.store.path.resolve()),
                "features_fingerprint": self.fingerprint, "knn": str(self.knn_path.resolve()), "best": self.best,
                "backbone": provenance.of_meta(self.store.meta) if self.store.meta else None,
                "options": {k: v for k, v in dataclasses.asdict(self.opts).items() if k != "progress"}}
        try:
            checkpoint.save(path, self.params, self.opt_state, self.step, rng, self.cfg,
                            arrays={"order": loop["order"]}, info=info, state=self.state)
        except OSError as e:
            raise InputError(f"{path}: cannot write the step-{self.step} checkpoint ({e.strerror}); "
                             f"{self.intact()}") from None
        if path == self.ckpt_path:
            self.saved_step = self.step

    def diverged(self, first_bad, why):
        """Save the state before step ``first_bad`` as diverged.npz and stop with what to do."""
        rng_state, loop_state, t, rows, self.state = self.window[first_bad]
        before = np.random.default_rng()
        before.bit_generator.state = rng_state
        self.step, self.opt_state["t"] = first_bad - 1, t
        where = self.out / "diverged.npz"
        self.save(where, before, loop_state)
        try:   # the step's own input first: NaN or inf there is the features' fault, not the lr's
            self.store.read(rows, check_finite=True)
            for rf in self.inputs.values():
                rf.read(rows[:self.opts.batch_size], check_finite=True)
        except InputError as e:
            raise InputError(f"training diverged at step {first_bad} ({why}) on non-finite input: {e}; check the "
                             f"features (the state before the step is in {where})") from None
        raise InputError(f"training diverged at step {first_bad} ({why}); the state before the step is in "
                         f"{where} (continue it with --resume and a lower --lr)")

    # ---- stepping --------------------------------------------------------------------------------
    def take_step(self, batch, draws, state_draws=None):
        """One optimiser step on the device, the divergence watch updated; reads nothing back.
        ``state_draws``: the base's state change due before this step (HP's pool renewal).
        -> the loss parts (device scalars). (The benchmarks call it on a bare namespace of the
        fields STEGO's step reads; a base state, clipping and decay are then absent: none.)"""
        xp = self.xp
        state = getattr(self, "state", None)
        if state_draws is not None:
            self.state = state = model.advance_state(self.cfg, self.params, state, state_draws, self.read_patches)
        loss, parts, grads = model.loss_and_grads(self.params, batch, self.cfg, self.rng, draws=draws, state=state)
        clip, decay = getattr(self, "clip", None), getattr(self, "decay", None)
        finite = xp.isfinite(loss)
        was_ok = self.ok
        ok = self.ok & finite
        checked = self.buffers or clip is not None
        if checked:   # the guard reads the gradients as they came (before any clipping)
            ok = ok & finite_grads(grads)
        if self.buffers:   # a base's no-gradient parameters move first, from the step's own values
            model.update_buffers(self.params, self.cfg, ok)
        if clip is not None:
            grads = clip_by_norm(grads, head.KEYS, clip)
        self.ok = adam_step(self.params, grads, self.opt_state, self.lr, ok=ok, grads_checked=checked,
                            weight_decay=decay)
        first = was_ok & ~self.ok
        self.bad_at = xp.where(first, self.step + 1, self.bad_at)
        self.bad_why = xp.where(first, xp.where(finite, 2, 1), self.bad_why)
        self.step += 1
        return parts

    def look(self, parts, state, due, log, bar, stop):
        """After a step that logs, validates, checkpoints or stops: the one host read (loss parts
        and the divergence watch), then each of those that is ``due`` (:meth:`due`; a Ctrl-C is
        read again at the end, so one during validation still writes the checkpoint). ``state`` =
        (generator state, data position) after the step, what its checkpoint records."""
        step = self.step
        host = host_floats({**parts, "_ok": self.ok, "_bad_at": self.bad_at, "_bad_why": self.bad_why})
        if not host.pop("_ok"):
            self.diverged(int(host["_bad_at"]), NON_FINITE[int(host["_bad_why"])])
        del host["_bad_at"], host["_bad_why"]
        self.window.clear()
        rng_now = np.random.default_rng()
        rng_now.bit_generator.state = state[0]
        val = self.validate(self.params, self.cfg) if due.validate else None
        if val is not None:
            self.last_val = val
        if due.log or val:
            rec = {"step": step, "epoch": state[1]["epoch"], "seconds": round(time.perf_counter() - self.t0, 3),
                   **host, **(val or {})}
            log.write(json.dumps(rec) + "\n")
            post = {k: f"{host[k]:.3f}" for k in ("loss", bases.get(self.cfg.base).LOSS_PART, "clu_0") if k in host}
            if self.last_val is not None:
                post["val_miou"] = f"{self.last_val['val_miou']:.1f}"
            bar.set_postfix(post)
        if val and self.opts.keep_best and (self.best["val_miou"] is None or val["val_miou"] > self.best["val_miou"]):
            self.best.update(step=step, val_miou=val["val_miou"])
            self.save(self.out / "best.npz", rng_now, state[1])
        bar.update(1)
        if due.save or stop.hit:
            self.save(self.ckpt_path, rng_now, state[1])

    def due(self) -> "_Due":
        """What the step just taken is scheduled to do (each also after the last step)."""
        opts, step = self.opts, self.step
        last = step == opts.steps
        return _Due(log=step % opts.log_every == 0 or last,
                    validate=self.validate is not None and (step % opts.val_every == 0 or last),
                    save=step % opts.ckpt_every == 0 or last)

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        """Step to ``opts.steps`` or a Ctrl-C. The next batch's indices and partners are drawn as
        soon as the current step's model draws are made (the generator's order is unchanged:
        batch, partners, model draws, next batch, ...), so its read overlaps the current step in
        a background thread."""
        opts, store, B = self.opts, self.store, self.opts.batch_size
        prefetch = opts.device == "gpu" if opts.prefetch is None else opts.prefetch
        reader = _BatchReader(store, opts.device, check_finite=not self.knn_certified, prefetch=prefetch,
                              partners=bases.get(self.cfg.base).needs_partners(self.cfg), inputs=self.inputs)
        bar = _progress(opts, self.step)
        self.last_val, self.t0, interrupted = None, time.perf_counter(), False
        state = (self.rng.bit_generator.state, dict(self.loop))      # what a checkpoint after `step` records
        pending = reader.submit(*_next_indices(self.loop, store.N, B, self.rng, self.knn)) if self.step < opts.steps else None
        with _Interrupt() as stop, _LogFile(self.log_path, self.intact) as log, reader:
            while self.step < opts.steps:
                batch = pending.result()
                self.window[self.step + 1] = (*state, self.opt_state["t"], pending.rows, self.state)
                draws = model.draw(self.cfg, B, store.C, self.rng, progress=(self.step, opts.steps))
                renew = model.state_draws(self.cfg, self.step, store.N, store.h * store.w, self.rng)
                state = (self.rng.bit_generator.state, dict(self.loop))
                if self.step + 1 < opts.steps:
                    pending = reader.submit(*_next_indices(self.loop, store.N, B, self.rng, self.knn))
                parts = self.take_step(batch, draws, renew)
                due = self.due()
                if not (any(due) or stop.hit):      # nothing to do: no host read this step
                    bar.update(1)
                    continue
                self.look(parts, state, due, log, bar, stop)
                if stop.hit:
                    interrupted = True
                    break
        bar.close()
        if interrupted:
            self.say(f"interrupted at step {self.step}: checkpoint written to {self.ckpt_path}; continue with "
                     f"--resume {self.ckpt_path}")
        return {"step": self.step, "checkpoint": str(self.ckpt_path), "log": str(self.log_path),
                "interrupted": interrupted, "config": self.cfg, "best": dict(self.best)}


NON_FINITE = {1: "non-finite loss", 2: "non-finite gradients"}


def _next_indices(loop, N, B, rng, knn):
    """The next batch's rows and their KNN partners (drawn from ranks 1..k), in the generator's
    order: the epoch permutation when one starts, then the partner ranks."""
    idx = _next_batch(loop, N, B, rng)
    return idx, knn[idx, rng.integers(1, knn.shape[1], size=len(idx))]


class _BatchReader:
    """Reads batches in a background thread while the current step runs: the memory-mapped rows
    (release of their pages, shape and size checks included), converted to float32 there for the
    CPU; for a GPU they stay float16 (half the transfer) and are converted on the device. The
    finiteness of the rows is checked per read only when no KNN table has certified the whole file
    (a table built from it reads every row once; see ``features/knn.py``)."""

    def __init__(self, store, device, check_finite=True, prefetch=True, partners=True, inputs=None):
        from concurrent.futures import Future, ThreadPoolExecutor

        self.store, self.device, self.check_finite = store, device, check_finite
        self.partners = partners     # False: the base uses no KNN partners, so none is read
        self.inputs = inputs or {}   # a base's row files (HP: attn, feats_aug), read for the batch rows
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="omh-ref-batches") if prefetch else None
        self._done = Future

    def _read(self, idx, partners):
        dtype = self.store.dtype if self.device == "gpu" else np.float32
        rows = self.store.read(np.concatenate([idx, partners]), dtype=dtype, check_finite=self.check_finite)
        extra = {k: rf.read(idx, dtype=rf.rows.dtype if self.device == "gpu" else np.float32)   # no certificate:
                 for k, rf in self.inputs.items()}                                               # checked per read
        return rows[:len(idx)], (rows[len(idx):] if self.partners else None), extra

    def submit(self, idx, partners):
        partners = partners if self.partners else partners[:0]
        rows = np.concatenate([idx, partners])
        if self.pool is not None:
            return _Batch(self.pool.submit(self._read, idx, partners), self.device, rows)
        fut = self._done()                                  # no prefetch: read now, in this thread
        try:
            fut.set_result(self._read(idx, partners))
        except BaseException as e:  # delivered at .result(), where a prefetched error would be
            fut.set_exception(e)
        return _Batch(fut, self.device, rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class _Batch:
    """A batch being read: ``result()`` gives it, ``rows`` are its feature rows (batch, then
    partners)."""

    def __init__(self, fut, device, rows):
        self.fut, self.device, self.rows = fut, device, rows

    def result(self):
        feats, pos, extra = self.fut.result()
        batch = {"feats": feats, **extra} if pos is None else {"feats": feats, "feats_pos": pos, **extra}
        return to_device(batch, "gpu") if self.device == "gpu" else batch


class _LogFile:
    """``log.jsonl`` opened for appending; a failed write is one line naming it and what is intact."""

    def __init__(self, path, intact):
        self.path, self.intact, self.fh = path, intact, None

    def _fail(self, e):
        raise InputError(f"{self.path}: cannot append to the training log ({e.strerror}); {self.intact()}") from None

    def __enter__(self):
        try:
            self.fh = open(self.path, "a")
        except OSError as e:
            self._fail(e)
        return self

    def write(self, line):
        try:
            self.fh.write(line)
            self.fh.flush()
        except OSError as e:
            self._fail(e)

    def __exit__(self, *exc):
        try:
            self.fh.close()
        except OSError:
            pass


def _progress(opts, start):
    from ..core.progress import bar

    return bar(opts.steps, "train", opts.progress, unit="step", initial=start)
