"""Speed benchmarks whose claims are ratios against a peer measured in the same run.

Each function returns a dict (JSON-ready) and prints nothing; :func:`format_report` turns the
result of :func:`run_all` into the table ``python -m benchmarks`` prints, each ratio beside its
goal.

* :func:`step_benchmark` — one training step (forward + backward of the full objective) of
  :func:`omh_ref.core.model.loss_and_grads` against torch CPU autograd of the independent torch
  rendering ``omh_ref/core/torch_reference.py`` (``model_loss``), same params, batch, draws, float32.
  Loss and gradients are first checked to agree (:func:`check_step_agreement`, raises
  :class:`Mismatch`); then both are timed, interleaved, at each thread count.
  Goal: ours ≤ 0.4× torch (was 0.8×, met; the next goal is the hardware: :func:`gemm_floor`).
* :func:`kernel_count` — the kernels one training step launches (what decides a GPU step at these
  sizes), ours counted on the strict CuPy stand-in against torch's from its profiler, the same
  step (forward, backward, Adam). Goal: ours ≤ torch's.
* :func:`step_profile` — where our step's time goes, by part (cProfile, caller edges out of
  ``model.forward`` / ``model.backward``), and torch's top ops (``torch.profiler``).
* :func:`sinkhorn_benchmark` — :func:`omh_ref.core.ops.sinkhorn.forward` (+ backward) against POT's
  ``ot.sinkhorn(..., method="sinkhorn_log", stopThr=0)`` on torch tensors with autograd, same
  problem and iteration count, plans (and gradients) checked first. Goal: ours ≥ 2× faster.
* :func:`eval_benchmark` — :mod:`benchmarks.bench_confusion`. Goal: ours ≥ 0.7× bare bincount.
* :func:`scaling_benchmark` — our step time against batch size and number of levels.
* :func:`gpu_benchmark` — the step with CuPy against torch CUDA, where a GPU is present.

The harness runs from the repository root (``python -m benchmarks``): its torch peer is
the independent torch rendering (``omh_ref/core/torch_reference.py``), and it needs torch and POT
(``pip install -e '.[test,torch]'``). The library never imports it. Thread counts are set with threadpoolctl (numpy's BLAS) and
``torch.set_num_threads``; without threadpoolctl each thread count runs in a fresh subprocess
with ``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` set.
"""
from __future__ import annotations

import contextlib
import cProfile
import dataclasses
import importlib.util
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from omh_ref.core import fixtures, head, model
from omh_ref.core.backend import gpu_available, to_device, to_host, xp_for
from omh_ref.core.ops import sinkhorn

REPO = Path(__file__).resolve().parents[1]

# float32 agreement between ours and the peers (one place; float32 against float64 is judged at ~1e-4 everywhere). Both
# sides compute the same float32 sums in different orders: at paper scale the step's loss agrees
# to rounding and every gradient to 1e-5 of its largest entry, the Sinkhorn plans and gradients
# to 4e-6; a real bug (a 1 % error in one backward) is far outside.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
PLAN_RTOL = 1e-4
SINKHORN_GRAD_RTOL = 1e-4

GOALS = {"step": ("numpy / torch", "<=", 0.4), "sinkhorn": ("torch / ours", ">=", 2.0),
         "eval": ("ours / bare", ">=", 0.7), "floor": ("step / GEMM floor", "<=", 1.5),
         "kernels": ("ours / torch", "<=", 1.0)}

PRESETS = {
    # repeats: timed runs (median kept) after `warmup` untimed ones
    "full": {"repeats": 10, "warmup": 2, "sinkhorn_repeats": 20, "eval_pixels": 2e8,
             "eval_repeats": 3, "scaling_repeats": 5},
    "quick": {"repeats": 3, "warmup": 1, "sinkhorn_repeats": 5, "eval_pixels": 2e7,
              "eval_repeats": 2, "scaling_repeats": 2},
}


class Mismatch(AssertionError):
    """Ours and the peer disagree: the timings would compare different computations."""


# ---------------------------------------------------------------- helpers

def paper_config(**overrides) -> model.Config:
    """The paper-scale config: ViT-S/8 features (C=384), D=70, levels 108/54/27, S=11, every
    other field the default (relaxed balanced targets ρ_q=0.1, usage marginals, ε=0.2)."""
    return model.Config(**{"in_dim": 384, "dim": 70, "levels": (108, 54, 27), "feature_samples": 11,
                           **overrides})


def _torch():
    import torch

    return torch


def torch_reference():
    """The independent torch rendering of the model (``omh_ref/core/torch_reference.py``), the one the
    test suite cross-checks against."""
    from omh_ref.core import torch_reference as tr

    return tr


@contextlib.contextmanager
def reference_dtype(tr, dtype, device=None):
    """Run the float64 torch rendering in ``dtype`` (on ``device``): its ``tensor()`` helper and
    ``DT`` are swapped for the duration, and torch tensors pass through it unconverted (so the
    batch is converted once, outside the timer). Restored on exit."""
    torch = _torch()
    old_dt, old_tensor = tr.DT, tr.tensor

    def tensor(x, requires_grad=False):
        if isinstance(x, torch.Tensor):
            t = x.to(dtype)
        else:
            t = torch.tensor(np.asarray(x), dtype=dtype)
        return t.requires_grad_(requires_grad)

    tr.DT, tr.tensor = dtype, tensor
    try:
        if device is not None:
            with torch.device(device):
                yield
        else:
            yield
    finally:
        tr.DT, tr.tensor = old_dt, old_tensor


@contextlib.contextmanager
def thread_limit(n):
    """numpy's BLAS and torch's intra-op pool limited to n threads (threadpoolctl required)."""
    from threadpoolctl import threadpool_limits

    torch = _torch()
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        with threadpool_limits(limits=int(n), user_api="blas"):
            yield
    finally:
        torch.set_num_threads(old)


def have_threadpoolctl() -> bool:
    return importlib.util.find_spec("threadpoolctl") is not None


def _interleaved(fns, repeats, warmup, sync=None):
    """{name: [seconds]}: each fn run warmup times untimed, then repeats rounds, one call of each
    fn per round, back to back, so drift on the machine hits all alike. (An idle pause between
    calls made every time worse and POT's erratic on this 2-vCPU VM, so there is none.)"""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            if sync:
                sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - t)
    return times


def _summary(ts):
    return {"median_s": statistics.median(ts), "min_s": min(ts), "times_s": ts}


def rel_err(got, want):
    """max |got − want| / max |want| (0 when both are exactly zero), in float64."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise Mismatch(f"shape {got.shape} != {want.shape}")
    err = np.abs(got - want).max(initial=0.0)
    return float(err / max(np.abs(want).max(initial=0.0), 1e-300)) if err > 0 else 0.0


def versions() -> dict:
    out = {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
           "processor": _cpu_name(), "cpus": os.cpu_count(),
           "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}
    for name in ("torch", "ot"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    if have_threadpoolctl():
        from threadpoolctl import threadpool_info

        out["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                       for i in threadpool_info() if i.get("user_api") == "blas"]
    return out


def _cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


# ---------------------------------------------------------------- the training step

def make_step_inputs(cfg, batch_size, grid, seed=0):
    """float32 params and batch (B, h, w, C) of random features, and the step's seed."""
    rng = np.random.default_rng(seed)
    params = model.init_params(cfg, rng, dtype=np.float32)
    h, w = grid
    batch = fixtures.random_batch(cfg, rng, B=batch_size, h=h, w=w, dtype=np.float32)
    return params, batch, seed + 1


