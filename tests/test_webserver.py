"""`flen ui` serves the Dagster UI on the demo project: the asset graph and the training set's metadata
through the webserver's GraphQL API, exactly as the README tells a user to start it.

The server runs once per launch mode (module-scoped, parametrized):
  * module:    the demo project has no workspace.yaml, so `flen ui` writes .flen/workspace.yaml;
  * workspace: the checkout's workspace.yaml is copied into the project root (removed afterwards),
               so `flen ui` runs `-w <root>/workspace.yaml` (location `flenwheel`), as in the checkout.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from flen_assets.partitions import partition_key
from flen_resources.project import Project
from tests_helpers import free_port

FLEN = [sys.executable, "-m", "flen_assets"]
REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_DEADLINE_S = 300  # the webserver and its code location, on a CI box shared with other test workers
CHARACTER, ITERATION = "astronaut", "v1"

posix_only = pytest.mark.skipif(os.name != "posix", reason="process-group teardown needs POSIX")

WORKSPACE_QUERY = """
{ workspaceOrError { __typename
    ... on Workspace { locationEntries { name loadStatus
        locationOrLoadError { __typename ... on PythonError { message stack } } } }
    ... on PythonError { message } } }
"""

ASSET_GRAPH_QUERY = """
{ assetNodes { assetKey { path } dependencyKeys { path } groupName isPartitioned
    repository { location { name } } } }
"""

MATERIALIZATION_QUERY = """
query Latest($path: [String!]!, $partitions: [String!]) {
  assetOrError(assetKey: {path: $path}) {
    __typename
    ... on Asset {
      assetMaterializations(partitions: $partitions, limit: 1) {
        partition runId timestamp
        metadataEntries {
          __typename label
          ... on MarkdownMetadataEntry { mdStr }
          ... on TextMetadataEntry { text }
          ... on IntMetadataEntry { intValue intRepr }
          ... on PathMetadataEntry { path }
        }
      }
    }
    ... on AssetNotFoundError { message }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) { runOrError(runId: $runId) { __typename ... on Run { status jobName tags { key value } } } }
"""


@dataclass
class Server:
    mode: str
    port: int
    proc: subprocess.Popen
    log: Path
    location: str

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        resp = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        assert resp.status_code == 200, f"GraphQL HTTP {resp.status_code}: {resp.text[:2000]}"
        body = resp.json()
        assert not body.get("errors"), f"GraphQL errors: {body['errors']}"
        return body["data"]


def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's whole process group (webserver + its code server), then reap it."""
    if proc.poll() is None:
        for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
    # The code server shares the group; make sure nothing of it outlives the test.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_ready(server: Server, deadline: float) -> str | None:
    """Poll until the webserver answers and its code location is loaded. None when ready, else why not."""
    answered = False
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return f"`flen ui` exited with {server.proc.returncode}"
        try:
            if not answered:
                answered = requests.get(f"{server.url}/server_info", timeout=5).status_code == 200
            if answered:
                ws = server.graphql(WORKSPACE_QUERY)["workspaceOrError"]
                assert ws["__typename"] == "Workspace", ws
                entries = {e["name"]: e for e in ws["locationEntries"]}
                entry = entries.get(server.location)
                assert entry is not None, f"code location {server.location!r} not served; got {sorted(entries)}"
                loaded = entry["locationOrLoadError"]
                if loaded and loaded["__typename"] == "PythonError":
                    pytest.fail(f"code location {server.location} failed to load:\n{loaded['message']}\n{loaded['stack']}")
                if entry["loadStatus"] == "LOADED" and loaded and loaded["__typename"] == "RepositoryLocation":
                    return None
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return f"no ready answer within {START_DEADLINE_S}s"


@pytest.fixture(scope="module", params=["module", "workspace"])
def webserver(request: pytest.FixtureRequest, demo_project: Project, tmp_path_factory: pytest.TempPathFactory):
    """`flen ui --port N` on the demo project, ready to answer GraphQL; always torn down."""
    if os.name != "posix":
        pytest.skip("process-group teardown needs POSIX")
    mode = request.param
    root = demo_project.root
    workspace = root / "workspace.yaml"
    copied = False
    if mode == "workspace":
        assert not workspace.exists(), "the demo project unexpectedly has a workspace.yaml"
        shutil.copyfile(REPO_ROOT / "workspace.yaml", workspace)
        copied = True
        location = yaml.safe_load(workspace.read_text())["load_from"][0]["python_module"]["location_name"]
    else:
        assert not workspace.exists(), "the demo project must have no workspace.yaml for the generated path"
        location = "flenwheel"

    env = {**os.environ, "FLEN_PROJECT_DIR": str(root), "DAGSTER_HOME": str(root / ".flen" / "dagster"),
           "PYTHONWARNINGS": "ignore"}
    logs = tmp_path_factory.mktemp(f"webserver-{mode}")
    server: Server | None = None
    try:
        for attempt in range(3):  # a free port can be taken between probing and binding: retry on another
            port = free_port()
            log = logs / f"ui-{attempt}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen([*FLEN, "ui", "--port", str(port)], env=env, cwd=root, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            server = Server(mode, port, proc, log, location)
            why = _wait_ready(server, time.monotonic() + START_DEADLINE_S)
            if why is None:
                break
            _stop(proc)
            if "address already in use" in server.log_text().lower() and attempt < 2:
                continue
            pytest.fail(f"{why} (mode {mode}, port {port}); log:\n{server.log_text()[-6000:]}")
        yield server
    finally:
        if server is not None:
            _stop(server.proc)
        if copied:
            workspace.unlink(missing_ok=True)


def _listen_addresses(port: int) -> set[str]:
    """IPv4/IPv6 addresses with a socket listening on `port` (Linux /proc, else psutil)."""
    found: set[str] = set()
    proc_net = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]
    if proc_net[0].exists():
        for table in proc_net:
            if not table.exists():
                continue
            for line in table.read_text().splitlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                addr_hex, port_hex = local.split(":")
                if state != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                    continue
                raw = bytes.fromhex(addr_hex)
                if len(raw) == 4:
                    found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                    found.add(socket.inet_ntop(socket.AF_INET6, words))
        return found
    psutil = pytest.importorskip("psutil")
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
            found.add(conn.laddr.ip)
    return found


