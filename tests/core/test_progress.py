"""omh_ref.core.progress: tqdm on a terminal, periodic plain lines in a redirected log."""
import io
import re

from omh_ref.core import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


LINE = re.compile(r"^(?P<desc>[\w ]+): (?P<n>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\) [\d.e+]+ (?P<unit>\w+)/s")


def test_a_terminal_gets_tqdm_and_a_log_gets_lines():
    from tqdm import tqdm

    t = progress.bar(5, "x", stream=Terminal())
    assert isinstance(t, tqdm)
    t.close()
    log = io.StringIO()
    b = progress.bar(5, "x", stream=log)
    assert isinstance(b, progress.Lines) and "\r" not in log.getvalue()


def test_lines_every_update_with_every_zero_and_one_closing_line():
    log = io.StringIO()
    with progress.bar(4, "segment", unit="img", every=0, stream=log) as b:
        for _ in range(4):
            b.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 4                                   # the last update said 4/4: close adds none
    m = [LINE.match(ln) for ln in lines]
    assert all(m), lines
    assert [(x["n"], x["total"], x["pct"], x["unit"]) for x in m] == [
        ("1", "4", "25", "img"), ("2", "4", "50", "img"), ("3", "4", "75", "img"), ("4", "4", "100", "img")]
    assert "\r" not in log.getvalue()


def test_a_long_period_prints_only_the_closing_line_with_the_postfix():
    log = io.StringIO()
    b = progress.bar(500, "train", unit="step", initial=100, every=3600, stream=log)
    for _ in range(400):
        b.update(1)
    b.set_postfix({"loss": "1.234"}, corr="0.5")
    assert log.getvalue() == ""
    b.close()
    b.close()                                                # closing twice says nothing more
    (line,) = log.getvalue().splitlines()
    assert LINE.match(line)["n"] == "500" and LINE.match(line)["pct"] == "100"
    assert line.endswith(", loss=1.234, corr=0.5")


def test_disabled_is_silent_and_iterables_and_unknown_totals_work():
    log = io.StringIO()
    with progress.bar(3, "quiet", enabled=False, every=0, stream=log) as b:
        b.update(3)
    assert log.getvalue() == ""
    assert list(progress.bar([1, 2, 3], "it", every=0, stream=log)) == [1, 2, 3]
    assert log.getvalue().splitlines()[-1].startswith("it: 3/3 (100%)")
    log = io.StringIO()
    assert list(progress.bar(iter("ab"), "gen", every=0, stream=log)) == ["a", "b"]
    assert log.getvalue().splitlines()[-1].startswith("gen: 2 ")          # no total: no share