def _torch_step(tr, cfg, tparams, tbatch, draws, targets=None):
    """One torch step: the reference objective and autograd gradients w.r.t. every param."""
    torch = _torch()
    loss, parts, _ = tr.model_loss(tparams, tbatch, cfg, draws, targets)
    grads = torch.autograd.grad(loss, list(tparams.values()), allow_unused=True)
    return loss, parts, grads


def _torch_inputs(params, batch, dtype, device):
    torch = _torch()
    tparams = {k: torch.tensor(np.asarray(v), dtype=dtype, device=device).requires_grad_(True)
               for k, v in params.items()}
    tbatch = {k: torch.tensor(np.asarray(v), dtype=dtype, device=device) for k, v in batch.items()}
    return tparams, tbatch


def check_step_agreement(params, batch, cfg, step_seed, device="cpu"):
    """Run our step and torch's on the same params, batch and draws, torch holding our cluster
    targets fixed; raise :class:`Mismatch` unless loss (rel LOSS_RTOL) and every gradient (rel
    GRAD_RTOL of its largest entry) agree. -> {"loss_rel_err", "grad_rel_err": {key: err}}."""
    torch = _torch()
    tr = torch_reference()
    dev_params = to_device(params, device)
    dev_batch = to_device(batch, device)
    loss, _, cache = model.forward(dev_params, dev_batch, cfg, np.random.default_rng(step_seed))
    grads = {k: to_host(v) for k, v in model.backward(1.0, cache).items()}
    B, _, _, C = batch["feats"].shape
    draws = model.draw(cfg, B, C, np.random.default_rng(step_seed))
    tdev = "cuda" if device == "gpu" else "cpu"
    dtype = getattr(torch, np.dtype(params["W1"].dtype).name)
    with reference_dtype(tr, dtype, device=tdev if tdev != "cpu" else None):
        tparams, tbatch = _torch_inputs(params, batch, dtype, tdev)
        targets = [None if q is None else torch.tensor(to_host(q), dtype=dtype, device=tdev)
                   for q in cache["targets"]]
        tloss, _, tgrads = _torch_step(tr, cfg, tparams, tbatch, draws, targets)
    out = {"loss": float(to_host(loss)), "torch_loss": float(tloss.detach().cpu()),
           "loss_rel_err": rel_err(to_host(loss), tloss.detach().cpu().numpy()), "grad_rel_err": {}}
    if out["loss_rel_err"] > LOSS_RTOL:
        raise Mismatch(f"step loss: ours {out['loss']:.7g}, torch {out['torch_loss']:.7g} "
                       f"(relative error {out['loss_rel_err']:.2e} > {LOSS_RTOL:.0e})")
    if set(grads) != set(tparams):
        raise Mismatch(f"gradient keys {sorted(grads)} != params {sorted(tparams)}")
    for (k, p), g in zip(tparams.items(), tgrads):
        want = np.zeros(p.shape, dtype=np.float32) if g is None else g.detach().cpu().numpy()
        e = rel_err(grads[k], want)
        out["grad_rel_err"][k] = e
        if e > GRAD_RTOL:
            raise Mismatch(f"step gradient {k}: relative error {e:.2e} > {GRAD_RTOL:.0e} "
                           f"(of its largest entry {np.abs(want).max():.3g})")
    return out


def _time_step(cfg_json, batch_size, grid, repeats, warmup, seed, threads, peers=("numpy", "torch")):
    """Median step times of ours (and torch) at the thread count the process runs with."""
    torch = _torch()
    cfg = model.Config.from_dict(json.loads(cfg_json))
    params, batch, step_seed = make_step_inputs(cfg, batch_size, tuple(grid), seed)
    fns = {}
    with contextlib.ExitStack() as stack:
        if "numpy" in peers:
            fns["numpy"] = lambda: model.loss_and_grads(params, batch, cfg, np.random.default_rng(step_seed))
        if "torch" in peers:
            tr = torch_reference()
            B, _, _, C = batch["feats"].shape
            draws = model.draw(cfg, B, C, np.random.default_rng(step_seed))
            stack.enter_context(reference_dtype(tr, torch.float32))
            tparams, tbatch = _torch_inputs(params, batch, torch.float32, "cpu")
            fns["torch"] = lambda: _torch_step(tr, cfg, tparams, tbatch, draws)
        times = _interleaved(fns, repeats, warmup)
    return {name: _summary(ts) for name, ts in times.items()} | {"threads": threads}


