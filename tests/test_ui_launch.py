"""`flen ui` runs what the UI launches (issue 13): it starts dagster-webserver and dagster-daemon together,
as `dagster dev` does, and stops both on Ctrl+C; runs of one character go one at a time, in order.

One `flen ui` serves a fresh project (two characters of three photos each, v1..v3 registered) for the
whole module. To stay fast, the runs materialize `source_images` only: it is the cheapest asset that
reads its own previous iteration (vN carries v(N-1)'s rows), so it shows whether vN read a finished v(N-1).
  * a headless chromium clicks Materialize for astronaut|v1, then launches a backfill of astronaut v2, v3
    from the same dialog, while v1 still runs; the daemon runs all three, one after the other;
  * a backfill of bob v1..v3, launched through the GraphQL API (what the dialog calls) as soon as v1 is
    launched, runs beside them;
  * Ctrl+C stops the webserver, the daemon and everything they started; a webserver that cannot start
    stops the daemon too, and `flen ui` says which one died and its last lines.
Run records (start and end of each run) and lineage (which v(N-1) version each vN read) prove the order.

FLEN_UI_SCREENSHOTS=DIR keeps the screenshots there (docs/ui-launch.png, docs/ui-backfill-running.png,
docs/ui-backfill.png, docs/ui-launchpad-settings.png were made with FLEN_UI_SCREENSHOTS=docs); by default
they go to a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
from conftest import shared_project

from flen_assets.demo_data import sample_files
from flen_assets.instance import CHARACTER_TAG, get_instance
from flen_assets.partitions import add_partitions
from flen_assets.runs import init_project
from flen_resources.lineage import LineageStore
from flen_resources.project import Project
from tests_helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")]

FLEN = [sys.executable, "-m", "flen_assets"]
HOST = "127.0.0.1"
PHOTOS = ("portrait.jpg", "closeup.png", "side_light.jpg")  # enough_sources wants three
ITERATIONS = ("v1", "v2", "v3")
# Runs on a CI box shared with other test workers are slow, not stuck: the wait fails when no run of the
# character has changed state for RUNS_STALL_S, or after RUNS_DEADLINE_S in all (below pytest-timeout's guard).
RUNS_STALL_S = 600
RUNS_DEADLINE_S = 1200
BROWSER_WAIT_S = 60  # a page, a dialog or a button to appear; chromium is slow beside other test workers
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1440,900"]

WORKSPACE_QUERY = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""
BACKFILL_MUTATION = """
mutation Backfill($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename ... on LaunchBackfillSuccess { backfillId } ... on PythonError { message stack }
    ... on InvalidStepError { invalidStepKey } ... on UnauthorizedError { message }
  }
}
"""


@dataclass
class Ui:
    project: Project
    proc: subprocess.Popen
    port: int
    log: Path
    bob_backfill: str = ""

    def launch_bob(self) -> str:
        """bob's backfill of v1..v3 (once): launched early, it runs beside astronaut's runs."""
        if not self.bob_backfill:
            self.bob_backfill = _launch_backfill(self, "bob", ITERATIONS)
        return self.bob_backfill

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        answer = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        answer.raise_for_status()
        body = answer.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]


def _env(project: Project) -> dict[str, str]:
    return {**os.environ, "FLEN_PROJECT_DIR": str(project.root), "DAGSTER_HOME": str(project.dagster_home),
            "PYTHONWARNINGS": "ignore"}


def _start(project: Project, port: int, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:  # a session of its own, as a terminal gives it; SIGINT is its Ctrl+C
        return subprocess.Popen([*FLEN, "ui", "--port", str(port)], env=_env(project), cwd=project.root,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        proc = psutil.Process(pid)
        return [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _stop(proc: subprocess.Popen) -> None:
    """Stop `flen ui` as Ctrl+C does, then make sure nothing it started outlives the test."""
    tree = _tree(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for left in tree:
        try:
            left.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_ready(ui: Ui, deadline: float) -> str | None:
    """None once the UI answers with the code location loaded, else why not."""
    while time.monotonic() < deadline:
        if ui.proc.poll() is not None:
            return f"`flen ui` exited with {ui.proc.returncode}"
        if f"ready: open {ui.url}" in ui.text():
            try:
                entries = ui.graphql(WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    errors = [e["locationOrLoadError"] for e in entries
                              if e["locationOrLoadError"]["__typename"] == "PythonError"]
                    assert not errors, errors
                    return None
            except requests.RequestException:
                pass
        time.sleep(0.5)
    return "not ready in time"


def _partition_project(root: Path, characters: tuple[str, ...]) -> Project:
    project = Project(root)
    instance = init_project(project)
    photos = sample_files()
    for character in characters:
        inbox = project.inbox_for(character)
        inbox.mkdir(parents=True)
        for name in PHOTOS:
            (inbox / name).write_bytes(photos[name])
        for iteration in ITERATIONS:  # registered: inbox_sensor leaves known characters alone
            add_partitions(instance, character, iteration)
    instance.dispose()
    return project


def _launch_backfill(ui: Ui, character: str, iterations: tuple[str, ...]) -> str:
    params = {"partitionNames": [f"{character}|{i}" for i in iterations], "assetSelection": [{"path": ["source_images"]}]}
    answer = ui.graphql(BACKFILL_MUTATION, {"params": params})["launchPartitionBackfill"]
    assert answer["__typename"] == "LaunchBackfillSuccess", answer
    return answer["backfillId"]


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    with shared_project(tmp_path_factory, "ui") as empty:
        project = _partition_project(empty.root, ("astronaut", "bob"))
        logs = tmp_path_factory.mktemp("ui-logs")
        server = None
        try:
            for attempt in range(3):  # a free port can be taken between probing and binding
                port = free_port()
                server = Ui(project, _start(project, port, logs / f"ui-{attempt}.log"), port, logs / f"ui-{attempt}.log")
                why = _wait_ready(server, time.monotonic() + 180)
                if why is None:
                    break
                _stop(server.proc)
                if "address already in use" in server.text().lower() and attempt < 2:
                    continue
                pytest.fail(f"{why}; log:\n{server.text()[-6000:]}")
            yield server
        finally:
            if server is not None:
                _stop(server.proc)


def _wait_for_runs(ui: Ui, character: str, iterations: tuple[str, ...]) -> dict[str, object]:
    """{iteration: run record} once every iteration of `character` has a successful run; fails on a failed one."""
    instance = get_instance(ui.project)
    start = last_change = time.monotonic()
    seen: dict[str, str] = {}
    while True:
        records = {r.dagster_run.tags["dagster/partition"].split("|")[1]: r
                   for r in instance.get_run_records() if r.dagster_run.tags.get(CHARACTER_TAG) == character}
        failed = [r for r in records.values() if r.dagster_run.status.value in ("FAILURE", "CANCELED")]
        assert not failed, f"{character}: run {failed[0].dagster_run.run_id} failed; ui log:\n{ui.text()[-6000:]}"
        if set(records) >= set(iterations) and all(records[i].dagster_run.status.value == "SUCCESS" for i in iterations):
            return records
        now, states = time.monotonic(), {i: r.dagster_run.status.value for i, r in records.items()}
        if states != seen:
            seen, last_change = states, now
        assert now - last_change < RUNS_STALL_S and now - start < RUNS_DEADLINE_S, (
            f"{character}: runs not done ({now - start:.0f}s in all, {now - last_change:.0f}s since a run of it "
            f"changed state): {states}\n{ui.text()[-6000:]}")
        time.sleep(1)


def _assert_in_order_and_read_finished_previous(ui: Ui, character: str, records: dict) -> None:
    """Each vN started after v(N-1) ended (run records) and read the v(N-1) version that run published (lineage)."""
    assert set(records) == set(ITERATIONS), f"one run per iteration: {sorted(records)}"
    for prev, nxt in zip(ITERATIONS, ITERATIONS[1:]):
        assert records[prev].end_time <= records[nxt].start_time, (
            f"{character}|{nxt} started {records[nxt].start_time - records[prev].end_time:.1f}s before {prev} ended")
    lineage = LineageStore(ui.project.lineage_dir)
    published = {r["iteration"]: r for r in lineage.rows(
        f"SELECT iteration, run_id, dvc_md5 FROM artifacts WHERE asset = 'source_images' AND character = '{character}'")}
    read = {r["iteration"]: json.loads(r["params"]).get("previous_iteration_inputs") for r in lineage.rows(
        f"SELECT iteration, params FROM runs WHERE asset = 'source_images' AND character = '{character}'")}
    for iteration in ITERATIONS:
        assert published[iteration]["run_id"] == records[iteration].dagster_run.run_id
    assert read["v1"] is None
    for prev, nxt in zip(ITERATIONS, ITERATIONS[1:]):
        assert read[nxt] == [{"asset": "source_images", "iteration": prev, "dvc_md5": published[prev]["dvc_md5"]}], (
            f"{character}|{nxt} read {read[nxt]}, not the {prev} published by run {published[prev]['run_id'][:8]}")


# -- the browser ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def driver() -> Iterator:
    if os.environ.get("FLEN_SKIP_BROWSER") == "1":
        pytest.skip("FLEN_SKIP_BROWSER=1: browser tests skipped on purpose")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup.sh (apt-get install chromium chromium-driver) "
                    "or set FLEN_SKIP_BROWSER=1 to skip the browser tests on purpose")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver
    profile = tempfile.mkdtemp(prefix="flen-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    chosen = os.environ.get("FLEN_UI_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("ui-shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _until(drv, predicate, timeout: float = BROWSER_WAIT_S):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # A stale element means the page re-rendered between finding and asking: not yet, ask again.
    wait = WebDriverWait(drv, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(lambda d: predicate(d))


def _visible(drv, xpath: str):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        return next((e for e in drv.find_elements(By.XPATH, xpath) if e.is_displayed()), None)
    except StaleElementReferenceException:  # the page re-rendered between finding and asking: not yet
        return None


def _button_xpath(label: str, prefix: bool = False) -> str:
    """The XPath of a button with this label (or starting with it)."""
    test = f"starts-with(normalize-space(), '{label}')" if prefix else f"normalize-space()='{label}'"
    return f"//button[{test}]"


def _button(drv, label: str, prefix: bool = False, timeout: float = BROWSER_WAIT_S):
    """A visible, enabled button with this label (or starting with it)."""
    xpath = _button_xpath(label, prefix)
    return _until(drv, lambda d: (b := _visible(d, xpath)) is not None and b.is_enabled() and b, timeout)


def _dismiss_welcome(drv) -> None:
    """The 'Join the Dagster community' dialog a fresh browser gets: Skip."""
    skip = _visible(drv, "//div[.//*[contains(text(), 'Join the Dagster community')]]//button[normalize-space()='Skip']")
    if skip is not None:
        skip.click()
        _until(drv, lambda d: _visible(d, "//*[contains(text(), 'Join the Dagster community')]") is None)


def _click(drv, target, timeout: float = BROWSER_WAIT_S):
    """Click the visible, enabled element `target` finds (an XPath or a finder) once no dialog covers it; return it.

    The welcome dialog of a fresh browser can come seconds after the page, and its backdrop takes the click.
    """
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException

    def clicked(d):
        _dismiss_welcome(d)
        element = _visible(d, target) if isinstance(target, str) else target(d)
        if element is None or not element.is_enabled():
            return False
        try:
            element.click()
        except (ElementClickInterceptedException, StaleElementReferenceException):
            return False
        return element

    return _until(drv, clicked, timeout)


def _type(drv, xpath: str, keys: str) -> None:
    """Type `keys` over what the visible input `xpath` finds holds, finding it again if the page re-renders it."""
    from selenium.webdriver.common.keys import Keys

    def typed(d):
        field = _visible(d, xpath)
        if field is None:
            return False
        # Select-all first: a field re-rendered midway may keep what was typed before it went stale (_until
        # then asks again).
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(keys)
        return True

    _until(drv, typed)


def _tick(drv, dimension: int, values: list[str]) -> None:
    """In the launch dialog, open the partition picker of a dimension (0 character, 1 iteration) and tick values."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def picker(d):
        shown = [e for e in d.find_elements(By.CSS_SELECTOR, "[role=dialog] [aria-haspopup=dialog]") if e.is_displayed()]
        return shown[dimension] if len(shown) > dimension else None

    _click(drv, picker)
    for value in values:
        _click(drv, f"//div[contains(@class,'dagster-popover')]//li[.//span[normalize-space()='{value}']]")
        box = f"//div[contains(@class,'dagster-popover')]//li[.//span[normalize-space()='{value}']]//input[@type='checkbox']"
        _until(drv, lambda d: any(b.is_selected() for b in d.find_elements(By.XPATH, box)))
    ActionChains(drv).send_keys(Keys.ESCAPE).perform()
    _until(drv, lambda d: _visible(d, "//div[contains(@class,'dagster-popover')]") is None)


