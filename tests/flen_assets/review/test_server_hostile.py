"""The review server against hostile or broken input, over real HTTP (uvicorn): image ids whose file is
not a decodable image get 415 (never 500), malformed or deeply nested JSON gets 400, and an oversized
body gets 413 before the server buffers it (by Content-Length, or as soon as a chunked body passes
the limit)."""

from __future__ import annotations

import io
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
import requests
from PIL import Image

from flen_assets.review.server import MAX_BODY, create_app
from flen_assets.review.store import Partition, ReviewStore
from flen_resources.imaging import ImageRejected, decode_image
from tests_helpers import page_token, review_session

API = "/api/review/bench/v1/filtered_images"
PART = Partition.of("filtered_images", "bench", "v1")


def _parents(project, ids: list[str]) -> list[str]:
    """The source photos (parent ids) of the partition's images, as the items API reports them."""
    store = ReviewStore(project)
    return list(dict.fromkeys(p["id"] for i in store.items(PART) for p in i["parents"] if p["kind"] == "image"))


def _jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 40, 90)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# -- 1. undecodable image files ------------------------------------------------------------------

def _rejection(path) -> str:
    """The code the safe decoder refuses `path` with (what the server must report)."""
    with pytest.raises(ImageRejected) as info:
        decode_image(path)
    return info.value.code


@pytest.mark.parametrize("content", [
    b"Dear diary, this is not a photo.\n",     # a text file named .png
    _jpeg()[:300],                              # a truncated JPEG
    b"",
    _png_claiming(100_000, 100_000),            # a decompression bomb's header: refused, never decoded
], ids=["text", "truncated-jpeg", "empty", "bomb-header"])
def test_an_undecodable_source_photo_gets_415_not_500(review_server, content):
    url, project, ids = review_server
    parent = _parents(project, ids)[0]
    path = ReviewStore(project).image_path(parent)
    path.write_bytes(content)
    code = _rejection(path)
    for route in ("thumb", "image"):
        r = requests.get(f"{url}/{route}/{parent}", timeout=30)
        assert r.status_code == 415, (route, r.status_code, r.text)
        assert r.json() == {"error": f"not a decodable image ({code})"}
        assert path.name not in r.text and "Traceback" not in r.text
        assert "immutable" not in r.headers.get("cache-control", "")  # a refusal is never cached as the image
    assert not (project.state_dir / "cache" / "thumbs" / "256" / f"{parent}.jpg").exists()
    # The other images are still served.
    assert requests.get(f"{url}/thumb/{ids[0]}", timeout=30).status_code == 200


def test_a_truncated_candidate_gets_415_and_is_still_decidable(review_server):
    url, project, ids = review_server
    path = ReviewStore(project).image_path(ids[3])
    path.write_bytes(_jpeg((300, 200))[:-400])
    assert _rejection(path) == "corrupt"
    assert requests.get(f"{url}/thumb/{ids[3]}", timeout=30).json() == {"error": "not a decodable image (corrupt)"}
    assert requests.get(f"{url}/image/{ids[3]}", timeout=30).status_code == 415
    r = review_session(url).post(f"{url}{API}/decide", json={"ids": [ids[3]], "decision": "reject"}, timeout=30)
    assert r.status_code == 200 and r.json()["items"][0]["status"] == "rejected"


def test_a_repaired_file_is_served_again_with_its_real_media_type(review_server):
    """A refusal is not remembered past the file it was about: once the file is a real JPEG it is served."""
    url, project, ids = review_server
    parent = _parents(project, ids)[0]
    path = ReviewStore(project).image_path(parent)
    path.write_bytes(b"not yet")
    assert requests.get(f"{url}/image/{parent}", timeout=30).status_code == 415
    path.write_bytes(_jpeg())
    full = requests.get(f"{url}/image/{parent}", timeout=30)
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg" and full.content == path.read_bytes()
    thumb = requests.get(f"{url}/thumb/{parent}", timeout=30)
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size == (64, 48)


# -- 2. malformed JSON ---------------------------------------------------------------------------

