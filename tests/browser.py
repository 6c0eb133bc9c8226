"""Headless Chromium driven over the DevTools protocol, for the report's browser test and the
README's screenshot of it (``docs/report_screenshot.py``).

Why this way: Debian's ``chromium`` (installed by ``.ci/run``) is the browser, and the protocol's
websocket is spoken with ``websocket-client`` (a small pure-Python package in the ``test`` extra):
it is the lightest driver that hears the page's console errors and uncaught exceptions and every
request the page makes (``chromium --screenshot`` and ``--dump-dom`` hear neither), and it needs no
browser download, no Node.js and no WebDriver. Chromium runs with the flags this machine needs:
no sandbox (root), no GPU, and no background networking (the network is closed), in a fresh
profile folder removed at the end.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
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


class Browser:
    """``with Browser() as b: b.open(url); b.evaluate(js); b.screenshot(path)``. What the page says
    is collected as it comes: ``b.errors`` (console errors, uncaught exceptions, error log
    entries) and ``b.requests`` (every URL the page asked for)."""

    def __init__(self, width=1280, height=900, timeout=60.0):
        import websocket

        self.width, self.height, self.timeout = width, height, timeout
        self.profile = Path(tempfile.mkdtemp(prefix="omh-ref-chromium-"))
        self.log = open(self.profile.parent / (self.profile.name + ".log"), "wb")
        self.proc = subprocess.Popen([chromium(), *FLAGS, f"--user-data-dir={self.profile}",
                                      f"--window-size={width},{height}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        port_file = self.profile / "DevToolsActivePort"
        end = time.monotonic() + timeout
        while not (port_file.is_file() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.close()
                raise RuntimeError(f"chromium did not start (exit {self.proc.returncode}); its log: "
                                   f"{self.log.name}")
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout, suppress_origin=True)
        self.next_id, self.events, self.errors, self.requests = 0, [], [], []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False}, session=True)

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
        try:
            if getattr(self, "ws", None) is not None:
                try:
                    self.ws.send(json.dumps({"id": 0, "method": "Browser.close"}))
                except Exception:
                    pass
                self.ws.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