def _open_launch_dialog(drv) -> None:
    _click(drv, _button_xpath("Materialize", prefix=True))
    _until(drv, lambda d: _visible(d, "//*[normalize-space()='Launch runs to materialize source_images']"))


def test_ui_materializes_a_partition_then_a_backfill_of_two_iterations_in_order(ui, driver, shots):
    driver.get(f"{ui.url}/assets/source_images")
    _button(driver, "Materialize", prefix=True)
    time.sleep(2)  # the welcome dialog, when it comes, comes a moment after the page
    _open_launch_dialog(driver)
    _tick(driver, 0, ["astronaut"])
    _tick(driver, 1, ["v1"])
    _button(driver, "Launch 1 run")
    driver.save_screenshot(str(shots / "ui-launch.png"))
    _click(driver, _button_xpath("Launch 1 run"))
    _until(driver, lambda d: _visible(d, "//*[starts-with(normalize-space(), 'Launched run')]"))
    ui.launch_bob()  # another character: its runs go beside astronaut's

    # While v1 is queued or running: a backfill of v2 and v3 from the same dialog.
    _open_launch_dialog(driver)
    _tick(driver, 0, ["astronaut"])
    _tick(driver, 1, ["v2", "v3"])
    _until(driver, lambda d: _visible(d, "//*[normalize-space()='2 partitions']"))
    _click(driver, _button_xpath("Launch backfill"))
    _until(driver, lambda d: _visible(d, "//*[normalize-space()='Launch runs to materialize source_images']") is None)
    # The backfill while it runs: v2 and v3 wait for v1 (their runs are queued or not yet made).
    running = get_instance(ui.project).get_backfills(limit=1)[0]
    driver.get(f"{ui.url}/runs/b/{running.backfill_id}?tab=overview")
    _until(driver, lambda d: _visible(d, "//*[normalize-space()='In progress']"))
    _until(driver, lambda d: _visible(d, "//*[normalize-space()='Asset name']"))  # its partitions table
    time.sleep(1)
    driver.save_screenshot(str(shots / "ui-backfill-running.png"))

    records = _wait_for_runs(ui, "astronaut", ITERATIONS)
    backfills = {r.dagster_run.tags.get("dagster/backfill") for i, r in records.items() if i != "v1"}
    assert len(backfills) == 1 and None not in backfills, "v2 and v3 come from one backfill"
    assert "dagster/backfill" not in records["v1"].dagster_run.tags, "v1 is the single run"
    _assert_in_order_and_read_finished_previous(ui, "astronaut", records)

    # The backfill's page lists both runs as Success; for the screenshot, wait until the backfill itself
    # says Succeeded too (the daemon marks it on a later tick: up to half a minute more).
    backfill = backfills.pop()
    deadline = time.monotonic() + (120 if os.environ.get("FLEN_UI_SCREENSHOTS") else 0)
    while True:
        driver.get(f"{ui.url}/runs/b/{backfill}?tab=runs")
        _until(driver, lambda d: len(d.find_elements("xpath", "//*[normalize-space()='Success']")) >= 2)
        if _visible(driver, "//*[normalize-space()='Succeeded']") or time.monotonic() > deadline:
            break
        time.sleep(5)
    driver.save_screenshot(str(shots / "ui-backfill.png"))