def _time_step_subprocess(n, **kw):
    """_time_step in a fresh interpreter whose BLAS / OpenMP pools are sized by environment."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(n), OMP_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    code = ("import json, sys; from benchmarks import harness; "
            "print(json.dumps(harness._time_step(**json.loads(sys.argv[1]))))")
    res = subprocess.run([sys.executable, "-c", code, json.dumps({**kw, "threads": n})], env=env,
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"step benchmark subprocess ({n} threads) failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def step_benchmark(cfg=None, batch_size=16, grid=(28, 28), threads=(1, 2), repeats=10, warmup=2,
                   seed=0, isolate="auto"):
    """Our training step against torch CPU autograd of the same objective, float32.

    Checks agreement first (raises :class:`Mismatch`), then times both at each thread count.
    isolate: 'threadpool' (threadpoolctl in this process), 'subprocess' (a fresh process per
    thread count, sized by environment variables) or 'auto' (threadpool when threadpoolctl is
    installed). -> dict with the check's errors and, per thread count, both medians and
    ``ratio`` = numpy / torch (goal ≤ 0.4)."""
    cfg = paper_config() if cfg is None else cfg
    params, batch, step_seed = make_step_inputs(cfg, batch_size, grid, seed)
    check = check_step_agreement(params, batch, cfg, step_seed)
    if isolate == "auto":
        isolate = "threadpool" if have_threadpoolctl() else "subprocess"
    kw = {"cfg_json": cfg.to_json(), "batch_size": batch_size, "grid": list(grid), "repeats": repeats,
          "warmup": warmup, "seed": seed}
    runs = []
    for n in threads:
        if isolate == "threadpool":
            with thread_limit(n):
                r = _time_step(**kw, threads=n)
        else:
            r = _time_step_subprocess(n, **kw)
        r["ratio"] = r["numpy"]["median_s"] / r["torch"]["median_s"]
        runs.append(r)
    B, h, w = batch_size, *grid
    return {"shape": {"batch": B, "grid": [h, w], "C": cfg.in_dim, "D": cfg.dim, "levels": list(cfg.levels),
                      "S": cfg.feature_samples, "dtype": "float32"},
            "config": json.loads(cfg.to_json()), "check": check, "isolate": isolate, "repeats": repeats,
            "warmup": warmup, "runs": runs, "goal": GOALS["step"]}


def gemm_floor(cfg=None, batch_size=16, grid=(28, 28), threads=(1, 2), repeats=7, warmup=1, seed=0):
    """The step's own dense matrix multiplies alone, against the whole step, at each thread count:
    the projection head (three 1x1 layers on both images' features) and every cluster level
    (cosine logits), forward and backward, as bare float32 ``@`` on arrays of the step's shapes.
    Nothing else of the step can go faster than these, so ``step / floor`` says how far the
    step is from its hardware limit. -> {"runs": [{"threads", "floor_s", "step_s", "ratio"}],
    "gflop"}."""
    cfg = paper_config() if cfg is None else cfg
    params, batch, step_seed = make_step_inputs(cfg, batch_size, grid, seed)
    rng = np.random.default_rng(seed + 3)
    B, (h, w), C, D = batch_size, grid, cfg.in_dim, cfg.dim
    P2, P = 2 * B * h * w, B * h * w
    f32 = np.float32
    x = rng.standard_normal((P2, C), dtype=f32)
    W1, W2, W3 = (params[k] for k in ("W1", "W2", "W3"))
    Ms = [params[f"M{i}"] for i in range(len(cfg.levels))]
    dz = rng.standard_normal((P2, D), dtype=f32)
    ds = [rng.standard_normal((P, k), dtype=f32) for k in cfg.levels]

    def floor():
        z = x @ W1.T                                   # P2,D
        h2 = x @ W2.T                                  # P2,C
        z = z + h2 @ W3.T
        zm = z[:P]
        for M, d in zip(Ms, ds):
            zm @ M.T                                   # P,K   (forward)
            d @ M                                      # P,D   (dz)
            d.T @ zm                                   # K,D   (dM)
        dz.T @ x                                       # dW1
        dz.T @ h2                                      # dW3
        dh = dz @ W3                                   # P2,C
        dh.T @ x                                       # dW2

    flop = 2 * (P2 * C * (2 * D + C) + sum(3 * P * k * D for k in cfg.levels) + P2 * (2 * C * D + D * C + C * C))
    fns = {"floor": floor,
           "step": lambda: model.loss_and_grads(params, batch, cfg, np.random.default_rng(step_seed))}
    runs = []
    for n in threads:
        ctx = thread_limit(n) if have_threadpoolctl() else contextlib.nullcontext()
        with ctx:
            times = _interleaved(fns, repeats, warmup)
        f, st = statistics.median(times["floor"]), statistics.median(times["step"])
        runs.append({"threads": n, "floor_s": f, "step_s": st, "ratio": st / f, "floor_gflops": flop / f / 1e9})
    return {"runs": runs, "gflop": flop / 1e9, "repeats": repeats, "goal": GOALS["floor"]}


def component_benchmark(cfg=None, batch_size=16, grid=(28, 28), threads=(1, 2), repeats=7, warmup=1, seed=0):
    """The step's three largest parts alone, ours against the torch rendering's counterpart, so
    the profile's shares can be read as gaps:

    * head: the two-branch 1x1 head on both images' features, forward and backward to the six
      weights for a random upstream dz (ours: ops.linear / ops.relu; torch: 1x1 ``conv2d`` on the
      NCHW view and autograd, as ``model_loss`` does);
    * feature sampling: the step's 7 samplings of the C-channel features at S x S points
      (ops.grid_sample vs ``F.grid_sample``);
    * cluster targets: every level's no-gradient target solve on cosine logits (the default
      relaxed targets, or the strictly balanced ones with ``cluster_target = "balanced"``).
    -> {"runs": [{"threads", name: {"numpy", "torch"} medians in s}]}."""

    from omh_ref.core.losses import cluster as cluster_mod
    from omh_ref.core.ops import grid_sample

    torch = _torch()
    F = torch.nn.functional
    tr = torch_reference()
    cfg = paper_config() if cfg is None else cfg
    params, batch, _ = make_step_inputs(cfg, batch_size, grid, seed)
    rng = np.random.default_rng(seed + 2)
    x = np.concatenate([batch["feats"], batch["feats_pos"]])                   # 2B,h,w,C
    dz = rng.standard_normal(x.shape[:3] + (cfg.dim,)).astype(np.float32)
    f = batch["feats"]
    S = cfg.feature_samples
    coords = rng.uniform(-1, 1, (batch_size, S, S, 2)).astype(np.float32)
    n_samplings = 2 + cfg.neg_samples            # the image, its KNN partner, the negatives
    logits = [np.tanh(0.3 * rng.standard_normal((batch_size * grid[0] * grid[1], k))).astype(np.float32)
              for k in cfg.levels]
    relaxed = cfg.cluster_target == "relaxed"

    def ours_head():
        _, cache = head.forward(params, x, cfg.head_activation)
        head.backward(dz, cache)

    tx, tdz = tr.nchw(torch.tensor(x)), tr.nchw(torch.tensor(dz))
    tp = {k: torch.tensor(params[k]).requires_grad_(True) for k in head.KEYS}

    def torch_head():
        def conv(t, W, b):
            return F.conv2d(t, W[:, :, None, None], b)

        z = conv(tx, tp["W1"], tp["b1"]) + conv(F.relu(conv(tx, tp["W2"], tp["b2"])), tp["W3"], tp["b3"])
        torch.autograd.grad((z * tdz).sum(), list(tp.values()))

    tf, tc = tr.nchw(torch.tensor(f)), torch.tensor(coords)

    def ours_sampling():
        for _ in range(n_samplings):
            grid_sample.forward(f, coords)

    def torch_sampling():
        for _ in range(n_samplings):
            tr.grid_sample_nchw(tf, tc)

    tlogits = [torch.tensor(s) for s in logits]

    def targets_with(mod, levels):   # the same calls on either rendering (both name them alike)
        def run():
            for s in levels:
                if relaxed:
                    mod.relaxed_targets(s, cfg.eps_q, cfg.sinkhorn_iters_q, cfg.rho_q)
                else:
                    mod.balanced_targets(s, cfg.eps_q, cfg.sinkhorn_iters_q)
        return run

    ours_targets, torch_targets = targets_with(cluster_mod, logits), targets_with(tr, tlogits)

    pairs = {"head": (ours_head, torch_head), "feature sampling": (ours_sampling, torch_sampling),
             "cluster targets": (ours_targets, torch_targets)}
    fns = {(name, side): fn for name, (o, t) in pairs.items() for side, fn in (("numpy", o), ("torch", t))}
    runs = []
    for n in threads:
        ctx = thread_limit(n) if have_threadpoolctl() else contextlib.nullcontext()
        with ctx:
            times = _interleaved(fns, repeats, warmup)
        runs.append({"threads": n, **{name: {side: statistics.median(times[(name, side)])
                                             for side in ("numpy", "torch")} for name in pairs}})
    return {"runs": runs, "samplings": n_samplings, "C": cfg.in_dim, "repeats": repeats,
            "targets": "relaxed" if relaxed else "balanced"}


# where our step's time goes: functions called straight from the step's own forward / backward
# functions (model, the base, the cluster levels, OMH: _STEP_FILES), by their file under
# omh_ref/core/ (and name); a loss not listed here is a part of its own, named after its module,
# so a new loss shows up in the profile without an edit here
_PARTS = [
    ("head", [("head.py", None), ("ops/dropout.py", None)]),
    ("correlation", [("ops/grid_sample.py", None), ("losses/correlation.py", None)]),
    ("cluster targets", [("losses/cluster.py", "relaxed_targets"), ("losses/cluster.py", "balanced_targets"),
                         ("losses/cluster.py", "hard_targets")]),
    ("cluster levels", [("losses/cluster.py", None), ("ops/cosine.py", None), ("ops/log_softmax.py", None)]),
    ("hierarchy", [("losses/hierarchy.py", None)]),
    ("draws", [("model.py", "draw")]),
]


_STEP_FILES = ("omh_ref/core/model.py", "omh_ref/core/clusters.py", "omh_ref/core/omh.py", "omh_ref/core/bases/")


def _in_step(func) -> bool:
    """One of the step's own forward / backward functions (whose callees are the parts)."""
    file = func[0].replace(os.sep, "/")
    return func[2] in ("forward", "backward") and any(f in file for f in _STEP_FILES)


