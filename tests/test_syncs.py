"""Host synchronisations of a training step, counted on NumPy arrays (so the test runs without a
GPU): a step reads nothing back from the device; the loop reads once per logged step (the loss
parts and the divergence flags, one transfer), and nowhere else but its checkpoint writes."""
import numpy as np
import pytest

from omh_ref.core import backend, model
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


@pytest.mark.parametrize("over", [{}, {"cluster_target": "balanced", "marginals": "uniform"},
                                  {"cluster_target": "hard", "sinkhorn_backward": "implicit"},
                                  {"hier_form": "centroids", "lam_sparse": 0.3},
                                  {"hier_form": "targets", "lam_sparse": 0.3, "marginals": "uniform"},
                                  {"hier_form": "targets", "cluster_target": "hard"}])
def test_a_training_step_converts_nothing_to_the_host(over):
    cfg = model.small_config(**over)
    rng = np.random.default_rng(0)
    params = {k: v.view(Watched) for k, v in model.init_params(cfg, rng, dtype=np.float32).items()}
    batch = {k: v.view(Watched) for k, v in model.random_batch(cfg, rng, dtype=np.float32).items()}
    state = adam_init(params)
    draws = model.draw(cfg.effective(), 3, cfg.in_dim, rng)
    Watched.conversions = []
    syncs = backend.host_syncs()
    loss, parts, grads = model.loss_and_grads(params, batch, cfg, rng, draws=draws)
    ok = adam_step(params, grads, state, 1e-3, ok=np.asarray(True).view(Watched) & np.isfinite(loss))
    assert type(loss) is Watched and type(grads["W2"]) is Watched and type(ok) is Watched   # watched all along
    assert Watched.conversions == [] and backend.host_syncs() == syncs


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
    cfg = model.small_config()
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