def test_a_backfill_of_three_iterations_runs_them_in_order(ui):
    backfill = ui.launch_bob()
    records = _wait_for_runs(ui, "bob", ITERATIONS)
    assert {r.dagster_run.tags.get("dagster/backfill") for r in records.values()} == {backfill}
    assert [r.dagster_run.tags["dagster/priority"] for r in (records[i] for i in ITERATIONS)] == ["-1", "-2", "-3"]
    _assert_in_order_and_read_finished_previous(ui, "bob", records)


def test_the_launchpad_of_a_sized_job_opens_with_its_run_settings(ui, driver, shots):
    """flywheel_24gb_card's launchpad, once a partition is picked, holds the 24gb-card knobs and names them."""
    from selenium.webdriver.common.keys import Keys

    driver.get(f"{ui.url}/locations/__repository__@flenwheel/jobs/flywheel_24gb_card/playground")
    partition = "//input[@placeholder='Partition']"
    _click(driver, partition)
    # The launchpad re-renders the field while it loads the partitions (CI once saw it go stale mid-typing).
    _type(driver, partition, "astronaut|v1")
    _until(driver, lambda d: _visible(d, "//*[normalize-space()='astronaut|v1']"))
    _type(driver, partition, Keys.ENTER)
    editor = "return document.querySelector('.CodeMirror').CodeMirror"
    _until(driver, lambda d: "steps: 1500" in d.execute_script(f"{editor}.getValue()"))
    config = driver.execute_script(f"{editor}.getValue()")
    for line in ("recipe: 'angles'", "resolution: 1024", "steps: 500", "name: '24gb-card'"):
        assert line in config, config
    assert _visible(driver, "//*[normalize-space()='flen/run_settings: 24gb-card']"), "the run's tag names the settings"
    # Show the FLUX LoRA's knobs: scroll the editor to them.
    driver.execute_script("var c = document.querySelector('.CodeMirror').CodeMirror;"
                          "var n = c.getValue().split('\\n').findIndex(l => l.trim() === 'flux_lora:');"
                          "c.scrollTo(0, c.heightAtLine(n, 'local'));")
    time.sleep(0.5)
    driver.save_screenshot(str(shots / "ui-launchpad-settings.png"))


