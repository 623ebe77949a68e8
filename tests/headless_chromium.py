"""Open a page in headless Chromium with every request it makes routed to a local listener that records it.

Chromium is pointed at a proxy on 127.0.0.1 (loopback included), so any
request the page makes (an image, a font, a script from a CDN) arrives there
instead of leaving the machine. The browser's own housekeeping (component
updates, account checks) goes through the same proxy and is told apart by
host: :data:`BROWSER_HOSTS`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["chromium", "open_page", "Visit", "BROWSER_HOSTS"]

# Chromium's own services, contacted at start-up whatever the page is.
BROWSER_HOSTS = ("update.googleapis.com", "accounts.google.com", "clients2.google.com", "redirector.gvt1.com")

_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
    "--disable-client-side-phishing-detection", "--metrics-recording-only", "--proxy-bypass-list=<-loopback>",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication,NetworkTimeServiceQuerying",
]


def chromium() -> str | None:
    """The Chromium executable, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Visit:
    """What loading a page gave: its DOM after load, the page's own requests, and the screenshot's path."""

    dom: str
    requests: list[str]
    screenshot: Path | None


class _Listener:
    """A TCP listener that keeps the first line of every connection made to it."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.lines: list[str] = []
        self.readers: list[threading.Thread] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
            self.readers.append(reader)
            reader.start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            try:
                self.lines.append(conn.recv(4096).decode("latin-1").split("\r\n", 1)[0])
            except OSError:
                self.lines.append("(a connection that sent nothing)")

    def close(self) -> None:
        """Stop listening once every connection made so far has been read."""
        for reader in list(self.readers):
            reader.join(timeout=3)
        self.socket.close()


def _host(line: str) -> str:
    parts = line.split()
    target = parts[1] if len(parts) > 1 else ""
    return target.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]


def open_page(page: Path, *, screenshot: Path | None = None, timeout: float = 60) -> Visit:
    """Load ``page`` (a file) in headless Chromium: its DOM after load, its requests, and a screenshot if asked."""
    exe = chromium()
    if exe is None:
        raise RuntimeError("chromium is not installed")
    listener = _Listener()
    try:
        with tempfile.TemporaryDirectory() as profile:
            flags = [*_FLAGS, f"--user-data-dir={profile}", f"--proxy-server=http://127.0.0.1:{listener.port}"]
            url = Path(page).resolve().as_uri()
            dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=timeout, check=True).stdout
            if screenshot is not None:
                subprocess.run([exe, *flags, "--window-size=1280,4000", f"--screenshot={screenshot}", url],
                               capture_output=True, timeout=timeout, check=True)
    finally:
        listener.close()
    return Visit(dom, [line for line in listener.lines if _host(line) not in BROWSER_HOSTS], screenshot)
