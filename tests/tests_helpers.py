"""Small helpers shared by tests (imported as `tests_helpers`)."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flen_resources.project import Project


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def build_review_partition(project, n: int, *, character: str = "bench", iteration: str = "v1",
                           asset: str = "filtered_images", size: int = 48, parents: int = 4,
                           threshold: float = 0.5) -> list[str]:
    """A published-looking gated partition of `n` small generated PNGs, all pending review, registered
    in the lineage the way filtered_images registers them (images, edges from a few parent photos),
    with its manifest; the review page's tests and benchmark use it. Returns the candidate ids, in order."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from flen_resources.lineage import LineageStore, utcnow

    lineage = LineageStore(project.lineage_dir)
    now = utcnow()
    run_id = f"bench-{character}-{iteration}"
    stamp = {"run_id": run_id, "character": character, "iteration": iteration}
    rng = np.random.default_rng(0)

    def save(img: Image.Image, folder: Path) -> tuple[str, Path]:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        data = buf.getvalue()
        image_id = hashlib.sha256(data).hexdigest()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{image_id}.png"
        path.write_bytes(data)
        return image_id, path

    src_dir = project.partition_dir("source_images", character, iteration) / "images"
    parent_rows = []
    for p in range(parents):
        img = Image.fromarray(rng.integers(0, 255, (size * 2, size * 2, 3), dtype=np.uint8))
        pid, path = save(img, src_dir)
        parent_rows.append({**stamp, "asset": "source_images", "image_id": pid, "path": project.relative(path),
                            "original_name": f"photo_{p}.png", "width": size * 2, "height": size * 2,
                            "status": "accepted", "created_at": now})
    out_dir = project.partition_dir(asset, character, iteration)
    image_rows, edge_rows, manifest = [], [], []
    for i in range(n):
        arr = np.zeros((size, size, 3), dtype=np.uint8)
        arr[..., 0] = (i * 37) % 256
        arr[..., 1] = (i // 256 * 53) % 256
        arr[..., 2] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
        arr[i % size, :, :] = 255  # every image distinct
        image_id, path = save(Image.fromarray(arr), out_dir / "images")
        parent = parent_rows[i % parents]
        distance = round(0.2 + 0.4 * (i / max(1, n - 1)), 4)
        image_rows.append({**stamp, "asset": asset, "image_id": image_id, "path": project.relative(path),
                           "width": size, "height": size, "status": "generated", "created_at": now})
        edge_rows.append({**stamp, "asset": asset, "child_id": image_id, "parent_id": parent["image_id"],
                          "operation": "mirror", "params": "{}", "prompt": None, "seed": i, "model": "classic/1",
                          "created_at": now})
        manifest.append({"image_id": image_id, "image_path": f"images/{path.name}", "parent_id": parent["image_id"],
                         "parent_name": parent["original_name"], "recipe_id": f"edit-{i % 7}", "caption": "mirrored",
                         "accepted": False, "reason": "awaiting human review", "gate_reason": "passed all gates",
                         "failed_gates": "",
                         "review": "policy required: awaiting human review", "review_status": "pending",
                         "policy_status": "pending", "review_source": "policy", "identity_threshold": threshold,
                         "identity_distance": distance})
    lineage.append("images", parent_rows + image_rows)
    lineage.append("edges", edge_rows)
    pq.write_table(pa.Table.from_pylist(manifest), out_dir / "manifest.parquet")
    return [m["image_id"] for m in manifest]


# Ports handed out by this process: xdist workers each take their own block below Linux's ephemeral range
# (32768-60999), so two workers, or a worker and an outgoing connection, never probe the same port.
_PORTS_PER_WORKER = 400
_next_ports: Iterator[int] | None = None


def free_port() -> int:
    """A port of 127.0.0.1 that is free now: this xdist worker's next one, else one the kernel picks."""
    global _next_ports
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    if not worker.startswith("gw"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    if _next_ports is None:
        start = 20000 + _PORTS_PER_WORKER * (int(worker[2:]) % 30)  # replaced workers count on: wrap
        _next_ports = itertools.cycle(range(start, start + _PORTS_PER_WORKER))
    for _ in range(_PORTS_PER_WORKER):
        port = next(_next_ports)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # taken: the next one
                continue
            return port
    raise RuntimeError(f"no free port in {worker}'s block of {_PORTS_PER_WORKER}")


def page_token(url: str, character: str = "bench", iteration: str = "v1", asset: str = "filtered_images") -> str:
    """The session token a review page embeds (what review.js sends as X-Flen-Token with each POST)."""
    import json
    import re

    import requests

    page = requests.get(f"{url}/review/{character}/{iteration}/{asset}", timeout=30)
    page.raise_for_status()
    config = re.search(r'<script id="flen-config" type="application/json">(.*?)</script>', page.text, re.S)
    return json.loads(config.group(1))["token"]


def review_session(url: str, character: str = "bench", iteration: str = "v1", asset: str = "filtered_images"):
    """A requests.Session that sends the page's token with every request, as the page's script does."""
    import requests

    session = requests.Session()
    session.headers["X-Flen-Token"] = page_token(url, character, iteration, asset)
    return session


@contextmanager
def running_server(project: Project, host: str = "127.0.0.1", **app_options) -> Iterator[str]:
    """The review app served by uvicorn in a thread (the same app `flen review` serves)."""
    import threading
    import time

    import uvicorn

    from flen_assets.review.server import create_app

    # uvicorn binds port 0 itself and the bound port is read back: no window for another process to
    # take a port picked beforehand.
    server = uvicorn.Server(uvicorn.Config(create_app(project, host=host, port=0, **app_options), host=host, port=0,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("review server did not start")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
