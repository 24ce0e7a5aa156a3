"""The Dagster UI shows how a character evolves (issue 13): lora_eval vN's metadata holds the metrics of
v1..vN side by side and a grid of the same prompts and seeds per version.

A headless chromium opens lora_eval astronaut|v2 on the demo project (`flen demo`: v1 and v2), served by
`flen ui`, reads the table and opens the grid. FLEN_UI_SCREENSHOTS=docs rewrites docs/ui-eval-metrics.png
docs/ui-eval-grid.png and docs/ui-eval-sheet.png.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
import test_ui_launch as launch
from test_ui_launch import Ui, _click, _dismiss_welcome, _start, _stop, _until, _visible, _wait_ready

from tests_helpers import free_port

driver = launch.driver  # the module-scoped browser and screenshot folder of the launch tests
shots = launch.shots

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")]


@pytest.fixture(scope="module")
def demo_ui(demo_project, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    log = tmp_path_factory.mktemp("ui-eval-logs") / "ui.log"
    port = free_port()
    server = Ui(demo_project, _start(demo_project, port, log), port, log)
    try:
        why = _wait_ready(server, time.monotonic() + 180)
        if why is not None:
            pytest.fail(f"{why}; log:\n{server.text()[-6000:]}")
        yield server
    finally:
        _stop(server.proc)


def test_lora_eval_shows_the_metrics_of_v1_and_v2_side_by_side_and_their_grid(demo_ui, driver, shots):
    driver.get(f"{demo_ui.url}/assets/lora_eval?view=partitions&partition=astronaut%7Cv2")
    time.sleep(2)  # the welcome dialog, when it comes, comes a moment after the page
    _dismiss_welcome(driver)
    row = "//tr[td[normalize-space()='metrics_by_iteration']]"
    table = _until(driver, lambda d: _visible(d, f"{row}//table"), timeout=60)
    header = [th.text.strip() for th in table.find_elements("xpath", ".//th")]
    assert header == ["metric", "v1", "v2"], header
    cells = {tr.find_elements("xpath", "./td")[0].text.strip(): [td.text.strip() for td in tr.find_elements("xpath", "./td")[1:]]
             for tr in table.find_elements("xpath", ".//tbody/tr")}
    assert cells["identity consistency"] == ["0%", "0%"], cells  # the tiny pack draws noise: no face matches
    assert cells["mean distance"] == ["n/a", "n/a"], cells
    assert _visible(driver, f"{row}//*[contains(normalize-space(), 'n/a: mean distance: no face found')]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", table)
    time.sleep(0.3)
    driver.save_screenshot(str(shots / "ui-eval-metrics.png"))

    _click(driver, "//tr[td[normalize-space()='evolution']]//a[normalize-space()='[Show Markdown]']")
    grid = _until(driver, lambda d: _visible(d, "//*[normalize-space()='evolution']/ancestor::*[.//img][1]//img"))
    width, height = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", grid)
    assert width > 600 and height > 250, (width, height)  # two version rows of six prompt x seed tiles
    time.sleep(0.5)
    driver.save_screenshot(str(shots / "ui-eval-grid.png"))

    # The evaluation sheet of v2: a row per prompt, its seeds, and the LoRA-off column.
    _click(driver, "//button[normalize-space()='Close']")
    _until(driver, lambda d: _visible(d, "//button[normalize-space()='Close']") is None)
    _click(driver, "//tr[td[normalize-space()='contact_sheet']]//a[normalize-space()='[Show Markdown]']")
    sheet = _until(driver, lambda d: _visible(d, "//*[normalize-space()='contact_sheet']/ancestor::*[.//img][1]//img"))
    assert driver.execute_script("return arguments[0].naturalWidth", sheet) > 300
    time.sleep(0.5)
    driver.save_screenshot(str(shots / "ui-eval-sheet.png"))


def test_lora_eval_shows_every_checkpoint_identity_against_step_and_the_checkpoint_grid(demo_ui, driver, shots):
    """Issue 16: the checkpoints' table with the promoted one, the plot of identity against step, and the grid of
    checkpoints x prompts. FLEN_UI_SCREENSHOTS=docs rewrites docs/ui-eval-checkpoints.png, ui-eval-by-step.png and
    ui-eval-checkpoint-grid.png."""
    driver.get(f"{demo_ui.url}/assets/lora_eval?view=partitions&partition=astronaut%7Cv2")
    time.sleep(2)
    _dismiss_welcome(driver)
    row = "//tr[td[normalize-space()='checkpoints']]"
    table = _until(driver, lambda d: _visible(d, f"{row}//table"), timeout=60)
    steps = [tr.find_elements("xpath", "./td")[0].text.strip() for tr in table.find_elements("xpath", ".//tbody/tr")]
    assert steps == ["10", "20"], steps
    assert _visible(driver, f"{row}//tr[td[normalize-space()='20']]//strong[normalize-space()='promoted']")
    assert _visible(driver, "//tr[td[normalize-space()='promotion']]//*[contains(., 'step 20, promoted by the rule')]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", table)
    time.sleep(0.3)
    driver.save_screenshot(str(shots / "ui-eval-checkpoints.png"))

    for key, shot, least in (("identity_by_step", "ui-eval-by-step.png", (500, 250)),
                             ("checkpoint_grid", "ui-eval-checkpoint-grid.png", (600, 250))):
        _click(driver, f"//tr[td[normalize-space()='{key}']]//a[normalize-space()='[Show Markdown]']")
        img = _until(driver, lambda d: _visible(d, f"//*[normalize-space()='{key}']/ancestor::*[.//img][1]//img"))
        size = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img)
        assert size[0] > least[0] and size[1] > least[1], (key, size)
        time.sleep(0.5)
        driver.save_screenshot(str(shots / shot))
        _click(driver, "//button[normalize-space()='Close']")
        _until(driver, lambda d: _visible(d, "//button[normalize-space()='Close']") is None)
