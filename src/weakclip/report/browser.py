"""Open a report page in a real headless browser (Chromium) and check it, over the DevTools protocol.

:func:`check_page` starts ``chromium --headless`` with a fresh profile and a DevTools port, connects to the
page over its websocket (the ``websocket-client`` package, a dev dependency), loads the page and returns a
:class:`PageCheck`: the errors the page raised (uncaught exceptions, ``console.error``, failed loads), every
``<img>`` with its natural width, every URL the page requested, and a PNG screenshot with its pixel standard
deviation (0 for a blank page). No browser is downloaded: :func:`find_chromium` looks for one installed
(``WEAKCLIP_CHROMIUM``, else ``chromium``, ``chromium-browser``, ``google-chrome`` on the PATH).

``python -m weakclip.report.browser PAGE --screenshot OUT.png`` prints the check and saves the screenshot
(how the README's picture of the demo's report is taken).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weakclip.errors import WeakclipError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--remote-allow-origins=*", "--remote-debugging-port=0")


@dataclass
class PageCheck:
    errors: list[str] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)  # src (shortened), complete, natural_width
    requests: list[str] = field(default_factory=list)
    title: str = ""
    screenshot: bytes = b""
    pixel_std: float = 0.0

    @property
    def broken_images(self) -> list[dict[str, Any]]:
        return [im for im in self.images if not im["complete"] or im["natural_width"] <= 0]

    @property
    def remote_requests(self) -> list[str]:
        """Requests that leave the disk (anything but ``file:``, ``data:`` and ``about:``)."""
        return [u for u in self.requests if u.split(":", 1)[0] not in ("file", "data", "about")]


def find_chromium() -> str | None:
    explicit = os.environ.get("WEAKCLIP_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).is_file() else shutil.which(explicit)
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _Cdp:
    """A minimal DevTools-protocol client over one websocket: commands with ids, events collected."""

    def __init__(self, url: str, timeout: float) -> None:
        import websocket

        self.ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True)
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def _receive(self) -> dict[str, Any]:
        return json.loads(self.ws.recv())

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            message = self._receive()
            if message.get("id") == my_id:
                if "error" in message:
                    raise WeakclipError(f"browser: {method} failed: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for(self, method: str, deadline: float) -> bool:
        if any(e["method"] == method for e in self.events):
            return True
        while time.monotonic() < deadline:
            message = self._receive()
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return True
        return False

    def close(self) -> None:
        self.ws.close()


def _devtools_port(profile: Path, proc: subprocess.Popen, deadline: float) -> int:
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if marker.is_file():
            lines = marker.read_text().split()
            if lines:
                return int(lines[0])
        if proc.poll() is not None:
            raise WeakclipError(f"browser: chromium exited with status {proc.returncode} before it listened")
        time.sleep(0.05)
    raise WeakclipError("browser: chromium did not open its DevTools port in time")


def _page_websocket(port: int, deadline: float) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: never through a proxy
    while time.monotonic() < deadline:
        with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
            targets = json.loads(resp.read())
        pages = [t for t in targets if t.get("type") == "page" and t.get("webSocketDebuggerUrl")]
        if pages:
            return pages[0]["webSocketDebuggerUrl"]
        time.sleep(0.05)
    raise WeakclipError("browser: no page target in chromium")


_IMAGES_JS = """JSON.stringify({title: document.title, height: document.documentElement.scrollHeight,
  images: Array.from(document.images).map(i => ({src: i.src.slice(0, 48), complete: i.complete,
                                                 natural_width: i.naturalWidth}))})"""


def _error_messages(events: list[dict[str, Any]]) -> list[str]:
    errors = []
    for e in events:
        p = e.get("params", {})
        if e["method"] == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            errors.append(f"exception: {d.get('exception', {}).get('description') or d.get('text')}")
        elif e["method"] == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            errors.append("console.error: " + " ".join(str(a.get("value", a.get("description")))
                                                       for a in p.get("args", [])))
        elif e["method"] == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        elif e["method"] == "Network.loadingFailed":
            errors.append(f"load failed: {p.get('errorText')}")
    return errors


def pixel_std(png: bytes) -> float:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        return float(np.asarray(im.convert("L"), dtype=np.float64).std())


def check_page(page: str | Path, *, width: int = 1200, height: int | None = None, max_height: int = 12000,
               timeout: float = 60.0, chromium: str | None = None) -> PageCheck:
    """Load ``page`` (a file) in headless Chromium and return what it saw (see the module docstring).

    The screenshot is ``width`` wide and ``height`` high (None: the whole page, at most ``max_height``).
    WeakclipError when no browser is found or it misbehaves."""
    page = Path(page).resolve()
    if not page.is_file():
        raise WeakclipError(f"page not found: {page}")
    binary = chromium or find_chromium()
    if binary is None:
        raise WeakclipError("no chromium found (install Debian's 'chromium' or set WEAKCLIP_CHROMIUM)")
    deadline = time.monotonic() + timeout
    profile = Path(tempfile.mkdtemp(prefix="weakclip-chromium-"))
    log = open(profile.parent / f"{profile.name}.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                             f"--window-size={width},{height or 1000}", "about:blank"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    cdp = None
    try:
        port = _devtools_port(profile, proc, deadline)
        cdp = _Cdp(_page_websocket(port, deadline), timeout=max(1.0, deadline - time.monotonic()))
        for domain in ("Page", "Runtime", "Log", "Network"):
            cdp.call(f"{domain}.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=height or 1000,
                 deviceScaleFactor=1, mobile=False)
        cdp.call("Page.navigate", url=page.as_uri())
        if not cdp.wait_for("Page.loadEventFired", deadline):
            raise WeakclipError(f"browser: {page} did not finish loading in {timeout:.0f} s")
        facts = json.loads(cdp.call("Runtime.evaluate", expression=_IMAGES_JS, returnByValue=True)
                           ["result"]["value"])
        shot_height = height or min(max_height, int(facts["height"]))
        cdp.call("Emulation.setDeviceMetricsOverride", width=width, height=shot_height, deviceScaleFactor=1,
                 mobile=False)
        shot = cdp.call("Page.captureScreenshot", format="png")
        png = base64.b64decode(shot["data"])
        result = PageCheck(errors=_error_messages(cdp.events), images=facts["images"], title=facts["title"],
                           requests=[e["params"]["request"]["url"] for e in cdp.events
                                     if e["method"] == "Network.requestWillBeSent"],
                           screenshot=png, pixel_std=pixel_std(png))
        return result
    finally:
        if cdp is not None:
            with contextlib.suppress(Exception):  # already gone
                cdp.call("Browser.close")
            cdp.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
        Path(log.name).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m weakclip.report.browser",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("page", type=Path)
    parser.add_argument("--screenshot", type=Path, default=None, help="save the screenshot here (PNG)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=None, help="default: the whole page")
    args = parser.parse_args(argv)
    check = check_page(args.page, width=args.width, height=args.height)
    print(f"title: {check.title}; images: {len(check.images)} ({len(check.broken_images)} broken); "
          f"errors: {check.errors or 'none'}; requests off disk: {check.remote_requests or 'none'}; "
          f"screenshot pixel std {check.pixel_std:.1f}")
    if args.screenshot is not None:
        args.screenshot.parent.mkdir(parents=True, exist_ok=True)
        args.screenshot.write_bytes(check.screenshot)
        print(f"screenshot: {args.screenshot}")
    return 0 if not check.errors and not check.broken_images and check.pixel_std > 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
