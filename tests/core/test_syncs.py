"""Host synchronisations of a training step, counted on NumPy arrays (so the test runs without a
GPU): a step reads nothing back from the device; the loop reads once per logged step (the loss
parts and the divergence flags, one transfer), and nowhere else but its checkpoint writes."""
import numpy as np
import pytest

from omh_ref.core import backend, fixtures, model
from omh_ref.core.optim import adam_init, adam_step


class Watched(np.ndarray):
    """An ndarray that counts every conversion to a host scalar (float(), bool(), int(), .item(),
    .tolist()): on CuPy each of these waits for the device."""

    conversions = []

    def _note(self, what):
        Watched.conversions.append(what)

    def __float__(self):
        self._note("float")
        return float(self.view(np.ndarray))

    def __bool__(self):
        self._note("bool")
        return bool(self.view(np.ndarray))

    def __int__(self):
        self._note("int")
        return int(self.view(np.ndarray))

    def __index__(self):
        self._note("index")
        return self.view(np.ndarray).__index__()

    def item(self, *a):
        self._note("item")
        return self.view(np.ndarray).item(*a)

    def tolist(self):
        self._note("tolist")
        return self.view(np.ndarray).tolist()

    def __array_function__(self, func, types, args, kwargs):
        """NumPy functions of a watched array give watched arrays (np.concatenate, np.where ...
        gave plain ones), as CuPy's functions of device arrays give device arrays."""
        return _watched(super().__array_function__(func, types, args, kwargs))


def _watched(x):
    if type(x) is np.ndarray:
        return x.view(Watched)
    if isinstance(x, (tuple, list)):
        return type(x)(_watched(v) for v in x)
    return x


CONFIGS = [{}, {"cluster_target": "balanced", "marginals": "uniform"},
           {"cluster_target": "hard", "sinkhorn_backward": "implicit"},
           {"omh": False}, {"eps": 0.02, "marginals": "uniform"}]


@pytest.fixture
def watched_draws(monkeypatch):
    """The step's draws arrive on the device as one host -> device copy; here that copy's pieces
    are watched too (wrapped after the conversion, as a device array would be)."""
    real = model.to_device_draws

    def wrapped(*a, **k):
        out = real(*a, **k)
        return {key: (None if v is None else [p.view(Watched) for p in v] if isinstance(v, list) else v.view(Watched))
                for key, v in out.items()}

    monkeypatch.setattr(model, "to_device_draws", wrapped)


def _step(over):
    cfg = fixtures.small_config(**over)
    rng = np.random.default_rng(0)
    params = {k: v.view(Watched) for k, v in model.init_params(cfg, rng, dtype=np.float32).items()}
    batch = {k: v.view(Watched) for k, v in fixtures.random_batch(cfg, rng, dtype=np.float32).items()}
    state = adam_init(params)
    draws = model.draw(cfg, 3, cfg.in_dim, rng)
    Watched.conversions = []
    syncs = backend.host_syncs()
    loss, parts, grads = model.loss_and_grads(params, batch, cfg, rng, draws=draws)
    ok = adam_step(params, grads, state, 1e-3, ok=np.asarray(True).view(Watched) & np.isfinite(loss))
    return loss, grads, ok, backend.host_syncs() - syncs


@pytest.mark.parametrize("over", CONFIGS)
def test_a_training_step_converts_nothing_to_the_host(over, watched_draws):
    loss, grads, ok, syncs = _step(over)
    assert type(loss) is Watched and type(grads["W2"]) is Watched and type(ok) is Watched   # watched all along
    assert Watched.conversions == [] and syncs == 0


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
    if isinstance(x, np.ndarray):
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
def test_a_host_read_planted_in_a_loss_or_op_is_seen(module, name, over, watched_draws, monkeypatch):
    """The check can fail where it matters: a float() of the first array a loss or an op receives
    (a forward's input; a backward's cache, as its incoming gradient may be a constant the caller
    made) is counted, because the watched type reaches them all. It was lost where the features
    were converted, so a read of anything computed from the features alone passed unseen."""
    real = getattr(module, name)
    planted = []

    def reads_the_host(*args, **kw):
        a = _first_array(args[1:] if name == "backward" else args)
        if a is not None:
            planted.append(type(a).__name__)
            float(a.sum())
        return real(*args, **kw)

    monkeypatch.setattr(module, name, reads_the_host)
    _step(over)
    assert planted, f"{module.__name__}.{name} was not called with an array"
    assert Watched.conversions.count("float") == len(planted), planted


def test_the_counter_sees_a_conversion():
    """The check can fail: a float() of a watched array is recorded."""
    Watched.conversions = []
    float(np.ones(()).view(Watched) * 2)
    assert Watched.conversions == ["float"]


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
