"""Downloads with checksum verification that fail fast, with one clear line, when the network is absent."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from clbench.errors import ClbenchError


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host can be opened (a download could start)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def file_digest(path: Path, algo: str = "md5") -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, md5: str, how_to: str, timeout: float = 15.0) -> Path:
    """Fetch ``url`` to ``dest`` and check its md5; any failure is one ClbenchError ending with ``how_to``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_suffix(dest.suffix + ".partial")
    print(f"downloading {url} -> {dest}", flush=True)
    try:
        # the timeout bounds connecting and every read: offline, name resolution fails at once
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(partial, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        partial.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise ClbenchError(f"stream.root: could not download {url} ({type(exc).__name__}: {reason}); {how_to}") from None
    got = file_digest(partial)
    if got != md5:
        partial.unlink(missing_ok=True)
        raise ClbenchError(f"stream.root: {url} downloaded with md5 {got}, expected {md5}; {how_to}")
    os.replace(partial, dest)
    return dest


def verify_md5(path: Path, md5: str, how_to: str) -> None:
    got = file_digest(path)
    if got != md5:
        raise ClbenchError(f"stream.root: {path} has md5 {got}, expected {md5} (corrupt or incomplete); "
                           f"delete it and {how_to}")


def extract_tar(archive: Path, into: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise ClbenchError(f"stream.root: cannot extract {archive} ({exc}); delete it and download it again") from None
