"""The one download path (issue 21), against a loopback HTTP server started here (127.0.0.1 only, every response
bounded in time): a per-user cache keyed by the full URL, nothing half-downloaded ever kept, an overall deadline,
sha256 checks, one-line errors naming the URL."""

from __future__ import annotations

import hashlib
import io
import re
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from align_detr_hf.convert_align_detr import load_checkpoint

MAX_RESPONSE_S = 10.0  # no response of the test server lasts longer


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 - http.server's name
        mode, body = self.server.routes.get(self.path, ("missing", b""))
        self.server.hits.append(self.path)
        if mode == "missing":
            self.send_error(404, "Not Found")
            return
        if mode == "slow_headers":  # a server that never finishes its headers
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self._trickle(b"X-Slow: " + b"a" * 1000)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "ok":
            self.wfile.write(body)
        elif mode == "cut":  # the connection ends half-way
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif mode == "slow":  # bytes keep coming, too slowly to finish
            self._trickle(body)

    def _trickle(self, data: bytes) -> None:
        start = time.monotonic()
        for byte in data:
            if time.monotonic() - start > MAX_RESPONSE_S:
                break
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:  # the client gave up
                break
            time.sleep(0.05)
        self.close_connection = True


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes, httpd.hits = {}, []
    httpd.url = lambda path: f"http://127.0.0.1:{httpd.server_address[1]}{path}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=MAX_RESPONSE_S)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("ALIGN_DETR_CACHE", str(cache))
    return cache


