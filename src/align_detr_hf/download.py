"""The one way this package fetches a URL: checkpoints (`align-detr convert`), images (`predict`, the image reader).

- A per-user cache (`$ALIGN_DETR_CACHE`, else `$XDG_CACHE_HOME/align-detr-hf`, else `~/.cache/align-detr-hf`; its
  `downloads/` folder is private, 0700), keyed by the full URL: two URLs with the same file name are two entries.
- A download goes to a private temporary file in the cache and is renamed to its entry only when complete: every byte
  of the announced Content-Length arrived, and the sha256 matches when one is expected (a flag, or the
  `-<hex>.pth` prefix that torch.hub and mmdetection put in checkpoint names, see [`sha256_prefix_from_name`]).
  Nothing half-downloaded is ever kept or reused.
- An overall deadline (not only a per-read timeout): a watchdog closes the connection when it passes, whatever the
  server does (slow headers included).
- Failures are `DownloadError` (a `ValueError`) with one line naming the URL.

As torch.hub does, a cached entry is reused without asking the server again (after re-checking its sha256 when one
is expected); `refresh=True` fetches anew (images, whose content at a URL may change).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import socket
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

__all__ = ["DownloadError", "cache_folder", "cached_path", "download", "is_url", "sha256_prefix_from_name"]

DEADLINE_S = 3600.0  # a whole checkpoint (up to ~1 GB) on a slow line
STALL_S = 60.0  # longest wait for any single network read
_CHUNK = 1 << 20


class DownloadError(ValueError):
    """A URL that could not be fetched completely; the message names it and says why."""


def is_url(source) -> bool:
    return bool(re.match(r"https?://", str(source)))


def sha256_prefix_from_name(path_or_url: str) -> str | None:
    """The hash prefix of a checkpoint name such as mmdetection's `...-55b2bba2.pth` (torch.hub's convention;
    `.pth` names only, so that a date in an image name is never taken for one)."""
    name = os.path.basename(urllib.parse.urlparse(str(path_or_url)).path)
    match = re.search(r"-([0-9a-f]{8,64})\.pth$", name)
    return match.group(1) if match else None


def cache_folder() -> Path:
    """The per-user download cache; created private (0700), refused if other users could write into it."""
    root = os.environ.get("ALIGN_DETR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "align-detr-hf"
    )
    folder = Path(root).expanduser() / "downloads"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise DownloadError(f"cannot create the download cache {folder}: {error.strerror or error}.") from error
    if hasattr(os, "getuid"):
        info = folder.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise DownloadError(
                f"the download cache {folder} is not private (owned by another user or writable by others), so "
                "its files could be planted; set ALIGN_DETR_CACHE to a folder of your own."
            )
    return folder


def cached_path(url: str) -> Path:
    """Where `url` is cached: a hash of the full URL, then its (sanitised) file name, kept for readability and for
    the hash prefix in checkpoint names."""
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:20]
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-120:].lstrip(".") or "download"
    return cache_folder() / f"{key}-{name}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(
    url: str,
    *,
    sha256: str | None = None,
    deadline_s: float = DEADLINE_S,
    refresh: bool = False,
    what: str = "",
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Fetch `url` into the cache (or reuse its complete entry) and return the local path.

    `sha256`: the expected digest or a prefix of it (at least 8 hex digits); the file is refused (and not kept) if it
    differs. `deadline_s`: the whole download must end within it. `what` names the kind of file in messages
    ("image "). `check(path)` raises `ValueError` for content that is complete but not what was asked for (an HTML
    error page served with status 200, an empty body): such a file is never cached, and a cached entry that fails it
    is fetched again. Raises `DownloadError`.
    """
    url = str(url)
    if not is_url(url):
        raise DownloadError(f"cannot download {what}{url}: only http:// and https:// URLs are fetched.")
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{8,64}", sha256):
        raise ValueError(f"sha256 must be 8 to 64 hex digits, got {sha256!r}.")
    expected = sha256.lower() if sha256 else None
    target = cached_path(url)
    if target.is_file() and not refresh:
        if (expected is None or _sha256(target).startswith(expected)) and _passes(check, target):
            return target
        target.unlink()  # a damaged, altered or unusable entry: fetched again
    fd, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)  # 0600
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _fetch(url, out, deadline_s, what)
            out.flush()
            os.fsync(out.fileno())
        if expected is not None and not digest.startswith(expected):
            raise DownloadError(
                f"cannot download {what}{url}: its sha256 {digest[:16]}... does not match the expected {expected} "
                "(a changed or corrupted file); nothing was kept."
            )
        if check is not None:
            try:
                check(temp)
            except ValueError as error:
                raise DownloadError(f"cannot download {what}{url}: {str(error).rstrip('.')}; nothing was kept.") from error
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)
    return target


def _passes(check: Callable[[Path], None] | None, path: Path) -> bool:
    try:
        check is None or check(path)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------------------------------------ the transfer


def _tracking_opener(sockets: list) -> urllib.request.OpenerDirector:
    """urllib's opener (proxies from the environment, redirects, TLS checks) whose sockets are remembered, so that the
    deadline watchdog can shut them down (urllib drops the connection's own reference once the headers are read)."""

    def tracked(connection_class):
        class Tracked(connection_class):
            def connect(self):
                super().connect()
                sockets.append(self.sock)

        return Tracked

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(tracked(http.client.HTTPConnection), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        context = ssl.create_default_context()

        def https_open(self, req):
            return self.do_open(tracked(http.client.HTTPSConnection), req, context=self.context)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def _fetch(url: str, out, deadline_s: float, what: str) -> str:
    """Stream `url` into the open file `out` within `deadline_s`; returns the sha256 of what was written."""
    sockets: list = []
    expired = threading.Event()

    def expire():
        expired.set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked read at once
            except OSError:
                pass

    def fail(reason: str, cause: BaseException | None = None):
        if expired.is_set() or time.monotonic() > deadline:
            reason = f"not complete after the {deadline_s:g} s deadline"
        raise DownloadError(f"cannot download {what}{url}: {reason}; nothing was kept.") from cause

    deadline = time.monotonic() + deadline_s
    watchdog = threading.Timer(deadline_s, expire)
    watchdog.daemon = True
    watchdog.start()
    digest, received, length = hashlib.sha256(), 0, None
    try:
        with _tracking_opener(sockets).open(url, timeout=min(STALL_S, deadline_s)) as response:
            header = response.headers.get("Content-Length")
            length = int(header) if header and header.strip().isdigit() else None
            while chunk := response.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                if time.monotonic() > deadline:
                    fail("")
    except DownloadError:
        raise
    except urllib.error.HTTPError as error:
        fail(f"HTTP {error.code} {error.reason}", error)
    except urllib.error.URLError as error:
        fail(str(error.reason), error)
    except (TimeoutError, socket.timeout) as error:
        fail(f"no data for {min(STALL_S, deadline_s):g} s", error)
    except (http.client.HTTPException, OSError, ValueError) as error:
        fail(f"{type(error).__name__}: {error}" if str(error) else type(error).__name__, error)
    finally:
        watchdog.cancel()
    if expired.is_set():
        fail("")
    if length is not None and received != length:
        fail(f"the connection ended after {received} of {length} bytes")
    return digest.hexdigest()
