"""Benchmark: the review page with 5,000 pending images — page load and decision latency.

    .venv/bin/python benchmarks/review_page.py                 # 5,000 images, HTTP + browser
    .venv/bin/python benchmarks/review_page.py --images 500 --no-browser

Builds a throwaway project with N small generated PNGs registered in the lineage as a pending
filtered_images partition (tests_helpers.build_review_partition: images, parent edges, manifest),
starts the real `flen review` in its own process and measures, as a client on 127.0.0.1:
  * HTTP: the first items request after start (loads every candidate: manifest + lineage query),
    then warm; "first list" = page HTML + script + style + first page of items, as a browser fetches them;
    the first page's thumbnails cold (generated) and warm (cached);
  * browser (Debian chromium, fresh profile): navigation start -> first grid rendered
    (window.__flenFirstRender), and -> every thumbnail in view loaded (the others load lazily on scroll;
    polled every 10 ms);
  * decisions: POST round trips of single accepts (each appends one Parquet file to the lineage),
    p50/p95, then the items request with those files present, and a bulk decision by distance;
  * after many (--many, 3,000) decisions in all: the decision round trip and warm items request
    (the store compacts the decisions table every 500 decisions);
  * restart: a fresh `flen review` (it compacts the lineage on start) and its first items request.
Prints the figures and writes them with the machine and the command line to
benchmarks/results/review_page-<hostname>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CHARACTER, ITERATION, ASSET = "bench", "v1", "filtered_images"
PAGE_SIZE = 120  # what review.js asks for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=5000, help="pending images in the partition (5000)")
    ap.add_argument("--decisions", type=int, default=200, help="single decisions to time (200)")
    ap.add_argument("--many", type=int, default=3000, help="decisions in all before the 'after many' figures (3000)")
    ap.add_argument("--repeat", type=int, default=10, help="repeats of the warm HTTP and browser loads (10)")
    ap.add_argument("--no-browser", action="store_true", help="skip the chromium measurements")
    ap.add_argument("--keep", type=Path, default=None, help="build the project here and keep it")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/review_page-<host>.json)")
    return ap.parse_args(argv)


def load_helpers():
    """tests/tests_helpers.py, by path (a `tests` folder on sys.path would shadow the package)."""
    spec = importlib.util.spec_from_file_location("tests_helpers", REPO / "tests" / "tests_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def summary(values: list[float]) -> dict:
    return {"p50_ms": ms(pct(values, 50)), "p95_ms": ms(pct(values, 95)), "mean_ms": ms(statistics.fmean(values)),
            "max_ms": ms(max(values)), "n": len(values)}


def machine_info() -> dict:
    import duckdb
    import starlette
    import uvicorn

    info = {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "platform": platform.platform(), "duckdb": duckdb.__version__, "starlette": starlette.__version__,
            "uvicorn": uvicorn.__version__}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
    except OSError:
        pass
    return info


class ReviewServer:
    """`flen review` in its own process (as a user starts it), stopped with SIGINT."""

    def __init__(self, project: Path):
        self.project = project
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ReviewServer":
        env = {**os.environ, "FLEN_PROJECT_DIR": str(self.project), "PYTHONWARNINGS": "ignore"}
        self.proc = subprocess.Popen([sys.executable, "-m", "flen_assets", "review", "--port", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True, cwd=REPO)
        deadline = time.time() + 60
        while True:
            try:
                if requests.get(f"{self.url}/healthz", timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"flen review did not start: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def decision_files(lineage_dir: Path) -> list[Path]:
    return [p for p in (lineage_dir / "decisions").glob("*.parquet") if p.name != "_schema.parquet"]


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def http_figures(server: ReviewServer, session: requests.Session, repeat: int) -> dict:
    page = f"/review/{CHARACTER}/{ITERATION}/{ASSET}"
    api = f"/api/review/{CHARACTER}/{ITERATION}/{ASSET}"
    items_url = f"{server.url}{api}/items?status=pending&offset=0&limit={PAGE_SIZE}"
    cold, first = timed(lambda: session.get(items_url, timeout=120))
    assert first.ok and first.json()["total"] > 0, first.text[:500]

    def first_list() -> requests.Response:
        for path in (page, "/static/review.js", "/static/review.css"):
            assert session.get(server.url + path, timeout=30).ok
        return session.get(items_url, timeout=30)

    warm_items = [timed(lambda: session.get(items_url, timeout=30))[0] for _ in range(repeat)]
    warm_list = [timed(first_list)[0] for _ in range(repeat)]
    ids = [i["id"] for i in first.json()["items"]]
    thumbs_cold = timed(lambda: [session.get(f"{server.url}/thumb/{i}", timeout=30).raise_for_status() for i in ids])[0]
    thumbs_warm = timed(lambda: [session.get(f"{server.url}/thumb/{i}", timeout=30).raise_for_status() for i in ids])[0]
    payload = len(first.content)
    return {"items_first_request_ms": ms(cold), "items_warm": summary(warm_items),
            "first_list_http": summary(warm_list), "items_page_bytes": payload,
            f"thumbs_first_page_cold_ms ({len(ids)})": ms(thumbs_cold),
            f"thumbs_first_page_warm_ms ({len(ids)})": ms(thumbs_warm)}


def browser_figures(server: ReviewServer, repeat: int) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    os.environ.setdefault("SE_OFFLINE", "true")  # Debian's chromium + chromedriver, nothing fetched
    profile = tempfile.mkdtemp(prefix="flen-bench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1440,900", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    page = f"{server.url}/review/{CHARACTER}/{ITERATION}/{ASSET}"
    visible_done = ("const t = [...document.querySelectorAll('.tile img')].filter(i => {"
                    "const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight; });"
                    "return t.length > 0 && t.every(i => i.complete && i.naturalWidth > 0)")
    first_render, visible, tiles = [], [], 0
    try:
        for _ in range(repeat):
            driver.get(page)
            WebDriverWait(driver, 60, poll_frequency=0.01).until(
                lambda d: d.execute_script("return document.body.dataset.ready") == "1")
            first_render.append(driver.execute_script("return window.__flenFirstRender") / 1000)
            WebDriverWait(driver, 60, poll_frequency=0.01).until(lambda d: d.execute_script(visible_done))
            visible.append(driver.execute_script("return performance.now()") / 1000)
            tiles = driver.execute_script("return document.querySelectorAll('.tile').length")
    finally:
        driver.quit()
    return {"first_list_render": summary(first_render), "visible_thumbnails_loaded": summary(visible),
            "tiles_rendered": tiles, "first_load_render_ms": ms(first_render[0])}


def decision_figures(server: ReviewServer, session: requests.Session, n: int, ids: list[str]) -> dict:
    api = f"{server.url}/api/review/{CHARACTER}/{ITERATION}/{ASSET}"
    rounds = []
    for image_id in ids[:n]:
        elapsed, r = timed(lambda: session.post(f"{api}/decide", json={"ids": [image_id], "decision": "accept"},
                                                timeout=30))
        assert r.ok, r.text
        rounds.append(elapsed)
    after, r = timed(lambda: session.get(f"{api}/items?status=pending&limit={PAGE_SIZE}", timeout=30))
    assert r.json()["counts"]["accepted"] == n
    bulk, r = timed(lambda: session.post(f"{api}/bulk", json={"decision": "reject", "side": "above", "score": 0.5},
                                         timeout=120))
    assert r.ok, r.text
    return {"decide_round_trip": summary(rounds), f"items_after_{n}_decisions_ms": ms(after),
            "bulk_reject_above_0.5_ms": ms(bulk), "bulk_images": len(r.json()["previous"])}


def many_decision_figures(server: ReviewServer, session: requests.Session, done: int, many: int, ids: list[str],
                          lineage_dir: Path, timed_n: int = 200) -> dict:
    """Single decisions until `many` were made in all, then `timed_n` more timed, and the items request:
    the latency after thousands of decisions (the store compacts every 500)."""
    api = f"{server.url}/api/review/{CHARACTER}/{ITERATION}/{ASSET}"

    def decide(k: int) -> float:
        body = {"ids": [ids[k % len(ids)]], "decision": "accept" if k % 2 else "reject"}
        elapsed, r = timed(lambda: session.post(f"{api}/decide", json=body, timeout=30))
        assert r.ok, r.text
        return elapsed

    for k in range(done, many):
        decide(k)
    rounds = [decide(many + k) for k in range(timed_n)]
    items = [timed(lambda: session.get(f"{api}/items?status=all&limit={PAGE_SIZE}", timeout=30))[0] for _ in range(10)]
    return {f"decide_round_trip_after_{many}_decisions": summary(rounds),
            f"items_warm_after_{many}_decisions": summary(items),
            "decision_files": len(decision_files(lineage_dir))}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    helpers = load_helpers()
    from flen_resources.project import Project

    root = args.keep or Path(tempfile.mkdtemp(prefix="flen-review-bench-")) / "project"
    root.mkdir(parents=True, exist_ok=True)
    project = Project(root)
    build_s, ids = timed(lambda: helpers.build_review_partition(project, args.images))
    print(f"built {len(ids)} pending images in {build_s:.1f}s under {root}", flush=True)
    result: dict = {"benchmark": "review_page", "params": {"images": args.images, "decisions": args.decisions,
                                                          "repeat": args.repeat, "page_size": PAGE_SIZE},
                    "machine": machine_info(), "command": " ".join([Path(sys.executable).name, *sys.argv]),
                    "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with ReviewServer(root) as server:
        session = helpers.review_session(server.url, CHARACTER, ITERATION, ASSET)  # the page's POST token
        result["http"] = http_figures(server, session, args.repeat)
        print("http:", json.dumps(result["http"]), flush=True)
        if not args.no_browser:
            result["browser"] = browser_figures(server, args.repeat)
            print("browser:", json.dumps(result["browser"]), flush=True)
        result["decisions"] = decision_figures(server, session, args.decisions, ids)
        print("decisions:", json.dumps(result["decisions"]), flush=True)
        result["many_decisions"] = many_decision_figures(server, session, args.decisions + 1, args.many, ids,
                                                         project.lineage_dir)
        print("many decisions:", json.dumps(result["many_decisions"]), flush=True)
    # A fresh server meets the decision files the first one left; it compacts the lineage on start.
    files_before = len(decision_files(project.lineage_dir))
    start_s, server = timed(lambda: ReviewServer(root).__enter__())
    try:
        session = requests.Session()
        cold, r = timed(lambda: session.get(
            f"{server.url}/api/review/{CHARACTER}/{ITERATION}/{ASSET}/items?limit={PAGE_SIZE}", timeout=120))
        assert r.ok
        n_decided = r.json()["counts"]["human"]
        result["restart"] = {f"items_first_request_after_{args.many}_decisions_ms": ms(cold),
                             "start_to_healthy_ms (compaction + imports)": ms(start_s),
                             "decision_files_before_start": files_before,
                             "decision_files_after_start": len(decision_files(project.lineage_dir)),
                             "human_decided_images": n_decided}
        print("restart:", json.dumps(result["restart"]), flush=True)
    finally:
        server.__exit__(None, None, None)
    out = args.out or RESULTS / f"review_page-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
