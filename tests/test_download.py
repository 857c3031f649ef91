"""The one download path (issue 21), against a loopback HTTP server started here (127.0.0.1 only, every response
bounded in time): a per-user cache keyed by the full URL, nothing half-downloaded ever kept, an overall deadline,
sha256 checks, one-line errors naming the URL."""

from __future__ import annotations

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
    with pytest.raises(ValueError):
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
