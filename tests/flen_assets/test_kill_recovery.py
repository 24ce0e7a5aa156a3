"""kill -9 a run inside each gpu-pool asset, then materialize again: the rerun starts at once (the dead
run holds nothing), resumes training from its checkpoints, and ends with the md5s of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

from flen_assets.demo_data import write_sample_inbox
from flen_assets.runs import init_project
from flen_resources.lineage import LineageStore

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
FLEN = [sys.executable, "-m", "flen_assets"]
GPU_ASSETS = ("enriched_images", "qwen_adapter", "flux_lora", "lora_eval", "synthetic_batch")  # in run order
# Small but complete: every asset runs; the trainers checkpoint often enough for a kill to land between.
CONFIG = """\
ops:
  enriched_images: {config: {recipe: demo, max_entries: 2}}
  flux_lora: {config: {steps: 12, resolution: 64, rank: 4, learning_rate: 0.001, checkpoint_every: 3}}
  lora_eval: {config: {size: 64, steps: 2, seeds: [1]}}
  synthetic_batch: {config: {size: 64, steps: 2, seeds: [11]}}
  qwen_adapter: {config: {steps: 8, resolution: 64, rank: 4, checkpoint_every: 2}}
"""


def _env(root) -> dict[str, str]:
    return {**os.environ, "FLEN_PROJECT_DIR": str(root), "DAGSTER_HOME": str(root / ".flen" / "dagster"),
            "PYTHONWARNINGS": "ignore"}


def _command(root) -> list[str]:
    return [*FLEN, "materialize", "kc", "v1", "--all", "--config", str(root / "small.yaml")]


def _new_project(tmp_path, name: str, monkeypatch):
    from flen_resources.project import Project

    project = Project(tmp_path / name)
    project.root.mkdir()
    (project.root / "small.yaml").write_text(CONFIG)
    monkeypatch.setenv("DAGSTER_HOME", str(project.dagster_home))  # undone after the test: nothing leaks
    instance = init_project(project)
    write_sample_inbox(project.inbox_for("kc"))
    return project, instance


def _md5s(project) -> dict[str, str]:
    rows = LineageStore(project.lineage_dir).rows(
        "SELECT asset, dvc_md5 FROM latest_artifacts WHERE character='kc' AND iteration='v1'")
    return {r["asset"]: r["dvc_md5"] for r in rows}


def _current_run(instance: dg.DagsterInstance, known: set[str]) -> dg.DagsterRun | None:
    runs = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
    fresh = [r for r in runs if r.run_id not in known]
    return fresh[0] if fresh else None


def _started_steps(instance: dg.DagsterInstance, run_id: str, kind: dg.DagsterEventType) -> set[str]:
    return {e.step_key for e in instance.all_logs(run_id, of_type=kind)}


def _inside(root, asset: str) -> bool:
    """Far enough into `asset` for the kill to test something: a trainer has written a checkpoint."""
    if asset not in ("flux_lora", "qwen_adapter"):
        time.sleep(1.0)  # into the model load or the generations
        return True
    return any((root / ".flen" / "runs").glob(f"{asset}-kc-v1-*/checkpoints/step-*/state.json"))


def _kill_inside(root, instance: dg.DagsterInstance, asset: str, known: set[str]) -> tuple[str, float, str]:
    """Start the command, kill -9 its process group once `asset`'s step has started; (run id, seconds to
    its first step, its output)."""
    launched = time.monotonic()
    log = root / f"killed-in-{asset}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(_command(root), env=_env(root), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    run, first_step = None, None
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            run = run or _current_run(instance, known)
            if run is not None:
                started = _started_steps(instance, run.run_id, dg.DagsterEventType.STEP_START)
                if started and first_step is None:
                    first_step = time.monotonic() - launched
                if asset in started and _inside(root, asset):
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert run is not None and first_step is not None, f"{asset}: the run never started"
    done = _started_steps(instance, run.run_id, dg.DagsterEventType.STEP_SUCCESS)
    assert asset not in done, f"the kill landed after {asset} had finished: not a kill inside the step"
    return run.run_id, first_step, log.read_text()


def test_kill_inside_each_gpu_asset_then_rerun(tmp_path, monkeypatch):
    clean, _ = _new_project(tmp_path, "uninterrupted", monkeypatch)
    proc = subprocess.run(_command(clean.root), env=_env(clean.root), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    expected = _md5s(clean)
    assert set(GPU_ASSETS) <= set(expected)

    project, instance = _new_project(tmp_path, "killed", monkeypatch)
    killed: list[str] = []
    outputs = []
    for asset in GPU_ASSETS:
        run_id, first_step, output = _kill_inside(project.root, instance, asset, set(killed))
        if killed:
            # The dead run held the gpu slot: the rerun released it, and resumed after what the dead run finished.
            assert f"run {killed[-1][:8]} (flywheel_job kc|v1) had died" in output, output[-3000:]
            assert f"resuming run {killed[-1][:8]}, which died in" in output, output[-3000:]
            blocked = [e.message for e in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT)
                       if "blocked by limit for pool" in (e.message or "")]
            assert not blocked, f"the run after a kill waited for a slot: {blocked}"
            # Generous for a CI box shared with other test workers; a dead holder's slot would hold it forever.
            assert first_step < 240, f"the rerun after a kill took {first_step:.0f}s to start a step"
        killed.append(run_id)
        outputs.append(output)
    final = subprocess.run(_command(project.root), env=_env(project.root), capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stdout[-4000:] + final.stderr[-4000:]
    assert f"resuming run {killed[-1][:8]}, which died in synthetic_batch" in final.stdout
    for run_id in killed:
        assert instance.get_run_by_id(run_id).status == DagsterRunStatus.FAILURE
    assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots
    assert "resumed from step-" in "".join(outputs), "a trainer resumed from its checkpoint"
    assert not list(project.staging_dir.iterdir()), "the killed runs' staging folders were cleaned"
    assert _md5s(project) == expected, "same versions as the uninterrupted run"
