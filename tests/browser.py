"""Headless Chromium driven over the DevTools protocol, for the report's browser test and the
README's screenshot of it (``docs/report_screenshot.py``).

Why this way: Debian's ``chromium`` (installed by ``.ci/run``) is the browser, and the protocol's
websocket is spoken with ``websocket-client`` (a small pure-Python package in the ``test`` extra):
it is the lightest driver that hears the page's console errors and uncaught exceptions and every
request the page makes (``chromium --screenshot`` and ``--dump-dom`` hear neither), and it needs no
browser download, no Node.js and no WebDriver. Chromium runs with the flags this machine needs:
no sandbox (root), no GPU, and no background networking (the network is closed), in a fresh
profile folder removed at the end, in a process group of its own that is ended with it.

A Chromium that does not come up at all (it cannot be run, exits, or never opens its DevTools port)
is :class:`NotStarted`, which a test turns into a skip that says why; one that comes up and then fails
(its websocket, its page target, a page's errors) is an ordinary error, which fails the test. Either
way the process, its profile folder and its log are gone before the error is raised.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--remote-debugging-port=0"]


def chromium() -> str | None:
    """The Chromium binary (``$OMH_REF_CHROMIUM``, else ``chromium`` or ``chromium-browser`` on the
    PATH), or None."""
    given = os.environ.get("OMH_REF_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing() -> str | None:
    """Why a browser test cannot run here, or None."""
    if chromium() is None:
        return "no chromium on this machine (apt-get install chromium; .ci/run installs it)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "websocket-client is not installed (the test extra has it)"
    return None


class NotStarted(RuntimeError):
    """Chromium is there but does not start here (its message says how it ended, and its log's
    last lines)."""


def _tail(path, lines=8) -> str:
    try:
        text = Path(path).read_bytes()[-4000:].decode("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(ln.strip() for ln in text.splitlines()[-lines:] if ln.strip())


class Browser:
    """``with Browser() as b: b.open(url); b.evaluate(js); b.screenshot(path)``. What the page says
    is collected as it comes: ``b.errors`` (console errors, uncaught exceptions, error log
    entries) and ``b.requests`` (every URL the page asked for)."""

    def __init__(self, width=1280, height=900, timeout=60.0):
        import websocket

        self.width, self.height, self.timeout = width, height, timeout
        self.proc = self.ws = self.log = None
        self.next_id, self.events, self.errors, self.requests = 0, [], [], []
        self.profile = Path(tempfile.mkdtemp(prefix="omh-ref-chromium-"))
        self.log_path = self.profile.parent / (self.profile.name + ".log")
        try:
            self._start(width, height, timeout)
            port, path = (self.profile / "DevToolsActivePort").read_text().split()[:2]
            self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout,
                                                  suppress_origin=True)
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log", "Network"):
                self.send(f"{domain}.enable", session=True)
            self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                             "deviceScaleFactor": 1, "mobile": False}, session=True)
        except BaseException as e:
            log = _tail(self.log_path)
            self.close()
            if isinstance(e, NotStarted) or not isinstance(e, Exception):
                raise
            raise RuntimeError(f"chromium started but could not be driven ({type(e).__name__}: {e})"
                               + (f"; its log: {log}" if log else "")) from e

    def _start(self, width, height, timeout) -> None:
        """Run Chromium and wait for its DevTools port; :class:`NotStarted` where it cannot be run,
        ends, or opens no port within ``timeout`` seconds."""
        self.log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={self.profile}",
                                          f"--window-size={width},{height}", "about:blank"],
                                         stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                         start_new_session=True)
        except OSError as e:
            raise NotStarted(f"{chromium()} cannot be run ({type(e).__name__}: {e})") from None
        port_file = self.profile / "DevToolsActivePort"
        end = time.monotonic() + timeout
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > end:
                how = (f"exited with status {self.proc.returncode}" if self.proc.poll() is not None
                       else f"opened no DevTools port within {timeout:g} s")
                log = _tail(self.log_path)
                raise NotStarted(f"{chromium()} did not start: it {how}" + (f"; its log: {log}" if log else ""))
            time.sleep(0.05)

    # -- the protocol ---------------------------------------------------------------------------
    def send(self, method, params=None, session=False) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self.session
        self.ws.send(json.dumps(msg))
        while True:
            reply = self._receive()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def _receive(self) -> dict:
        reply = json.loads(self.ws.recv())
        if "method" in reply:
            self._event(reply["method"], reply.get("params", {}))
        return reply

    def _event(self, method, p) -> None:
        self.events.append(method)
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description", "")))
                                                                        for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            self.errors.append("exception: " + str(d.get("exception", {}).get("description") or d.get("text")))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            self.errors.append("log: " + p["entry"].get("text", ""))
        elif method == "Network.requestWillBeSent":
            self.requests.append(p.get("request", {}).get("url", ""))

    def wait_for(self, method) -> None:
        seen = len(self.events)
        end = time.monotonic() + self.timeout
        while method not in self.events[seen:]:
            if time.monotonic() > end:
                raise TimeoutError(f"no {method} within {self.timeout} s")
            self._receive()

    # -- what a test does -----------------------------------------------------------------------
    def open(self, url) -> None:
        """Load ``url`` and wait for its load event (every inline picture decoded)."""
        seen = len(self.events)
        self.send("Page.navigate", {"url": url}, session=True)
        if "Page.loadEventFired" not in self.events[seen:]:
            self.wait_for("Page.loadEventFired")

    def evaluate(self, expression):
        """The value of a JavaScript expression in the page (JSON-able)."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, session=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression[:80]}...: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def screenshot(self, path, full_page=True) -> tuple:
        """A PNG of the page (the whole page, or the viewport) -> its (width, height)."""
        params = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics", session=True)["cssContentSize"]
            w, h = int(self.width), int(size["height"])
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": w, "height": h, "scale": 1})
        data = self.send("Page.captureScreenshot", params, session=True)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        from PIL import Image

        with Image.open(path) as im:
            return im.size

    def close(self) -> None:
        """End Chromium (asked to close where it is connected, else at once), then its whole process
        group (renderers, GPU and zygote processes: the session made at start), and remove its
        profile folder and log. Safe to call twice, and on a Browser whose start failed anywhere."""
        try:
            asked = False
            if self.ws is not None:
                try:
                    self.ws.send(json.dumps({"id": 0, "method": "Browser.close"}))
                    asked = True
                except Exception:
                    pass
                try:
                    self.ws.close()
                except Exception:
                    pass
                self.ws = None
            if self.proc is not None:
                if asked:
                    try:
                        self.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        pass
                try:      # its own group (start_new_session): nothing else is in it
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                self.proc.wait()
                self.proc = None
        finally:
            if self.log is not None:
                self.log.close()
                self.log = None
            Path(self.log_path).unlink(missing_ok=True)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
