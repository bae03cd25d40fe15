"""A minimal Chrome DevTools Protocol client over Chromium's own pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL on file descriptors 3 and 4), enough for browser tests that click through a page: navigate,
evaluate JavaScript, wait for a condition. No driver library: only Chromium and the standard library."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import Any


class Browser:
    def __init__(self, chromium: str, width: int = 1600, height: int = 1000) -> None:
        self._profile = tempfile.TemporaryDirectory()
        import fcntl

        def high(fd: int) -> int:  # away from 3 and 4, which the shell below redirects onto
            new = fcntl.fcntl(fd, fcntl.F_DUPFD, 100)
            os.close(fd)
            return new

        to_child_r, self._to_child = map(high, os.pipe())
        self._from_child, from_child_w = map(high, os.pipe())
        self._log = tempfile.TemporaryFile()
        args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
                "--disable-background-networking", "--disable-component-update", "--remote-debugging-pipe",
                f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"]
        cmd = ["bash", "-c", f'exec "$@" 3<&{to_child_r} 4>&{from_child_w}', "bash", *args]
        self.proc = subprocess.Popen(cmd, pass_fds=(to_child_r, from_child_w), stdout=subprocess.DEVNULL,
                                     stderr=self._log)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            if time.monotonic() > deadline:
                raise TimeoutError(method)
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                self._log.seek(0)
                raise RuntimeError("Chromium closed its pipe: " + self._log.read()[-2000:].decode(errors="replace"))
            self._buf += chunk

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url}, self.session)

    def js(self, expression: str) -> Any:
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True}, self.session)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails'].get('text')}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90.0) -> Any:
        """Poll a JavaScript expression until it is truthy; its value (TimeoutError with the page's URL). The value
        comes back as JSON: test a DOM node with !!(...), a node itself reads as empty."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"{expression} stayed false on {self.js('location.href')}")

    def screenshot(self, path) -> None:
        import base64

        data = self.send("Page.captureScreenshot", {"format": "png"}, self.session)["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._to_child)
        os.close(self._from_child)
        self._log.close()
        self._profile.cleanup()