def _part_of(func):
    file, _, name = func
    file = file.replace(os.sep, "/")
    for part, rules in _PARTS:
        for suffix, fname in rules:
            if file.endswith("omh_ref/core/" + suffix) and (fname is None or fname == name):
                return part
    if "omh_ref/core/losses/" in file:
        return Path(file).stem
    return None


def step_profile(cfg=None, batch_size=16, grid=(28, 28), seed=0, threads=2, torch_top=8, steps=3):
    """Our step split by part, and torch's top ops by self CPU time; both the mean over ``steps``
    profiled steps after one untimed step (a single step varies by ~20 % on a small machine).

    Parts: cumulative time of the calls the step's forward / backward functions (model, base,
    levels, OMH) make into each module
    (head = the projection head and dropout, correlation = grid sampling + STEGO loss, cluster targets =
    the no-gradient target Sinkhorn, cluster levels = cosine logits, log-softmax and cluster
    loss, hierarchy = the OT hierarchy losses, with their Sinkhorn share); 'other' is the rest
    (concatenation, indexing, the draws' host work). cProfile's overhead is small here (a few
    hundred Python calls per step). -> {"total_ms", "forward_ms", "backward_ms", "parts_ms",
    "hierarchy_sinkhorn_ms", "torch_top_ops"}."""
    cfg = paper_config() if cfg is None else cfg
    params, batch, step_seed = make_step_inputs(cfg, batch_size, grid, seed)
    ctx = thread_limit(threads) if have_threadpoolctl() else contextlib.nullcontext()
    with ctx:
        model.loss_and_grads(params, batch, cfg, np.random.default_rng(step_seed))   # warm-up
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            model.loss_and_grads(params, batch, cfg, np.random.default_rng(step_seed))
        prof.disable()
        torch_ops = _torch_profile(cfg, params, batch, step_seed, torch_top, steps) if torch_top else None
    stats = pstats.Stats(prof).stats
    top = {}
    for func, (_, _, _, ct, callers) in stats.items():
        if func[2] in ("forward", "backward", "loss_and_grads") and func[0].endswith("model.py"):
            top[func[2]] = ct
    parts = {name: 0.0 for name, _ in _PARTS}
    sink = 0.0
    for func, (_, _, _, _, callers) in stats.items():
        for caller, edge in callers.items():
            if _in_step(caller) and not _in_step(func):
                part = _part_of(func)
                if part is not None:
                    parts[part] = parts.get(part, 0.0) + edge[3]
            if caller[0].endswith("losses/hierarchy.py") and func[0].endswith("ops/sinkhorn.py"):
                sink += edge[3]
    total = top["loss_and_grads"]
    parts["other"] = max(total - sum(parts.values()), 0.0)
    ms = 1e3 / steps
    return {"total_ms": ms * total, "forward_ms": ms * top["forward"], "backward_ms": ms * top["backward"],
            "parts_ms": {k: ms * v for k, v in parts.items()}, "hierarchy_sinkhorn_ms": ms * sink,
            "threads": threads, "steps": steps, "torch_top_ops": torch_ops}


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 sent to /dev/null (torch's profiler logs from C++ on start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _torch_profile(cfg, params, batch, step_seed, top, steps=1):
    torch = _torch()
    tr = torch_reference()
    B, _, _, C = batch["feats"].shape
    draws = model.draw(cfg, B, C, np.random.default_rng(step_seed))
    with reference_dtype(tr, torch.float32), _quiet_stderr():
        tparams, tbatch = _torch_inputs(params, batch, torch.float32, "cpu")
        _torch_step(tr, cfg, tparams, tbatch, draws)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                _torch_step(tr, cfg, tparams, tbatch, draws)
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev)
    return {"total_self_ms": total / 1e3 / steps,
            "ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / steps, "calls": e.count / steps}
                    for e in ev[:top]]}


# ---------------------------------------------------------------- kernels per step

def _torch_kernels(events):
    """Kernel-like ops among torch profiler events: an aten op counts once unless it calls other
    counted ops (then those count: ``aten::linear`` is its ``addmm``); views, allocations and host
    reads count nothing; a ``_foreach_`` op counts once (one multi-tensor launch on CUDA for a few
    tensors). -> Counter {op: n}."""
    import collections

    torch = _torch()
    silent = {}

    def quiet(name):
        if name not in silent:
            op = getattr(torch.ops.aten, name.split("::", 1)[1], None)
            view = op is not None and any(getattr(op, o).is_view for o in op.overloads())
            silent[name] = view or name in _TORCH_NO_KERNEL
        return silent[name]

    def count(e):
        if e.name.startswith("aten::_foreach_"):
            return collections.Counter({e.name: 1})
        below = collections.Counter()
        for c in e.cpu_children:
            if c.name.startswith("aten::"):
                below += count(c)
        if below:
            return below
        return collections.Counter() if quiet(e.name) else collections.Counter({e.name: 1})

    total = collections.Counter()
    for e in events:
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
            total += count(e)
    return total


# allocations and host reads: no kernel
_TORCH_NO_KERNEL = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                    "aten::new_empty_strided", "aten::resize_", "aten::as_strided_", "aten::detach_",
                    "aten::lift_fresh", "aten::_local_scalar_dense", "aten::item", "aten::set_"}


