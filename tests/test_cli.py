"""The command line: ``omh-ref gradcheck`` prints its table and exits by the result."""
from click.testing import CliRunner

from omh_ref_cli.main import main


def test_gradcheck_passes_and_covers_every_piece():
    res = CliRunner().invoke(main, ["gradcheck", "--seed", "1"])
    assert res.exit_code == 0, res.output
    for piece in ["linear", "relu", "dropout", "normalize", "cosine", "softmax", "log_softmax", "kl",
                  "grid_sample", "resize", "sinkhorn unrolled", "sinkhorn implicit", "correlation",
                  "cluster balanced", "cluster soft", "cluster hard", "hierarchy uniform",
                  "hierarchy usage", "model omh", "model stego"]:
        assert piece in res.output, piece
    assert " 0 failed" in res.output


def test_gradcheck_only_filter_and_unknown_filter():
    res = CliRunner().invoke(main, ["gradcheck", "--only", "grid_sample"])
    assert res.exit_code == 0 and "linear" not in res.output and "grid_sample" in res.output
    res = CliRunner().invoke(main, ["gradcheck", "--only", "nothing-like-this"])
    assert res.exit_code == 2 and "matches no check" in res.output


def test_gradcheck_fails_loudly_on_a_broken_backward(monkeypatch):
    from omh_ref.ops import relu

    monkeypatch.setattr(relu, "backward", lambda dy, cache: dy * (cache > 0) * 1.01)
    res = CliRunner().invoke(main, ["gradcheck", "--only", "relu"])
    assert res.exit_code == 1 and "FAIL" in res.output
