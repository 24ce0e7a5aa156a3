"""The review page over HTTP (a real uvicorn server): pages, the items API, decisions, and the
safety rules: unknown ids and path traversal get 404, foreign Host/Origin and non-JSON posts are refused."""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

import pytest
import requests

from flen_assets.review.store import Partition, ReviewStore
from tests_helpers import page_token, review_session, running_server

API = "/api/review/bench/v1/filtered_images"


def raw_get(url: str, path: str, host: str | None = None) -> int:
    """GET with a path sent byte for byte (requests would normalise '..' away) and an optional Host."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.putrequest("GET", path, skip_host=host is not None, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    status = conn.getresponse().status
    conn.close()
    return status


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on `port` (from /proc/net/tcp and tcp6)."""
    import ipaddress

    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = open(table).read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            addr_hex, port_hex = fields[1].split(":")
            if int(port_hex, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(addr_hex)  # 32-bit words in host (little-endian) order
            raw = b"".join(raw[k:k + 4][::-1] for k in range(0, width, 4))
            found.add(str(ipaddress.ip_address(raw)))
    return found


def test_page_and_items(review_server):
    url, project, ids = review_server
    page = requests.get(f"{url}/review/bench/v1/filtered_images", timeout=10)
    assert page.status_code == 200 and "FLENwheel review" in page.text and "bench v1" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    data = requests.get(f"{url}{API}/items", params={"status": "pending", "limit": 15}, timeout=10).json()
    assert data["total"] == 40 and len(data["items"]) == 15 and data["counts"]["pending"] == 40
    item = data["items"][0]
    assert item["id"] == ids[0] and item["parents"][0]["kind"] == "image"
    by_distance = requests.get(f"{url}{API}/items", params={"status": "all", "sort": "-distance", "limit": 3},
                               timeout=10).json()["items"]
    assert by_distance[0]["distance"] == pytest.approx(0.6)
    assert requests.get(f"{url}/", timeout=10).status_code == 200
    for name in ("review.js", "review.css"):
        assert requests.get(f"{url}/static/{name}", timeout=10).status_code == 200


def test_images_and_thumbnails(review_server):
    url, project, ids = review_server
    full = requests.get(f"{url}/image/{ids[0]}", timeout=10)
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    assert full.content == ReviewStore(project).image_path(ids[0]).read_bytes()
    thumb = requests.get(f"{url}/thumb/{ids[0]}", timeout=10)
    assert thumb.status_code == 200 and thumb.content[:2] == b"\xff\xd8"
    assert (project.state_dir / "cache" / "thumbs" / "256" / f"{ids[0]}.jpg").is_file()


def test_decide_bulk_and_persist(review_server):
    url, project, ids = review_server
    session = review_session(url)
    r = session.post(f"{url}{API}/decide", json={"ids": ids[:2], "decision": "accept"}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["counts"]["accepted"] == 2 and [p["previous"] for p in body["previous"]] == [None, None]
    r = session.post(f"{url}{API}/bulk", json={"decision": "reject", "side": "above", "score": 0.55}, timeout=10)
    assert r.status_code == 200 and len(r.json()["previous"]) == 5
    statuses = ReviewStore(project).statuses(Partition.of("filtered_images", "bench", "v1"))
    assert list(statuses.values()).count("rejected") == 5 and statuses[ids[0]] == "accepted"


@pytest.mark.parametrize("path", [
    "/image/" + "0" * 64,                       # well-formed, unknown
    "/image/not-an-id", "/thumb/" + "e" * 64,
    "/image/..%2f..%2fetc%2fpasswd", "/image/../../etc/passwd", "/thumb/%2e%2e/%2e%2e/etc/passwd",
    "/static/../../pyproject.toml", "/static/..%2f..%2fpyproject.toml", "/static/review.html",
    "/review/bench/v1/training_set", "/review/..%2f..%2fetc/v1/filtered_images", "/review/bench/v0/filtered_images",
    "/review/bench/v9/filtered_images",         # valid names, nothing published
    API.replace("bench", "Bench") + "/items", "/nothing/here",
    API.replace("v1", "v9") + "/items",         # API of a valid but unpublished partition, like its page
    "/api/review/nobody/v1/filtered_images/items", "/api/review/bench/v1/synthetic_batch/items",
])
def test_unknown_and_traversal_get_404(review_server, path):
    url, _, _ = review_server
    assert raw_get(url, path) == 404


def test_unknown_ids_in_decisions_get_404(review_server):
    url, project, ids = review_server
    r = review_session(url).post(f"{url}{API}/decide", json={"ids": [ids[0], "../../etc/passwd"], "decision": "accept"},
                      timeout=10)
    assert r.status_code == 404
    assert ReviewStore(project).statuses(Partition.of("filtered_images", "bench", "v1"))[ids[0]] == "pending"


def test_foreign_hosts_origins_and_forms_are_refused(review_server):
    url, project, ids = review_server
    assert raw_get(url, "/", host="evil.example:8765") == 400  # DNS rebinding
    assert raw_get(url, "/", host="localhost") == 200
    session = review_session(url)
    cross = session.post(f"{url}{API}/decide", json={"ids": ids[:1], "decision": "accept"},
                         headers={"Origin": "http://evil.example"}, timeout=10)
    assert cross.status_code == 403
    form = session.post(f"{url}{API}/decide", data={"ids": ids[0], "decision": "accept"}, timeout=10)
    assert form.status_code == 415
    same = session.post(f"{url}{API}/decide", json={"ids": ids[:1], "decision": "accept"},
                        headers={"Origin": url}, timeout=10)
    assert same.status_code == 200
    bad = session.post(f"{url}{API}/decide", json={"ids": ids[:1], "decision": "maybe"}, timeout=10)
    assert bad.status_code == 400


def test_posts_need_the_session_token(review_server):
    """A decision needs the token the served page embeds: without it, or with another, 403."""
    url, project, ids = review_server
    token = page_token(url)
    assert len(token) >= 32 and token == page_token(url), "one token per server"
    for headers in ({}, {"X-Flen-Token": ""}, {"X-Flen-Token": "x" * len(token)}, {"X-Flen-Token": token + "x"}):
        for path, body in (("decide", {"ids": ids[:1], "decision": "accept"}),
                           ("bulk", {"decision": "accept", "side": "below", "score": 9.0})):
            r = requests.post(f"{url}{API}/{path}", json=body, headers={"Origin": url, **headers}, timeout=10)
            assert r.status_code == 403, (headers, path, r.text)
    assert ReviewStore(project).pending(Partition.of("filtered_images", "bench", "v1")) == 40
    ok = requests.post(f"{url}{API}/decide", json={"ids": ids[:1], "decision": "accept"},
                       headers={"X-Flen-Token": token}, timeout=10)
    assert ok.status_code == 200


def test_any_interface_still_checks_the_host(review_project):
    """Bound to 0.0.0.0 the page answers loopback names, the bound host and --allowed-host names only:
    a rebinding attacker's name (evil.example) is refused."""
    project, _ = review_project
    with running_server(project, host="0.0.0.0", allowed_hosts=("review.lan",)) as url:
        local = url.replace("0.0.0.0", "127.0.0.1")
        port = urlsplit(url).port
        assert listening_addresses(port) == {"0.0.0.0"}  # what the loopback test would catch
        assert raw_get(local, "/", host=f"evil.example:{port}") == 400
        assert raw_get(local, "/", host="evil.example") == 400
        for ok in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"0.0.0.0:{port}", f"review.lan:{port}"):
            assert raw_get(local, "/", host=ok) == 200, ok


def test_cli_serves_on_loopback(review_project):
    """`flen review` binds 127.0.0.1 by default and prints the page's URL."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests_helpers import free_port

    project, ids = review_project
    env = {**os.environ, "FLEN_PROJECT_DIR": str(project.root), "PYTHONWARNINGS": "ignore"}
    for attempt in range(5):  # a port picked beforehand may be taken meanwhile: then pick another
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "flen_assets", "review", "bench", "--port", str(port)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        if proc.poll() is None:
            break
        early = proc.communicate(timeout=20)[0]
        assert "address already in use" in early.lower(), f"flen review did not start:\n{early[-3000:]}"
    else:
        pytest.fail("no free port in 5 attempts")
    try:
        assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10).ok, "flen review did not start"
        assert requests.get(f"http://127.0.0.1:{port}/review/bench/v1/filtered_images", timeout=10).ok
        # Bound to loopback only: the listening socket's own address, as the kernel reports it.
        assert listening_addresses(port) == {"127.0.0.1"}
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out = proc.communicate(timeout=20)[0]
    assert f"http://127.0.0.1:{port}/review/bench/v1/filtered_images" in out and "40 image(s) pending" in out


def test_a_missing_file_is_shown_and_decided_but_gets_404(review_project):
    project, ids = review_project
    ReviewStore(project).image_path(ids[5]).unlink()
    with running_server(project) as url:
        items = requests.get(f"{url}{API}/items", params={"status": "all", "limit": 100}, timeout=10).json()
        assert items["counts"]["all"] == 40
        missing = [i for i in items["items"] if i["file_missing"]]
        assert [i["id"] for i in missing] == [ids[5]]
        assert raw_get(url, f"/image/{ids[5]}") == 404 and raw_get(url, f"/thumb/{ids[5]}") == 404
        r = review_session(url).post(f"{url}{API}/decide", json={"ids": [ids[5]], "decision": "reject"}, timeout=10)
        assert r.status_code == 200 and r.json()["items"][0]["status"] == "rejected"


def test_decisions_for_unpublished_partitions_get_404(review_server):
    url, project, ids = review_server
    session = review_session(url)
    for api in (API.replace("v1", "v9"), "/api/review/nobody/v1/filtered_images",
                "/api/review/bench/v1/synthetic_batch"):
        assert session.post(f"{url}{api}/decide", json={"ids": [], "decision": "accept"}, timeout=10).status_code == 404
        assert session.post(f"{url}{api}/bulk", json={"decision": "accept", "side": "below", "score": 1.0},
                            timeout=10).status_code == 404


def test_cli_refuses_a_folder_that_is_not_a_project(tmp_path):
    """`flen review` in the wrong folder says so and leaves it alone (no git, DVC or Dagster set up)."""
    from conftest import run_flen

    elsewhere = tmp_path / "holiday-photos"
    elsewhere.mkdir()
    (elsewhere / "beach.jpg").write_bytes(b"not really")
    result = run_flen("review", "--port", "1", project=elsewhere, check=False, timeout=120)
    assert result.returncode == 1
    assert f"{elsewhere} is not a FLENwheel project" in result.stderr.replace("\n", "")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["beach.jpg"]