def kernel_count(cfg=None, batch_size=16, grid=(28, 28), seed=0):
    """Kernels one training step launches, ours against torch's, counted rather than timed (on a
    GPU at these sizes a step's time is mostly its launches).

    Ours: the training loop's own step (``loop._Run.take_step``: loss and gradients, the
    divergence watch, guarded Adam) on the strict CuPy stand-in, which counts each operation
    CuPy would launch a kernel for (:mod:`omh_ref.core.strict_device`). Torch's: the independent
    rendering's forward and autograd backward, then ``torch.optim.Adam(foreach=True)`` (CUDA's
    default), under ``torch.profiler`` on the CPU, counted by :func:`_torch_kernels`. The step's
    draws and the batch's copy to the device are left out of both. Goal: ours <= torch's.
    -> {"ours": {"loss_and_grads", "optimiser", "total", "top"}, "torch": {...}, "ratio"}."""
    import types

    from omh_ref.core import backend, bases
    from omh_ref.core import strict_device as sd
    from omh_ref.core.optim import adam_init
    from omh_ref.train import loop

    torch = _torch()
    cfg = paper_config() if cfg is None else cfg
    params, batch, step_seed = make_step_inputs(cfg, batch_size, grid, seed)
    B, _, _, C = batch["feats"].shape
    draws = model.draw(cfg, B, C, np.random.default_rng(step_seed))
    lr = {k: 5e-3 if k.startswith("M") else 5e-4 for k in params}
    with backend.strict_device() as xp:
        dparams, dbatch = to_device(params, "gpu"), to_device(batch, "gpu")
        sd.reset_ops()
        model.loss_and_grads(dparams, dbatch, cfg, None, draws=draws)
        grads_ops = sd.ops()
        run = types.SimpleNamespace(xp=xp, params=dparams, cfg=cfg, rng=None, opt_state=adam_init(dparams), lr=lr,
                                    ok=xp.asarray(True), bad_at=xp.asarray(-1), bad_why=xp.asarray(0), step=0,
                                    buffers=bool(bases.get(cfg.base).TEACHER))
        sd.reset_ops()
        loop._Run.take_step(run, dbatch, draws)
        step_ops = sd.ops()
    ours_total = sd.kernels(step_ops)
    ours = {"loss_and_grads": sd.kernels(grads_ops), "total": ours_total,
            "optimiser": ours_total - sd.kernels(grads_ops),
            "top": sorted(((k, n) for k, n in step_ops.items() if k != "host->device"), key=lambda kv: -kv[1])[:8]}
    tr = torch_reference()
    with reference_dtype(tr, torch.float32), _quiet_stderr():
        tparams, tbatch = _torch_inputs(params, batch, torch.float32, "cpu")
        groups = {}                                         # one group per rate: the head's, the centroids'
        for k, p in tparams.items():
            groups.setdefault(lr[k], []).append(p)
        opt = torch.optim.Adam([{"params": ps, "lr": rate} for rate, ps in groups.items()], foreach=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _, _, tgrads = _torch_step(tr, cfg, tparams, tbatch, draws)
        grads_k = _torch_kernels(prof.events())
        for p, g in zip(tparams.values(), tgrads):
            p.grad = g
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            opt.step()
        opt_k = _torch_kernels(prof.events())
    theirs = {"loss_and_grads": sum(grads_k.values()), "optimiser": sum(opt_k.values()),
              "total": sum(grads_k.values()) + sum(opt_k.values()),
              "top": (grads_k + opt_k).most_common(8)}
    return {"ours": ours, "torch": theirs, "ratio": ours["total"] / theirs["total"], "goal": GOALS["kernels"],
            "shape": {"batch": batch_size, "grid": list(grid), "levels": list(cfg.levels)}}


# ---------------------------------------------------------------- Sinkhorn against POT

def hierarchy_problem(Kc, Kp, D=70, seed=0, dtype=np.float32):
    """A hierarchy Sinkhorn problem as the model builds it: cost 1 − cos(M_c, M_p) of N(0, 1)
    centroids, usage-like random marginals (positive, summing to 1)."""
    rng = np.random.default_rng(seed)
    Mc, Mp = rng.standard_normal((Kc, D)), rng.standard_normal((Kp, D))
    Mc /= np.linalg.norm(Mc, axis=1, keepdims=True)
    Mp /= np.linalg.norm(Mp, axis=1, keepdims=True)
    a, b = rng.random(Kc) + 0.2, rng.random(Kp) + 0.2
    return (1 - Mc @ Mp.T).astype(dtype), (a / a.sum()).astype(dtype), (b / b.sum()).astype(dtype)


def targets_problem(P, K, D=70, seed=0, dtype=np.float32):
    """The balanced-target problem: cost 1 − s for cosine logits s of random codes against
    random centroids, uniform marginals 1/P and 1/K."""
    rng = np.random.default_rng(seed)
    z, M = rng.standard_normal((P, D)), rng.standard_normal((K, D))
    s = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ (M / np.linalg.norm(M, axis=1, keepdims=True)).T
    return (1 - s).astype(dtype), np.full(P, 1 / P, dtype=dtype), np.full(K, 1 / K, dtype=dtype)


def _pot_sinkhorn(a, b, M, eps, n_iters):
    import ot

    return ot.sinkhorn(a, b, M, eps, method="sinkhorn_log", numItermax=n_iters, stopThr=0, warn=False)


def sinkhorn_case(cost, a, b, eps, n_iters, backward=True, repeats=20, warmup=2, seed=0, extra_peers=False,
                  solver=None):
    """Ours against POT's log-domain Sinkhorn on torch tensors (autograd backward when
    ``backward``) on one problem.

    POT updates the column potential first and ours the row potential, so POT is given the
    transposed problem (Mᵀ, b, a) as a transposed *view* of the same row-major cost: both run the
    identical iteration sequence on the same memory layout, and the plans agree to rounding. The
    backward pulls a random upstream gradient G through the plan into the cost and both
    marginals. Raises :class:`Mismatch` when plans or gradients disagree. ``extra_peers`` (forward
    only) also times POT on NumPy arrays and POT/torch on a contiguous copy of Mᵀ (for
    information: the layout alone moves POT's time by ~20 % on the targets problem). ``solver()``
    (forward only) replaces ``omh_ref.core.ops.sinkhorn.forward`` as ours: it returns the plan.
    -> {"ours", "pot_torch", ["pot_numpy", "pot_torch_contiguous"]: timings,
    "speedup": torch / ours, errors}."""
    torch = _torch()
    n, m = cost.shape
    G = np.random.default_rng(seed).standard_normal((n, m)).astype(cost.dtype)
    dtype = getattr(torch, cost.dtype.name)
    tM = torch.tensor(cost, dtype=dtype).T                            # m,n view of the n,m cost
    ta, tb = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)
    tG = torch.tensor(G, dtype=dtype).T

    def ours():
        if solver is not None:
            return (solver(),)
        plan, cache = sinkhorn.forward(cost, a, b, eps, n_iters)
        return (plan, *sinkhorn.backward(G, cache)) if backward else (plan,)

    def pot():
        if not backward:
            with torch.no_grad():
                return (_pot_sinkhorn(tb, ta, tM, eps, n_iters),)
        M_, a_, b_ = (t.detach().requires_grad_(True) for t in (tM, ta, tb))
        plan = _pot_sinkhorn(b_, a_, M_, eps, n_iters)
        return (plan, *torch.autograd.grad((plan * tG).sum(), [M_, a_, b_]))

    got, want = ours(), pot()
    errs = {"plan": rel_err(got[0], want[0].detach().numpy().T)}
    if backward:
        errs |= {"dcost": rel_err(got[1], want[1].numpy().T), "da": rel_err(got[2], want[2].numpy()),
                 "db": rel_err(got[3], want[3].numpy())}
    for k, e in errs.items():
        tol = PLAN_RTOL if k == "plan" else SINKHORN_GRAD_RTOL
        if e > tol:
            raise Mismatch(f"sinkhorn {n}x{m} eps {eps}: {k} relative error {e:.2e} > {tol:.0e} against POT")
    fns = {"ours": ours, "pot_torch": pot}
    if extra_peers and not backward:
        tMc = tM.contiguous()
        fns["pot_numpy"] = lambda: _pot_sinkhorn(b, a, cost.T, eps, n_iters)

        def pot_contiguous():
            with torch.no_grad():
                return _pot_sinkhorn(tb, ta, tMc, eps, n_iters)

        fns["pot_torch_contiguous"] = pot_contiguous
    times = _interleaved(fns, repeats, warmup)
    out = {"n": n, "m": m, "eps": eps, "n_iters": n_iters, "backward": backward, "dtype": cost.dtype.name,
           "rel_err": errs, **{k: _summary(v) for k, v in times.items()}}
    out["speedup"] = out["pot_torch"]["median_s"] / out["ours"]["median_s"]
    for k in ("pot_numpy", "pot_torch_contiguous"):
        if k in out:
            out[f"speedup_vs_{k}"] = out[k]["median_s"] / out["ours"]["median_s"]
    return out


