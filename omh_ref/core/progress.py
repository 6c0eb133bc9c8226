"""Progress that suits where it is shown: tqdm's bar on a terminal, a plain line every
``every`` seconds (and one at the end) when stderr is redirected to a log, so that a log file
gets a few readable lines instead of thousands of carriage-return redraws. Every progress bar of
the package and the command line is made by :func:`bar`."""
from __future__ import annotations

import sys
import time

EVERY = 30.0    # seconds between two lines of a redirected log


def bar(what=None, desc="", enabled=True, unit="it", initial=0, every=EVERY, stream=None):
    """A progress bar over ``what``: a total (an int, or None when unknown) or an iterable.

    On a terminal (``stream``, default the current ``sys.stderr``, is a TTY): tqdm. Otherwise a
    :class:`Lines` with the same ``update`` / ``set_postfix`` / ``close`` interface (a context
    manager too, and iterable when given an iterable). ``enabled=False``: silent."""
    stream = sys.stderr if stream is None else stream
    iterable, total = (None, what) if what is None or isinstance(what, int) else (what, _len(what))
    if enabled and _is_tty(stream):
        from tqdm import tqdm

        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return Lines(iterable, total, desc, enabled, unit, initial, every, stream)


def _len(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):    # no isatty, or a closed stream
        return False


class Lines:
    """Progress as lines such as ``segment: 120/500 (24%) 12.3 img/s``: printed at an update when
    ``every`` seconds have passed since the last line (``every=0``: at every update), and at
    :meth:`close` unless the last line already said the same."""

    def __init__(self, iterable=None, total=None, desc="", enabled=True, unit="it", initial=0, every=EVERY,
                 stream=None):
        self.iterable, self.total, self.desc, self.enabled = iterable, total, desc, enabled
        self.unit, self.n, self.every = unit, int(initial), float(every)
        self.stream = sys.stderr if stream is None else stream
        self.start, self.postfix, self.closed = int(initial), "", False
        self.t0 = self.last = time.monotonic()
        self.said = None                         # the n of the last line printed

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        self.n += int(n)
        now = time.monotonic()
        if now - self.last >= self.every:
            self._say(now)

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self):
        if not self.closed and self.said != self.n:
            self._say(time.monotonic())
        self.closed = True

    def line(self, now=None) -> str:
        """The line that would be printed now."""
        elapsed = (time.monotonic() if now is None else now) - self.t0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f" {(self.n - self.start) / elapsed:.3g} {self.unit}/s" if elapsed > 0 else ""
        return f"{self.desc}: {count}{share}{rate}" + (f", {self.postfix}" if self.postfix else "")

    def _say(self, now):
        self.last, self.said = now, self.n
        if not self.enabled:
            return
        try:
            print(self.line(now), file=self.stream, flush=True)
        except (OSError, ValueError):            # a closed or full log never stops the work
            pass