def _command_line(process: psutil.Process) -> str:
    """A process's command line, or "" once it has ended (a run's process can end, or be a zombie, meanwhile)."""
    try:
        return " ".join(process.cmdline())
    except psutil.NoSuchProcess:  # ZombieProcess included
        return ""


def test_ctrl_c_stops_the_webserver_the_daemon_and_what_they_started(ui):
    tree = _tree(ui.proc.pid)
    names = " ".join(_command_line(p) for p in tree)
    assert "dagster-webserver" in names and "dagster-daemon" in names, names
    ui.proc.send_signal(signal.SIGINT)
    assert ui.proc.wait(timeout=90) == 0, ui.text()[-4000:]
    text = ui.text()
    assert "stopping the webserver and the daemon" in text and "stopped the Dagster UI and daemon" in text, text[-3000:]
    time.sleep(0.5)
    left = [p for p in tree[1:] if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"still running after Ctrl+C: {[_command_line(p) for p in left]}"


def test_when_the_webserver_cannot_start_the_daemon_is_stopped_too(tmp_path):
    project = _partition_project(tmp_path / "project", ())
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _start(project, port, tmp_path / "ui.log")
        try:
            code = proc.wait(timeout=300)
        finally:
            _stop(proc)
    text = (tmp_path / "ui.log").read_text(errors="replace")
    assert code == 1, text[-4000:]
    assert re.search(r"error: dagster-webserver stopped by itself \(exit status \d+\); stopping the daemon\. "
                     r"Its last lines:", text), text[-4000:]
    assert "address already in use" in text.lower(), text[-4000:]
    assert "stopped the Dagster UI and daemon" in text