def torch_bytes(state_dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def unique_name(suffix=".pth") -> str:
    return f"model_{uuid.uuid4().hex[:12]}{suffix}"


# ------------------------------------------------------------------------------------------------ the issue's case 3


def test_issue21_case3_two_urls_with_the_same_base_name_give_two_files(server):
    name = unique_name()
    server.routes[f"/a/{name}"] = ("ok", torch_bytes({"w": torch.zeros(2)}))
    server.routes[f"/b/{name}"] = ("ok", torch_bytes({"w": torch.ones(3)}))
    assert load_checkpoint(server.url(f"/a/{name}"))["w"].shape == (2,)
    assert torch.equal(load_checkpoint(server.url(f"/b/{name}"))["w"], torch.ones(3))


def test_issue21_case3_a_cut_short_download_is_not_reused(server):
    name, data = unique_name(), torch_bytes({"w": torch.arange(5000.0)})
    url = server.url(f"/{name}")
    server.routes[f"/{name}"] = ("cut", data)
    with pytest.raises(ValueError, match=rf"^cannot download {re.escape(url)}: the connection ended after"):
        load_checkpoint(url)
    server.routes[f"/{name}"] = ("ok", data)  # the server is fixed: the retry downloads again and works
    assert torch.equal(load_checkpoint(url)["w"], torch.arange(5000.0))


def test_issue21_case3_a_file_planted_in_the_shared_temp_folder_is_not_used(server):
    name = unique_name()
    planted = Path(tempfile.gettempdir()) / name
    planted.write_bytes(torch_bytes({"w": torch.full((2,), 666.0)}))
    try:
        server.routes[f"/{name}"] = ("ok", torch_bytes({"w": torch.ones(2)}))
        assert torch.equal(load_checkpoint(server.url(f"/{name}"))["w"], torch.ones(2))
    finally:
        planted.unlink()


# ------------------------------------------------------------------------------------------------ slow, cut short, swapped


from align_detr_hf.download import DownloadError, cached_path, download  # noqa: E402


def cache_entries(cache: Path) -> list[str]:
    """Every file in the cache, temporary ones included."""
    return sorted(p.name for p in (cache / "downloads").iterdir()) if (cache / "downloads").exists() else []


@pytest.mark.parametrize("mode", ["slow", "slow_headers"])
def test_slow_server_hits_the_deadline_and_leaves_nothing(server, private_cache, mode):
    server.routes["/slow.bin"] = (mode, b"x" * 10_000)  # 10 000 bytes at 20 per second: 500 s
    url = server.url("/slow.bin")
    start = time.monotonic()
    with pytest.raises(DownloadError) as error:
        download(url, deadline_s=1.0)
    elapsed = time.monotonic() - start
    assert re.fullmatch(rf"cannot download {re.escape(url)}: not complete after the 1 s deadline; nothing was kept\.",
                        str(error.value)), str(error.value)
    assert 0.9 < elapsed < 5.0, elapsed  # bytes kept coming, so only the overall deadline could stop it
    assert cache_entries(private_cache) == []


def test_cut_short_response_is_an_error_and_a_retry_works_once_the_server_is_good(server, private_cache):
    data = bytes(range(256)) * 40
    server.routes["/w.bin"] = ("cut", data)
    url = server.url("/w.bin")
    with pytest.raises(DownloadError, match=rf"cannot download {re.escape(url)}: the connection ended after 5120 of "
                                            r"10240 bytes; nothing was kept\."):
        download(url)
    assert cache_entries(private_cache) == []
    server.routes["/w.bin"] = ("ok", data)
    path = download(url)
    assert path.read_bytes() == data and path == cached_path(url)
    assert cache_entries(private_cache) == [path.name]


@pytest.mark.parametrize("page, message", [
    (b"<html><body>Sign in</body></html>", r"the file is HTML \(an error page saved instead of the file\?\)"),
    (b"", r"the file is empty \(0 bytes\)"),
])
def test_an_error_page_served_as_the_checkpoint_is_not_cached_and_a_retry_asks_again(server, private_cache, page,
                                                                                     message):
    """A server (a login wall, a proxy) answers 200 with an HTML page or nothing: the conversion fails naming the URL,
    the page is not cached, and once the server serves the file the same command works."""
    from align_detr_hf.convert_align_detr import load_checkpoint

    server.routes["/m.pth"] = ("ok", page)
    url = server.url("/m.pth")
    with pytest.raises(DownloadError, match=rf"^cannot download {re.escape(url)}: {message}.*; nothing was kept\.$"):
        load_checkpoint(url)
    assert cache_entries(private_cache) == []
    server.routes["/m.pth"] = ("ok", torch_bytes({"w": torch.ones(2)}))
    assert torch.equal(load_checkpoint(url)["w"], torch.ones(2))
    assert server.hits == ["/m.pth", "/m.pth"]


def test_swapped_server_two_urls_two_files_and_a_changed_file_with_a_sha_is_refused(server, private_cache):
    first, second = b"first model", b"second model"
    server.routes["/a/model.pth"] = ("ok", first)
    server.routes["/b/model.pth"] = ("ok", second)
    a, b = download(server.url("/a/model.pth")), download(server.url("/b/model.pth"))
    assert a != b and a.read_bytes() == first and b.read_bytes() == second
    # the file behind a URL changes while its expected sha256 is known: refused, and nothing of it is kept
    sha = hashlib.sha256(first).hexdigest()
    server.routes["/c/model.pth"] = ("ok", second)
    url = server.url("/c/model.pth")
    with pytest.raises(DownloadError, match=rf"cannot download {re.escape(url)}: its sha256 .* does not match the "
                                            rf"expected {sha[:8]} .*nothing was kept"):
        download(url, sha256=sha[:8])
    assert not cached_path(url).exists() and len(cache_entries(private_cache)) == 2


def test_sha256_prefix_in_a_checkpoint_name_is_checked(server, private_cache):
    data = b"weights"
    good = f"/ckpt-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    server.routes[good] = ("ok", data)
    server.routes["/ckpt-00000000.pth"] = ("ok", data)
    assert load_checkpoint_bytes(server.url(good)) == data
    with pytest.raises(ValueError, match=r"cannot download .*/ckpt-00000000\.pth: its sha256 .* expected 00000000"):
        load_checkpoint(server.url("/ckpt-00000000.pth"))


def load_checkpoint_bytes(url: str) -> bytes:
    from align_detr_hf.convert_align_detr import expected_sha256_prefix

    return download(url, sha256=expected_sha256_prefix(url)).read_bytes()


def test_a_complete_entry_is_reused_and_a_tampered_one_fetched_again(server, private_cache):
    data = b"model bytes"
    server.routes["/m.pth"] = ("ok", data)
    url = server.url("/m.pth")
    download(url)
    download(url)
    assert server.hits == ["/m.pth"]  # reused, as torch.hub does
    cached_path(url).write_bytes(b"planted")
    assert download(url, sha256=hashlib.sha256(data).hexdigest()).read_bytes() == data  # checked, fetched again
    assert server.hits == ["/m.pth", "/m.pth"]
    assert download(url, refresh=True).read_bytes() == data and len(server.hits) == 3


def test_http_error_and_unreachable_server_name_the_url(server, private_cache):
    url = server.url("/missing.pth")
    with pytest.raises(DownloadError, match=rf"^cannot download {re.escape(url)}: HTTP 404 Not Found; nothing was kept"):
        download(url)
    with pytest.raises(DownloadError, match=r"^cannot download http://127\.0\.0\.1:9/x\.pth: .*refused"):
        download("http://127.0.0.1:9/x.pth", deadline_s=5)
    assert cache_entries(private_cache) == []


def test_a_cache_other_users_can_write_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    (shared / "downloads").mkdir(parents=True)
    (shared / "downloads").chmod(0o777)
    monkeypatch.setenv("ALIGN_DETR_CACHE", str(shared))
    with pytest.raises(DownloadError, match=r"download cache .*shared/downloads is not private .*ALIGN_DETR_CACHE"):
        download("http://127.0.0.1:9/x.pth")


def test_images_from_urls_go_through_the_same_path(server, private_cache):
    from PIL import Image

    from align_detr_hf.image_io import ImageReadError, open_image

    buffer = io.BytesIO()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(buffer, format="PNG")
    server.routes["/a.png"] = ("ok", buffer.getvalue())
    assert open_image(server.url("/a.png")).size == (20, 10)
    server.routes["/b.png"] = ("cut", buffer.getvalue())
    with pytest.raises(ImageReadError, match=r"^cannot download image http://127\.0\.0\.1:\d+/b\.png: the connection "
                                             r"ended after"):
        open_image(server.url("/b.png"))
    assert [name.endswith("-a.png") for name in cache_entries(private_cache)] == [True]
