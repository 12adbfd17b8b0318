"""A headless Chromium driven over the Chrome DevTools Protocol (a websocket), for tests of pages.

The browser is Debian's ``chromium`` (``.ci/run`` installs it); nothing is downloaded. It starts
with ``--remote-debugging-port=0`` and says on stderr which port it took ("DevTools listening on
ws://127.0.0.1:PORT/..."); the page's websocket comes from ``http://127.0.0.1:PORT/json/list``.
Only the loopback address is ever contacted.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless browser with one page; ``evaluate`` runs JavaScript in it."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900, timeout: float = 60.0) -> None:
        import websocket  # websocket-client, in [dev]

        self.profile = tempfile.mkdtemp(prefix="wsi-nuclei-chromium-")
        args = [binary, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--user-data-dir={self.profile}", f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.timeout = timeout
        self.lines: queue.Queue[str] = queue.Queue()
        # a thread drains stderr for the browser's whole life (a full pipe would stall it)
        threading.Thread(target=self._drain, daemon=True).start()
        port = self._port(time.monotonic() + timeout)
        page = self._page(port, time.monotonic() + timeout)
        self.ws = websocket.create_connection(page, timeout=timeout, suppress_origin=True)
        self._id = 0

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line)

    def _port(self, deadline: float) -> int:
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            seen.append(line)
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                return int(m.group(1))
        self.close()
        raise RuntimeError("chromium did not start: " + "".join(seen[-5:]))

    def _page(self, port: int, deadline: float) -> str:
        while time.monotonic() < deadline:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
            with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
                pages = [t for t in json.loads(resp.read()) if t.get("type") == "page"]
            if pages:
                return str(pages[0]["webSocketDebuggerUrl"])
            time.sleep(0.1)
        raise RuntimeError("chromium opened no page")

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One protocol command; its result (events that arrive meanwhile are skipped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression (returned by value: JSON-like)."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def open(self, path: Path) -> None:
        """Load a file and wait until it and its images are loaded."""
        self.send("Page.enable")
        self.send("Page.navigate", url=path.resolve().as_uri())
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.evaluate("document.readyState === 'complete' && Array.from(document.images).every(i => i.complete)"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{path} did not finish loading")

    def screenshot(self, path: Path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