@pytest.mark.slow
@posix_only
def test_ui_binds_loopback_only(webserver: Server) -> None:
    log = webserver.log_text()
    assert f"Dagster UI on http://127.0.0.1:{webserver.port}" in log, log[-3000:]
    assert f"Serving dagster-webserver on http://127.0.0.1:{webserver.port}" in log, log[-3000:]
    assert _listen_addresses(webserver.port) == {"127.0.0.1"}, "flen ui must bind loopback only by default"
    info = requests.get(f"{webserver.url}/server_info", timeout=10).json()
    assert info["dagster_version"].startswith("1.13"), info


@pytest.mark.slow
@posix_only
def test_ui_serves_asset_graph(webserver: Server) -> None:
    nodes = webserver.graphql(ASSET_GRAPH_QUERY)["assetNodes"]
    graph = {"/".join(n["assetKey"]["path"]): n for n in nodes}
    expected_groups = {"source_images": "sources", "identity_reference": "sources", "enriched_images": "enrichment",
                       "filtered_images": "curation", "training_set": "curation"}
    assert set(expected_groups) <= set(graph), sorted(graph)
    for asset, group in expected_groups.items():
        node = graph[asset]
        assert node["groupName"] == group, (asset, node["groupName"])
        assert node["isPartitioned"], asset
        assert node["repository"]["location"]["name"] == webserver.location, (asset, node["repository"])

    deps = {asset: {"/".join(d["path"]) for d in graph[asset]["dependencyKeys"]} for asset in expected_groups}
    assert deps == {
        "source_images": set(),
        "identity_reference": {"source_images"},
        "enriched_images": {"source_images"},
        "filtered_images": {"source_images", "identity_reference", "enriched_images"},
        "training_set": {"source_images", "identity_reference", "enriched_images", "filtered_images"},
    }


@pytest.mark.slow
@posix_only
def test_ui_shows_training_set_materialization(webserver: Server, demo_project: Project) -> None:
    key = str(partition_key(CHARACTER, ITERATION))
    assert key == "astronaut|v1"  # MultiPartitionKey: dimension values joined by '|', dimensions sorted by name
    data = webserver.graphql(MATERIALIZATION_QUERY, {"path": ["training_set"], "partitions": [key]})["assetOrError"]
    assert data["__typename"] == "Asset", data
    mats = data["assetMaterializations"]
    assert len(mats) == 1, mats
    mat = mats[0]
    assert mat["partition"] == key
    meta = {e["label"]: e for e in mat["metadataEntries"]}
    assert {"dvc_md5", "images", "contact_sheet"} <= set(meta), sorted(meta)

    # dvc_md5: the directory hash DVC recorded for the published partition folder.
    assert meta["dvc_md5"]["__typename"] == "TextMetadataEntry", meta["dvc_md5"]
    md5 = meta["dvc_md5"]["text"]
    assert re.fullmatch(r"[0-9a-f]{32}\.dir", md5), md5
    folder = demo_project.partition_dir("training_set", CHARACTER, ITERATION)
    dvc_file = folder.with_name(folder.name + ".dvc")
    assert yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"] == md5

    # images: the number of image files in the training set folder.
    assert meta["images"]["__typename"] == "IntMetadataEntry", meta["images"]
    n_images = meta["images"]["intValue"]
    assert n_images > 0
    assert n_images == len(list((folder / "images").glob("*.png")))

    # contact_sheet: markdown with an inline thumbnail the UI renders.
    assert meta["contact_sheet"]["__typename"] == "MarkdownMetadataEntry", meta["contact_sheet"]
    assert re.match(r"!\[[^\]]*\]\(data:image/(jpeg|png);base64,", meta["contact_sheet"]["mdStr"]), \
        meta["contact_sheet"]["mdStr"][:200]

    run = webserver.graphql(RUN_QUERY, {"runId": mat["runId"]})["runOrError"]
    assert run["__typename"] == "Run", run
    assert run["status"] == "SUCCESS"
    assert run["jobName"] in ("training_set_job", "flywheel_job")  # the latest run of the shared demo project


def test_ui_help_documents_loopback_default(tmp_path: Path) -> None:
    env = {**os.environ, "FLEN_PROJECT_DIR": str(tmp_path), "DAGSTER_HOME": str(tmp_path / ".flen" / "dagster"),
           "PYTHONWARNINGS": "ignore", "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    proc = subprocess.run([*FLEN, "ui", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", proc.stdout).split())
    assert re.search(r"--host\b[^-]*\[default: 127\.0\.0\.1\]", text), proc.stdout
    assert "binds 127.0.0.1" in text, proc.stdout
    assert not (tmp_path / ".flen").exists(), "--help must not initialise a project"