def _post(url: str, path: str, body: bytes, token: str) -> requests.Response:
    return requests.post(f"{url}{API}/{path}", data=body, timeout=60,
                         headers={"Content-Type": "application/json", "X-Flen-Token": token})


@pytest.mark.parametrize("body, message", [
    (b"[" * 100_000, "JSON nested too deeply"),
    (b'{"a":' * 100_000, "JSON nested too deeply"),
    (b'{"ids": ' + b"[" * 100_000 + b"]" * 100_000 + b', "decision": "accept"}', "JSON nested too deeply"),
])
def test_deeply_nested_json_gets_400(review_server, body, message):
    url, _, _ = review_server
    token = page_token(url)
    for path in ("decide", "bulk"):
        r = _post(url, path, body, token)
        assert r.status_code == 400 and r.json() == {"error": message}, (path, r.status_code, r.text[:300])
    assert requests.get(f"{url}/healthz", timeout=10).ok


@pytest.mark.parametrize("body", [
    b"{", b"{'ids': []}", b"\xff\xfe{}", b"[]", b'"accept"', b"null", b"12", b"NaN",
    b'{"ids": "' + b"a" * 64 + b'", "decision": "accept"}',
    b'{"ids": [1, 2], "decision": "accept"}',
    b'{"ids": [null], "decision": "accept"}',
    b'{"ids": [], "decision": ["accept"]}',
    b'{"ids": [], "decision": {"accept": true}}',
    b'{"ids": {"a": 1}, "decision": "accept"}',
    b'{"ids": [], "decision": "accept", "x": ' + b"9" * 5000 + b"}",   # over Python's int digit limit
])
def test_malformed_decide_bodies_get_400(review_server, body):
    url, project, _ = review_server
    r = _post(url, "decide", body, page_token(url))
    assert r.status_code == 400 and "error" in r.json(), (body[:80], r.status_code, r.text[:300])
    assert ReviewStore(project).pending(PART) == 40


@pytest.mark.parametrize("score", [
    '"0.5"', "true", "null", "[0.5]", '{"v": 0.5}', "NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400,
])
def test_bulk_scores_that_are_not_finite_numbers_get_400(review_server, score):
    url, project, _ = review_server
    body = f'{{"decision": "accept", "side": "below", "score": {score}}}'.encode()
    r = _post(url, "bulk", body, page_token(url))
    assert r.status_code == 400 and "score" in r.json()["error"], (score, r.status_code, r.text[:300])
    assert ReviewStore(project).pending(PART) == 40


@pytest.mark.parametrize("fields", [
    '"decision": ["accept"], "side": "below", "score": 1',
    '"decision": "accept", "side": {"below": 1}, "score": 1',
    '"decision": "accept", "side": "below", "scope": [], "score": 1',
])
def test_bulk_fields_of_the_wrong_type_get_400(review_server, fields):
    url, project, _ = review_server
    r = _post(url, "bulk", f"{{{fields}}}".encode(), page_token(url))
    assert r.status_code == 400, r.text
    assert ReviewStore(project).pending(PART) == 40


def test_a_well_formed_bulk_still_decides(review_server):
    url, _, _ = review_server
    r = _post(url, "bulk", b'{"decision": "reject", "side": "above", "score": 0.55}', page_token(url))
    assert r.status_code == 200 and len(r.json()["previous"]) == 5


# -- 3. oversized bodies -------------------------------------------------------------------------

@contextmanager
def serving(app) -> Iterator[str]:
    """`app` served by a real uvicorn server in a thread on a free loopback port."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Received:
    """ASGI middleware that counts the request body bytes the app pulls from the server (what it
    could have buffered), per request path: it observes the real server's messages, it changes none."""

    def __init__(self, app):
        self.app = app
        self.bytes: dict[str, int] = {}
        self.largest: dict[str, int] = {}

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")

        async def counted():
            message = await receive()
            size = len(message.get("body", b""))
            self.bytes[path] = self.bytes.get(path, 0) + size
            self.largest[path] = max(self.largest.get(path, 0), size)
            return message

        await self.app(scope, counted, send)


def _head(url: str, path: str, token: str, length: int | None) -> bytes:
    host = urlsplit(url).netloc
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"X-Flen-Token: {token}\r\n{framing}\r\n\r\n").encode()


