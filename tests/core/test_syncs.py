"""Host synchronisations of a training step, counted on the strict CuPy stand-in (so the test runs
without a GPU): a step reads nothing back from the device; the loop reads once per logged step
(the loss parts and the divergence flags, one transfer), and nowhere else but its checkpoint
writes."""
import numpy as np
import pytest

from omh_ref.core import backend, fixtures, model
from omh_ref.core import strict_device as sd
from omh_ref.core.optim import adam_init, adam_step


CONFIGS = [{}, {"cluster_target": "balanced", "marginals": "uniform"},
           {"cluster_target": "hard", "sinkhorn_backward": "implicit"},
           {"omh": False}, {"eps": 0.02, "marginals": "uniform"}]


@pytest.fixture
def device():
    """The strict CuPy stand-in as the GPU, its conversion record empty."""
    with backend.strict_device() as xp:
        sd.reset_conversions()
        yield xp


def _step(over, xp):
    """One training step on the stand-in as the loop takes it (draws made on the host first, the
    divergence flag carried on the device). -> (loss, grads, ok, to_host calls during it)."""
    cfg = fixtures.small_config(**over)
    rng = np.random.default_rng(0)
    params = backend.to_device(model.init_params(cfg, rng, dtype=np.float32), "gpu")
    batch = backend.to_device(fixtures.random_batch(cfg, rng, dtype=np.float32), "gpu")
    state = adam_init(params)
    draws = model.draw(cfg, 3, cfg.in_dim, rng)
    syncs = backend.host_syncs()
    loss, parts, grads = model.loss_and_grads(params, batch, cfg, rng, draws=draws)
    ok = adam_step(params, grads, state, 1e-3, ok=xp.asarray(True) & xp.isfinite(loss))
    return loss, grads, ok, backend.host_syncs() - syncs


@pytest.mark.parametrize("over", CONFIGS)
def test_a_training_step_converts_nothing_to_the_host(over, device):
    loss, grads, ok, syncs = _step(over, device)
    assert all(type(a) is sd.StrictArray for a in (loss, grads["W2"], ok))   # on the device all along
    assert sd.conversions() == [] and syncs == 0


def _planted_sites():
    """(module, function, config overrides that make the step call it): every loss and every op
    a training step calls, forward and backward."""
    from omh_ref.core.losses import cluster, correlation, hierarchy
    from omh_ref.core.ops import cosine, dropout, grid_sample, kl, log_softmax, normalize, sinkhorn
    from omh_ref.core import head

    sites = [(m, f, {}) for m in (correlation, cluster, hierarchy, cosine, grid_sample, kl, log_softmax,
                                  normalize, sinkhorn, head) for f in ("forward", "backward")]
    sites += [(dropout, "forward", {"dropout": 0.2}),      # no backward: the features are frozen
              (cluster, "relaxed_targets", {}), (cluster, "balanced_targets", {"cluster_target": "balanced"})]
    return sites


def _first_array(x):
    """The first array in x, looking into tuples, lists and dicts (a backward's cache)."""
    if isinstance(x, sd.StrictArray):
        return x if x.size else None
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (tuple, list)) else ()
    for v in items:
        a = _first_array(v)
        if a is not None:
            return a
    return None


@pytest.mark.parametrize("module,name,over", _planted_sites(),
                         ids=lambda v: v.__name__.rsplit(".", 1)[-1] if hasattr(v, "__name__") else
                         ("-" + "-".join(v) if isinstance(v, dict) else str(v)))
def test_a_host_read_planted_in_a_loss_or_op_is_seen(module, name, over, device, monkeypatch):
    """The check can fail where it matters: a float() of the first array a loss or an op receives
    (a forward's input; a backward's cache, as its incoming gradient may be a constant the caller
    made) is counted, because device arrays reach them all."""
    real = getattr(module, name)
    planted = []

    def reads_the_host(*args, **kw):
        a = _first_array(args[1:] if name == "backward" else args)
        if a is not None:
            planted.append(type(a).__name__)
            float(a.sum())
        return real(*args, **kw)

    monkeypatch.setattr(module, name, reads_the_host)
    _step(over, device)
    assert planted, f"{module.__name__}.{name} was not called with an array"
    assert [w for w, _ in sd.conversions()].count("float") == len(planted), planted


def test_the_loop_reads_once_per_logged_step(tmp_path, monkeypatch):
    from omh_ref.train import checkpoint, loop

    feats = tmp_path / "feats.npy"
    np.save(feats, np.random.default_rng(0).standard_normal((16, 4, 5, 7)).astype(np.float32))
    in_saves = []
    real_save = checkpoint.save

    def counted_save(*a, **k):
        before = backend.host_syncs()
        real_save(*a, **k)
        in_saves.append(backend.host_syncs() - before)

    monkeypatch.setattr(checkpoint, "save", counted_save)
    cfg = fixtures.small_config()
    opts = loop.TrainOptions(features=str(feats), out=str(tmp_path / "r"), steps=30, batch_size=4, log_every=10,
                             ckpt_every=15, progress=False)
    loop.train(cfg, opts, say=lambda *a: None)          # builds the KNN table first
    opts = loop.TrainOptions(**{**opts.__dict__, "out": str(tmp_path / "s")})
    in_saves.clear()
    before = backend.host_syncs()
    loop.train(cfg, opts, say=lambda *a: None)
    total = backend.host_syncs() - before - sum(in_saves)
    # reads at the logged steps 10, 20, 30 and the checkpoint-only step 15: four, over 30 steps
    assert len(in_saves) == 2 and total == 4