def sinkhorn_benchmark(hier=((108, 54), (54, 27)), eps=(0.2, 0.05), n_iters=50, targets=(12544, 108),
                       eps_q=0.05, n_iters_q=20, threads=(1, 2), repeats=20, warmup=2, seed=0):
    """The hierarchy's Sinkhorn problems (forward + backward) and the balanced cluster targets
    (forward only; ours is ``cluster.balanced_targets``, what the model calls with
    ``cluster_target = "balanced"``),
    ours against POT/torch at each thread count. -> {"cases": [...]}."""
    from omh_ref.core.losses import cluster as cluster_mod

    cases = []
    for n in threads:
        ctx = thread_limit(n) if have_threadpoolctl() else contextlib.nullcontext()
        with ctx:
            for Kc, Kp in hier:
                C, a, b = hierarchy_problem(Kc, Kp, seed=seed)
                for e in eps:
                    r = sinkhorn_case(C, a, b, e, n_iters, True, repeats, warmup, seed)
                    cases.append({"problem": "hierarchy", "threads": n, **r})
            if targets:
                C, a, b = targets_problem(*targets, seed=seed)
                S = 1 - C   # the model's call: Q = cluster.balanced_targets(s) = P * plan

                def targets_plan(S=S, P=len(a)):
                    return cluster_mod.balanced_targets(S, eps_q, n_iters_q)[0] / S.dtype.type(P)

                r = sinkhorn_case(C, a, b, eps_q, n_iters_q, False, max(repeats // 4, 1), min(warmup, 1), seed,
                                  extra_peers=True, solver=targets_plan)
                cases.append({"problem": "targets", "threads": n, **r})
    return {"cases": cases, "goal": GOALS["sinkhorn"]}


# ---------------------------------------------------------------- evaluation, scaling, GPU

def eval_benchmark(pixels=2e8, batch=2e6, repeats=3):
    """:mod:`benchmarks.bench_confusion`'s main (its printout swallowed); -> its result dict."""
    from . import bench_confusion

    with contextlib.redirect_stdout(io.StringIO()):
        res = bench_confusion.main(["--pixels", str(pixels), "--batch", str(min(batch, pixels)),
                                    "--repeats", str(repeats)])
    res["goal"] = GOALS["eval"]
    return res


def scaling_benchmark(cfg=None, batch_sizes=(4, 8, 16), levels=((108,), (108, 54), (108, 54, 27)), grid=(28, 28),
                      repeats=5, warmup=1, seed=0, threads=2):
    """Our step time against batch size (default levels) and against the number of levels
    (at the largest batch size); all settings timed interleaved, round by round, so that a
    burst of load elsewhere on the machine hits them alike. -> {"batch": [...], "levels": [...]}."""
    cfg = paper_config() if cfg is None else cfg
    base = json.loads(cfg.to_json())
    settings = {}   # (B, levels) -> step function; the default levels at the largest batch appear once
    for B, lv in [(B, cfg.levels) for B in batch_sizes] + [(max(batch_sizes), tuple(v)) for v in levels]:
        if (B, lv) in settings:
            continue
        c = model.Config.from_dict({**base, "levels": lv})
        params, batch, step_seed = make_step_inputs(c, B, grid, seed)

        def step(params=params, batch=batch, c=c, step_seed=step_seed):
            model.loss_and_grads(params, batch, c, np.random.default_rng(step_seed))

        settings[(B, lv)] = step
    ctx = thread_limit(threads) if have_threadpoolctl() else contextlib.nullcontext()
    with ctx:
        times = _interleaved(settings, repeats, warmup)

    def row(B, lv):
        med = statistics.median(times[(B, lv)])
        return {"batch": B, "levels": list(lv), "median_s": med, "ms_per_image": 1e3 * med / B}

    return {"batch": [row(B, cfg.levels) for B in batch_sizes],
            "levels": [row(max(batch_sizes), tuple(v)) for v in levels], "threads": threads, "repeats": repeats}


def gpu_benchmark(cfg=None, batch_size=16, grid=(28, 28), repeats=10, warmup=2, seed=0):
    """The step with CuPy against torch CUDA autograd, float32, agreement checked first.
    -> {"available": False, "reason"} where CuPy or torch lacks a CUDA device."""
    if not gpu_available():
        return {"available": False, "reason": "no GPU (CuPy with a CUDA device is not available)"}
    torch = _torch()
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no GPU for torch (a CPU-only torch build)"}
    cfg = paper_config() if cfg is None else cfg
    cp = xp_for("gpu")
    params, batch, step_seed = make_step_inputs(cfg, batch_size, grid, seed)
    check = check_step_agreement(params, batch, cfg, step_seed, device="gpu")
    gparams, gbatch = to_device(params, "gpu"), to_device(batch, "gpu")
    tr = torch_reference()
    B, _, _, C = batch["feats"].shape
    draws = model.draw(cfg, B, C, np.random.default_rng(step_seed))

    def sync():
        cp.cuda.Device().synchronize()
        torch.cuda.synchronize()

    with reference_dtype(tr, torch.float32, device="cuda"):
        tparams, tbatch = _torch_inputs(params, batch, torch.float32, "cuda")
        times = _interleaved({
            "cupy": lambda: model.loss_and_grads(gparams, gbatch, cfg, np.random.default_rng(step_seed)),
            "torch_cuda": lambda: _torch_step(tr, cfg, tparams, tbatch, draws)}, repeats, warmup, sync)
    out = {"available": True, "device": torch.cuda.get_device_name(), "check": check,
           **{k: _summary(v) for k, v in times.items()}}
    out["ratio"] = out["cupy"]["median_s"] / out["torch_cuda"]["median_s"]
    return out


def gpu_sinkhorn_benchmark(hier=((108, 54), (54, 27)), eps=(0.2, 0.05), n_iters=50, repeats=20, warmup=2, seed=0):
    """The hierarchy's Sinkhorn problems (forward + backward) on CuPy against POT's
    ``sinkhorn_log`` on torch CUDA tensors with autograd, float32, plans and gradients checked
    to agree first. -> {"available": False, "reason"} without a GPU or POT."""
    if not gpu_available():
        return {"available": False, "reason": "no GPU (CuPy with a CUDA device is not available)"}
    torch = _torch()
    if not torch.cuda.is_available():
        return {"available": False, "reason": "no GPU for torch (a CPU-only torch build)"}
    if importlib.util.find_spec("ot") is None:
        return {"available": False, "reason": "POT is not installed"}
    cp = xp_for("gpu")
    cases = []
    for Kc, Kp in hier:
        C, a, b = hierarchy_problem(Kc, Kp, seed=seed)
        G = np.random.default_rng(seed + 1).standard_normal(C.shape).astype(C.dtype)
        gC, ga, gb, gG = (cp.asarray(x) for x in (C, a, b, G))
        tM, ta, tb = (torch.tensor(x, device="cuda") for x in (C.T.copy(), a, b))
        tG = torch.tensor(G.T.copy(), device="cuda")
        for e in eps:
            def ours(e=e):
                plan, cache = sinkhorn.forward(gC, ga, gb, e, n_iters)
                return (plan, *sinkhorn.backward(gG, cache))

            def pot(e=e):
                M_, a_, b_ = (t.detach().requires_grad_(True) for t in (tM, ta, tb))
                plan = _pot_sinkhorn(b_, a_, M_, e, n_iters)
                return (plan, *torch.autograd.grad((plan * tG).sum(), [M_, a_, b_]))

            got, want = [to_host(x) for x in ours()], [t.detach().cpu().numpy() for t in pot()]
            errs = {"plan": rel_err(got[0], want[0].T), "dcost": rel_err(got[1], want[1].T),
                    "da": rel_err(got[2], want[2]), "db": rel_err(got[3], want[3])}
            for k, err in errs.items():
                if err > (PLAN_RTOL if k == "plan" else SINKHORN_GRAD_RTOL):
                    raise Mismatch(f"GPU sinkhorn {Kc}x{Kp} eps {e}: {k} relative error {err:.2e}")

            def sync():
                cp.cuda.Device().synchronize()
                torch.cuda.synchronize()

            times = _interleaved({"ours": ours, "pot_torch_cuda": pot}, repeats, warmup, sync)
            row = {"n": Kc, "m": Kp, "eps": e, "rel_err": errs, **{k: _summary(v) for k, v in times.items()}}
            row["speedup"] = row["pot_torch_cuda"]["median_s"] / row["ours"]["median_s"]
            cases.append(row)
    return {"available": True, "device": torch.cuda.get_device_name(), "cases": cases, "goal": GOALS["sinkhorn"]}


def training_check(out, steps=200, devices=("cpu", "gpu"), log_every=50):
    """The same short training run on the demo data on each device, validated at its end:
    -> {device: {"loss", "val_miou", "seconds"}}; raises Mismatch when the devices' final losses
    differ by more than float32 rounding can explain over ``steps`` steps (1 %)."""
    from omh_ref.core.config import Config
    from omh_ref.jobs.demo import prepare_data
    from omh_ref.evaluate.pictures import read_log
    from omh_ref.evaluate.validation import Validator
    from omh_ref.train.loop import TrainOptions, train

    data = prepare_data(Path(out) / "data", say=lambda *a: None)
    rows = {}
    for device in devices:
        t = time.perf_counter()
        val = Validator(str(data["val"] / "feats.npy"), device=device)
        cfg = Config(in_dim=384, levels=(36, 18, 9))
        res = train(cfg, TrainOptions(features=str(data["train"] / "feats.npy"), out=str(Path(out) / f"run_{device}"),
                                      steps=steps, log_every=log_every, val_every=steps, device=device, progress=False,
                                      overwrite=True), say=lambda *a: None, validate=val)
        last = read_log(res["log"])[-1]
        rows[device] = {"loss": last["loss"], "val_miou": last["val_miou"], "seconds": time.perf_counter() - t}
    losses = [r["loss"] for r in rows.values()]
    if max(losses) - min(losses) > 1e-2 * max(abs(x) for x in losses):
        raise Mismatch(f"final losses after {steps} steps differ between devices: {rows}")
    return rows


# ---------------------------------------------------------------- everything

def run_all(quick=False, settings=None, say=None):
    """Every benchmark above with the 'quick' or 'full' preset (``settings`` overrides keys:
    repeats, warmup, sinkhorn_repeats, eval_pixels, eval_repeats, scaling_repeats, and for tiny
    test runs cfg, batch_size, grid, threads, hier, targets, batch_sizes, levels).
    ``say`` (a print function) is told each section as it starts. -> one dict."""
    s = {**PRESETS["quick" if quick else "full"], **(settings or {})}
    say = say or (lambda msg: None)
    cfg = s.get("cfg") or paper_config()
    B, grid, threads = s.get("batch_size", 16), tuple(s.get("grid", (28, 28))), tuple(s.get("threads", (1, 2)))
    out = {"preset": "quick" if quick else "full", "versions": versions(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    load = out["loadavg"] = {"start": os.getloadavg()}   # 1-min load: a busy machine shows here
    say("training step: numpy vs torch autograd (checking agreement first) ...")
    out["step"] = step_benchmark(cfg, B, grid, threads, s["repeats"], s["warmup"])
    load["step"] = os.getloadavg()
    say("profile of our step ...")
    out["profile"] = step_profile(cfg, B, grid, threads=max(threads))
    say("kernels per training step: ours on the strict CuPy stand-in vs torch's profiler ...")
    out["kernels"] = {"OMH": kernel_count(cfg, B, grid),
                      "base alone": kernel_count(dataclasses.replace(cfg, omh=False), B, grid)}
    say("the step against its own matrix multiplies (the floor) ...")
    out["floor"] = gemm_floor(cfg, B, grid, threads, max(s["scaling_repeats"], 1), min(s["warmup"], 1))
    load["floor"] = os.getloadavg()
    say("the step's largest parts alone, ours vs torch ...")
    out["components"] = component_benchmark(cfg, B, grid, threads, max(s["scaling_repeats"], 1), min(s["warmup"], 1))
    load["components"] = os.getloadavg()
    say("sinkhorn: ours vs POT (torch autograd) ...")
    out["sinkhorn"] = sinkhorn_benchmark(hier=s.get("hier", ((108, 54), (54, 27))),
                                         targets=s.get("targets", (B * grid[0] * grid[1], 108)),
                                         threads=threads, repeats=s["sinkhorn_repeats"], warmup=s["warmup"])
    load["sinkhorn"] = os.getloadavg()
    say("evaluation: confusion accumulation ...")
    out["eval"] = eval_benchmark(s["eval_pixels"], repeats=s["eval_repeats"])
    load["eval"] = os.getloadavg()
    say("scaling of our step ...")
    out["scaling"] = scaling_benchmark(cfg, s.get("batch_sizes", (4, 8, 16)),
                                       s.get("levels", ((108,), (108, 54), (108, 54, 27))), grid,
                                       s["scaling_repeats"], 1, threads=max(threads))
    load["scaling"] = os.getloadavg()
    say("GPU ...")
    out["gpu"] = gpu_benchmark(cfg, B, grid, s["repeats"], s["warmup"])
    out["gpu_sinkhorn"] = gpu_sinkhorn_benchmark(hier=s.get("hier", ((108, 54), (54, 27))),
                                                 repeats=s["sinkhorn_repeats"], warmup=s["warmup"])
    out["elapsed_s"] = time.perf_counter() - t0
    return out


def _goal_text(goal, ratio):
    name, op, target = goal
    met = ratio <= target if op == "<=" else ratio >= target
    return f"{name} = {ratio:.2f}   goal {op} {target}   {'met' if met else 'MISSED'}"


def format_report(res) -> str:
    """The printed table of a :func:`run_all` result."""
    v = res["versions"]
    lines = [(f"omh-ref benchmarks ({res['preset']}): numpy {v['numpy']}, torch {v.get('torch')}, POT {v.get('ot')}, "
             f"{v['cpus']} CPUs ({v['processor']})")]
    st = res["step"]
    sh = st["shape"]
    lines += ["", (f"Training step, batch {sh['batch']}, grid {sh['grid'][0]}x{sh['grid'][1]}, C={sh['C']}, "
              f"D={sh['D']}, levels {'/'.join(map(str, sh['levels']))}, S={sh['S']}, float32 "
              f"(median of {st['repeats']})"),
              (f"  agreement: loss rel err {st['check']['loss_rel_err']:.1e}, "
              f"max grad rel err {max(st['check']['grad_rel_err'].values()):.1e} "
              f"(tolerances {LOSS_RTOL:.0e} / {GRAD_RTOL:.0e})")]
    for r in st["runs"]:
        lines.append(f"  {r['threads']} thread(s): numpy {1e3 * r['numpy']['median_s']:8.1f} ms   "
                     f"torch {1e3 * r['torch']['median_s']:8.1f} ms   {_goal_text(st['goal'], r['ratio'])}")
    first = next(iter(res["kernels"].values()))
    lines += ["", (f"Kernels per training step (batch {first['shape']['batch']}; ours counted on the strict CuPy "
                   f"stand-in, torch's from its profiler, Adam with foreach)")]
    for name, kc in res["kernels"].items():
        lines += [f"  {name} (levels {'/'.join(map(str, kc['shape']['levels']))}): "
                  + "   ".join(f"{part} ours {kc['ours'][part]} / torch {kc['torch'][part]}"
                             for part in ("loss_and_grads", "optimiser"))
                  + f"   step ours {kc['ours']['total']} / torch {kc['torch']['total']}   {_goal_text(kc['goal'], kc['ratio'])}",
                  "    ours most: " + ", ".join(f"{k} {n}" for k, n in kc["ours"]["top"][:6]) + ";  torch's most: "
                  + ", ".join(f"{k.removeprefix('aten::')} {n}" for k, n in kc["torch"]["top"][:6])]
    fl = res["floor"]
    lines += ["", (f"The step against its GEMM floor (head + cluster levels as bare matmuls, {fl['gflop']:.1f} "
                   f"GFLOP, median of {fl['repeats']})")]
    for r in fl["runs"]:
        lines.append(f"  {r['threads']} thread(s): floor {1e3 * r['floor_s']:7.1f} ms ({r['floor_gflops']:.0f} "
                     f"GFLOP/s), step {1e3 * r['step_s']:7.1f} ms   {_goal_text(fl['goal'], r['ratio'])}")
    pr = res["profile"]
    lines += ["", (f"Our step by part ({pr['threads']} thread(s), mean of {pr['steps']} profiled steps, "
                   f"{pr['total_ms']:.0f} ms: "
              f"forward {pr['forward_ms']:.0f}, backward {pr['backward_ms']:.0f})")]
    for k, ms in sorted(pr["parts_ms"].items(), key=lambda kv: -kv[1]):
        extra = f"   (Sinkhorn {pr['hierarchy_sinkhorn_ms']:.0f} ms of it)" if k == "hierarchy" else ""
        lines.append(f"  {k:<16} {ms:8.1f} ms  {100 * ms / pr['total_ms']:5.1f} %{extra}")
    if pr.get("torch_top_ops"):
        ops = ", ".join(f"{o['op']} {o['self_ms']:.1f}" for o in pr["torch_top_ops"]["ops"][:6])
        lines.append(f"  torch's top ops (self ms of {pr['torch_top_ops']['total_self_ms']:.0f}): {ops}")
    co = res["components"]
    lines += ["", (f"The largest parts alone, ours vs torch (median of {co['repeats']}; feature sampling = "
              f"{co['samplings']} samplings of C={co['C']}, targets {co['targets']})")]
    for r in co["runs"]:
        lines.append(f"  {r['threads']} thread(s): " + "   ".join(
            f"{k} {1e3 * r[k]['numpy']:.0f} / {1e3 * r[k]['torch']:.0f} ms"
            for k in ("head", "feature sampling", "cluster targets")))
    lines += ["", "Sinkhorn, ours vs POT sinkhorn_log on torch tensors (autograd backward), float32"]
    for c in res["sinkhorn"]["cases"]:
        what = "fwd+bwd" if c["backward"] else "fwd"
        extra = (f"   (POT numpy {1e3 * c['pot_numpy']['median_s']:.1f} ms, {c['speedup_vs_pot_numpy']:.2f}x; "
                 f"POT torch on contiguous Mᵀ {1e3 * c['pot_torch_contiguous']['median_s']:.1f} ms, "
                 f"{c['speedup_vs_pot_torch_contiguous']:.2f}x)" if "pot_numpy" in c else "")
        lines.append(f"  {c['problem']:<9} {c['n']}x{c['m']} eps {c['eps']:<4} {c['n_iters']} it {what:<7} "
                     f"{c['threads']} thr: ours {1e3 * c['ours']['median_s']:7.2f} ms  "
                     f"POT {1e3 * c['pot_torch']['median_s']:7.2f} ms  "
                     f"{_goal_text(res['sinkhorn']['goal'], c['speedup'])}{extra}")
    ev = res["eval"]
    lines += ["", (f"Evaluation (confusion, {ev['pixels']:.1e} pixels): ours {ev['ours_pix_per_s'] / 1e6:.0f} "
              f"Mpixel/s, bare bincount {ev['bare_pix_per_s'] / 1e6:.0f}   "
              f"{_goal_text(ev['goal'], ev['ratio_ours_over_bare'])}")]
    sc = res["scaling"]
    lines += ["", f"Scaling of our step ({sc['threads']} thread(s), median of {sc['repeats']})"]
    for r in sc["batch"] + sc["levels"]:
        lines.append(f"  batch {r['batch']:>3}  levels {'/'.join(map(str, r['levels'])):<10} "
                     f"{1e3 * r['median_s']:8.1f} ms   {r['ms_per_image']:6.1f} ms/image")
    g = res["gpu"]
    lines += ["", "GPU: " + (g["reason"] if not g["available"] else
                             f"{g['device']}: cupy {1e3 * g['cupy']['median_s']:.1f} ms, torch CUDA "
                             f"{1e3 * g['torch_cuda']['median_s']:.1f} ms, cupy / torch = {g['ratio']:.2f}")]
    gs = res.get("gpu_sinkhorn", {"available": False, "reason": "not run"})
    lines.append("GPU Sinkhorn vs POT on CUDA: " + (gs["reason"] if not gs["available"] else "   ".join(
        f"{c['n']}x{c['m']} eps {c['eps']}: {_goal_text(gs['goal'], c['speedup'])}" for c in gs["cases"])))
    lines.append(f"\n({res['elapsed_s']:.0f} s; 1-min load average at start and after each section: "
                 + ", ".join(f"{k} {v[0]:.2f}" for k, v in res["loadavg"].items()) + ")")
    return "\n".join(lines)
