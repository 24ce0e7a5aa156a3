"""The review page in a real headless browser (Debian's chromium driven by selenium): keyboard
decisions, undo, a bulk action, persistence across a reload, and 404s for unknown ids and traversal.

Needs /usr/bin/chromium and /usr/bin/chromedriver (scripts/setup.sh installs them). Missing, the
tests fail rather than skip, unless FLEN_SKIP_BROWSER=1 says to skip them on purpose.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flen_assets.review.store import Partition, ReviewStore

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1440,900"]
PAGE = "/review/bench/v1/filtered_images"


def new_driver(profile: str):
    """A headless chromium with a fresh profile, driven by Debian's chromedriver (no downloads)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to fetch a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROME_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def driver() -> Iterator:
    if os.environ.get("FLEN_SKIP_BROWSER") == "1":
        pytest.skip("FLEN_SKIP_BROWSER=1: browser tests skipped on purpose")
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: run scripts/setup.sh (apt-get install chromium chromium-driver) "
                    "or set FLEN_SKIP_BROWSER=1 to skip the browser tests on purpose")
    profile = tempfile.mkdtemp(prefix="flen-chromium-")
    drv = new_driver(profile)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait(drv, predicate, timeout: float = 15):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.05).until(lambda d: predicate(d))


def text(drv, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return drv.find_element(By.ID, element_id).text


def press(drv, *keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    for key in keys:
        ActionChains(drv).send_keys(key).perform()


def open_page(drv, url: str) -> None:
    drv.get(url)
    wait(drv, lambda d: d.execute_script("return document.body.dataset.ready") == "1")


def current_id(drv) -> str:
    return drv.execute_script("return document.getElementById('detail').dataset.id")


def test_keyboard_bulk_and_reload(driver, review_server):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, project, ids = review_server
    open_page(driver, url + PAGE)
    assert text(driver, "count-pending") == "40" and text(driver, "count-accepted") == "0"
    tiles = driver.find_elements(By.CSS_SELECTOR, ".tile")
    assert len(tiles) == 40 and tiles[0].get_attribute("data-id") == ids[0]
    # The large view shows the image beside its parent, both loaded.
    wait(driver, lambda d: d.execute_script(
        "const i = [document.getElementById('current-image'), ...document.querySelectorAll('#parents img')];"
        "return i.length === 2 && i.every(x => x.complete && x.naturalWidth > 0)"))
    assert current_id(driver) == ids[0]

    press(driver, "a")                      # accept the first, moves to the second
    wait(driver, lambda d: text(d, "count-accepted") == "1")
    wait(driver, lambda d: current_id(d) == ids[1])
    press(driver, "j")                      # skip the second
    wait(driver, lambda d: current_id(d) == ids[2])
    press(driver, "r")                      # reject the third
    wait(driver, lambda d: text(d, "count-rejected") == "1")
    press(driver, "u")                      # undo: the third is pending again
    wait(driver, lambda d: text(d, "count-rejected") == "0" and text(d, "count-pending") == "39")
    assert current_id(driver) == ids[2]
    press(driver, "x")                      # x rejects too
    wait(driver, lambda d: text(d, "count-rejected") == "1")
    press(driver, Keys.ARROW_LEFT, Keys.ARROW_LEFT)
    wait(driver, lambda d: current_id(d) == ids[1])
    press(driver, "a")
    wait(driver, lambda d: text(d, "count-accepted") == "2")
    ActionChains(driver).key_down(Keys.CONTROL).send_keys("z").key_up(Keys.CONTROL).perform()  # ctrl+z undoes it
    wait(driver, lambda d: text(d, "count-accepted") == "1")

    # Bulk: accept every pending image with identity distance <= 0.3 (ids 1..9 here; 0 is accepted already).
    score = driver.find_element(By.ID, "bulk-score")
    score.clear()
    score.send_keys("0.3")
    driver.find_element(By.ID, "bulk-apply").click()
    wait(driver, lambda d: text(d, "count-accepted") == "9")
    assert text(driver, "status-line") == "accepted 8 pending image(s) with distance ≤ 0.3"

    # Reload: the decisions come back from the lineage store, not from the page's memory.
    driver.find_element(By.TAG_NAME, "body").click()
    open_page(driver, url + PAGE + "?status=all")
    assert (text(driver, "count-accepted"), text(driver, "count-rejected"), text(driver, "count-pending")) == \
        ("9", "1", "30")
    statuses = {t.get_attribute("data-id"): t.get_attribute("data-status")
                for t in driver.find_elements(By.CSS_SELECTOR, ".tile")}
    assert statuses[ids[0]] == "accepted" and statuses[ids[2]] == "rejected" and statuses[ids[12]] == "pending"
    store_view = ReviewStore(project).statuses(Partition.of("filtered_images", "bench", "v1"))
    assert store_view == statuses
    driver.save_screenshot(str(project.root / "review-page.png"))
    assert (project.root / "review-page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_gets_404_for_unknown_ids_and_traversal(driver, review_server):
    url, _, ids = review_server
    open_page(driver, url + PAGE)
    paths = ["/image/" + "0" * 64, "/thumb/" + "0" * 64, "/image/..%2f..%2f..%2fetc%2fpasswd",
             "/image/%2e%2e%2f%2e%2e%2fpyproject.toml", "/static/..%2f..%2fpyproject.toml",
             "/review/bench/v1/..%2f..%2fetc", "/review/bench/v2/filtered_images"]
    statuses = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(arguments[0].map(p => fetch(p).then(r => r.status))).then(done);", paths)
    assert statuses == [404] * len(paths)
    ok = driver.execute_async_script(
        "const done = arguments[arguments.length - 1]; fetch(arguments[0]).then(r => done(r.status));",
        "/image/" + ids[0])
    assert ok == 200


def test_pages_with_the_keyboard(driver, review_server):
    """130 pending images: 120 on the first page; j past the last one, or ], opens the next."""
    from selenium.webdriver.common.by import By

    from tests_helpers import build_review_partition

    url, project, _ = review_server
    ids = build_review_partition(project, 130, iteration="v3")
    open_page(driver, url + "/review/bench/v3/filtered_images")
    assert len(driver.find_elements(By.CSS_SELECTOR, ".tile")) == 120
    assert text(driver, "page-info") == "1–120 of 130 · page 1/2"
    press(driver, "]")
    wait(driver, lambda d: text(d, "page-info") == "121–130 of 130 · page 2/2")
    press(driver, "[")
    wait(driver, lambda d: text(d, "page-info") == "1–120 of 130 · page 1/2")
    # Accept the first two, then walk to the last tile and one step further: the next page starts at
    # the first image not yet shown, although two images left the pending list meanwhile.
    press(driver, "a", "a")
    wait(driver, lambda d: text(d, "count-accepted") == "2")
    driver.execute_script("document.querySelector('.tile[data-index=\"119\"]').click()")
    wait(driver, lambda d: current_id(d) == ids[119])
    press(driver, "j")
    wait(driver, lambda d: current_id(d) == ids[120])
    assert text(driver, "page-info") == "119–128 of 128 · page 2/2"


SHOWN_IMAGES = ("return [...document.images].filter(i => i.offsetParent !== null)"
                ".map(i => [i.id, i.getAttribute('src') || '', i.complete && i.naturalWidth > 0]);")


def shoot(drv, project, name: str) -> None:
    """A screenshot in the project (and in $FLEN_SCREENSHOT_DIR when set, to look at)."""
    folders = [project.root] + ([Path(os.environ["FLEN_SCREENSHOT_DIR"])] if os.environ.get("FLEN_SCREENSHOT_DIR") else [])
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(folder / name))
    assert (project.root / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _publish_decisions(project, iteration: str) -> None:
    """What materializing filtered_images again does to the page: the manifest holds the human verdicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    part = Partition.of("filtered_images", "bench", iteration)
    statuses = ReviewStore(project).statuses(part)
    path = project.partition_dir("filtered_images", "bench", iteration) / "manifest.parquet"
    rows = [{**r, "review_status": statuses[r["image_id"]], "accepted": statuses[r["image_id"]] == "accepted"}
            for r in pq.read_table(path).to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_decisions_say_how_to_apply_them_and_nothing_pending_opens_on_all(driver, review_server):
    """Issue 13: a decision shows the command that applies it (with --project); a partition with nothing
    pending opens on its images, not on an empty Pending view with a broken image."""
    from selenium.webdriver.common.by import By

    url, project, ids = review_server
    open_page(driver, url + PAGE)
    assert not driver.find_element(By.ID, "apply-note").is_displayed(), "no decision yet, nothing to apply"
    press(driver, "a")
    wait(driver, lambda d: d.find_element(By.ID, "apply-note").is_displayed())
    note = text(driver, "apply-note")
    command = f"flen materialize bench v1 --from filtered_images --project {project.root}"
    assert text(driver, "apply-command") == command
    assert note.startswith("1 decision not applied yet") and "then the training set is built again" in note, note
    shoot(driver, project, "review-apply-note.png")

    # Every image decided (the bulk accepts the rest): the Pending view says so, in words, and shows no image.
    driver.find_element(By.ID, "bulk-score").clear()
    driver.find_element(By.ID, "bulk-score").send_keys("2")
    driver.find_element(By.ID, "bulk-apply").click()
    wait(driver, lambda d: text(d, "count-pending") == "0")
    wait(driver, lambda d: "40 decisions not applied yet" in text(d, "apply-note"))
    said = "Nothing pending in bench v1 · filtered_images: every image is decided. Choose All, Accepted or Rejected"
    assert driver.find_element(By.CSS_SELECTOR, "#grid .empty").text.startswith(said)
    assert text(driver, "detail-empty") == "No image in this view (see the list on the left)."
    assert not driver.find_element(By.ID, "current-image").is_displayed()
    assert driver.execute_script(SHOWN_IMAGES) == [], "no <img> shown without an image to show"
    shoot(driver, project, "review-pending-done.png")

    # Applied (the asset materialized again): reopened without a status, the page shows all the images.
    _publish_decisions(project, "v1")
    driver.find_element(By.TAG_NAME, "body").click()
    open_page(driver, url + PAGE)
    assert "status=all" in driver.current_url
    assert len(driver.find_elements(By.CSS_SELECTOR, ".tile")) == 40
    assert not driver.find_element(By.ID, "apply-note").is_displayed(), "every decision is in the published partition"
    wait(driver, lambda d: d.execute_script(
        "const i = document.getElementById('current-image'); return !i.hidden && i.complete && i.naturalWidth > 0"))
    assert all(src for _, src, _ in driver.execute_script(SHOWN_IMAGES)), "every shown <img> has a src"
    shoot(driver, project, "review-nothing-pending.png")


def test_an_empty_partition_shows_a_message_not_a_broken_image(driver, review_server):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from selenium.webdriver.common.by import By

    url, project, _ = review_server
    folder = project.partition_dir("filtered_images", "bench", "v2")  # published, with no candidate
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"image_id": pa.array([], pa.string())}), folder / "manifest.parquet")
    open_page(driver, url + "/review/bench/v2/filtered_images")
    assert driver.find_element(By.CSS_SELECTOR, "#grid .empty").text == "bench v2 · filtered_images has no image to review."
    assert text(driver, "detail-empty") == "No image in this view (see the list on the left)."
    assert driver.execute_script(SHOWN_IMAGES) == []
    assert not driver.find_element(By.ID, "apply-note").is_displayed()
    shoot(driver, project, "review-empty.png")


@pytest.mark.parametrize("asset, iteration, command, then", [
    ("synthetic_batch", "v1", "flen materialize bench v1 --all --from synthetic_batch",
     "then training set v2 takes the accepted generations: flen iterate bench"),
    ("identity_reference", "v3", "flen materialize bench v3 --from identity_reference",
     "then the training set is built again with them"),
])
def test_the_apply_command_follows_the_asset(project, asset, iteration, command, then):
    from flen_assets.review.server import _apply_text

    got = _apply_text(project, Partition.of(asset, "bench", iteration))
    assert got == (f"{command} --project {project.root}", then + (f" --project {project.root}" if "iterate" in then else ""))