def _read_response(sock: socket.socket, timeout: float = 20) -> tuple[int, bytes]:
    """Status and raw bytes of the response on `sock` (up to its end or `timeout`)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1]), data


def test_a_declared_oversized_body_gets_413_before_any_of_it_is_sent(review_project):
    """Content-Length 400 MB: 413 comes back with no body byte sent, so none can have been read."""
    project, _ = review_project
    app = Received(create_app(project))
    with serving(app) as url:
        token = page_token(url)
        parts = urlsplit(url)
        for path in (f"{API}/decide", f"{API}/bulk"):
            with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
                sock.sendall(_head(url, path, token, 400_000_000))
                status, raw = _read_response(sock)
            assert status == 413, raw[:300]
            assert b"request body over" in raw
            assert app.bytes.get(path, 0) == 0
        # One byte over the limit is refused too; the limit itself is accepted as far as size goes.
        r = requests.post(f"{url}{API}/decide", data=b" " * (MAX_BODY + 1), timeout=30,
                          headers={"Content-Type": "application/json", "X-Flen-Token": token})
        assert r.status_code == 413
        padded = b'{"ids": [], "decision": "accept"}'.ljust(MAX_BODY, b" ")
        r = requests.post(f"{url}{API}/decide", data=padded, timeout=30,
                          headers={"Content-Type": "application/json", "X-Flen-Token": token})
        assert r.status_code == 200, r.text
    assert ReviewStore(project).pending(PART) == 40


def _send_chunked_until_answered(url: str, path: str, token: str, total: int, chunk: int = 64 * 1024) -> tuple[int, int]:
    """Send a chunked body of up to `total` bytes (never its final chunk) until the server answers;
    returns (status, bytes of body sent by then)."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=20)
    try:
        sock.sendall(_head(url, path, token, None))
        frame = f"{chunk:x}\r\n".encode() + b"[" * chunk + b"\r\n"
        pending, sent, deadline = b"", 0, time.time() + 60
        while time.time() < deadline:
            readable, writable, _ = select.select([sock], [sock] if sent < total else [], [], 1)
            if readable:
                return _read_response(sock)[0], sent
            if writable:
                if not pending:
                    pending, sent = frame, sent + chunk
                try:
                    pending = pending[sock.send(pending):]
                except (BrokenPipeError, ConnectionResetError):
                    return _read_response(sock)[0], sent
        raise AssertionError(f"no answer after {sent} bytes sent")
    finally:
        sock.close()


def test_a_chunked_oversized_body_gets_413_once_it_passes_the_limit(review_project):
    """No Content-Length: the server reads chunks only until the limit is passed (the limit plus one
    chunk at most), answers 413 while the client is still sending, and never waits for the end."""
    project, _ = review_project
    app = Received(create_app(project))
    total = 64 * MAX_BODY  # 128 MB offered; the old server would have read (and kept) all of it
    with serving(app) as url:
        token = page_token(url)
        for path in (f"{API}/decide", f"{API}/bulk"):
            status, sent = _send_chunked_until_answered(url, path, token, total)
            assert status == 413
            assert sent < total, "the server waited for the whole body"
            assert MAX_BODY < app.bytes[path] <= MAX_BODY + app.largest[path], (app.bytes[path], app.largest[path])
        assert requests.get(f"{url}/healthz", timeout=10).ok
    assert ReviewStore(project).pending(PART) == 40


def test_a_small_chunked_body_is_still_accepted(review_project):
    """Chunked bodies under the limit are read and decided as usual (requests sends a generator chunked)."""
    project, ids = review_project
    with serving(create_app(project)) as url:
        body = f'{{"ids": ["{ids[0]}"], "decision": "accept"}}'.encode()
        r = requests.post(f"{url}{API}/decide", data=iter([body[:10], body[10:]]), timeout=30,
                          headers={"Content-Type": "application/json", "X-Flen-Token": page_token(url)})
        assert r.status_code == 200, r.text
        assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert ReviewStore(project).statuses(PART)[ids[0]] == "accepted"
