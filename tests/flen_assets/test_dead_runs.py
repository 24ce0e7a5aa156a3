"""A run whose process died never holds a pool slot or a run slot: flen commands and the daemon free them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import psutil
import pytest
from dagster._core.events import EngineEventData
from dagster._core.launcher import WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.utils import make_new_run_id

from flen_assets.demo_data import write_sample_inbox
from flen_assets.instance import RUN_PROCESS_TAG, FlenRunLauncher, get_instance, release_dead_runs, slot_holders
from flen_assets.runs import init_project
from flen_resources.processes import ProcessRef, this_host

FLEN = [sys.executable, "-m", "flen_assets"]


def _process(alive: bool) -> tuple[ProcessRef, subprocess.Popen]:
    """A `sleep` process's ref; killed (and reaped) unless `alive`."""
    proc = subprocess.Popen(["sleep", "600"])
    ref = ProcessRef(this_host(), proc.pid, psutil.Process(proc.pid).create_time())
    if not alive:
        proc.kill()
        proc.wait()
    return ref, proc


def _started_run_holding_gpu(instance: dg.DagsterInstance, owner: ProcessRef, step: str = "flux_lora",
                             partition: str = "kc|v1") -> str:
    """A STARTED run owned by `owner` that holds the `gpu` pool's only slot, as a run killed mid-step leaves it."""
    run_id = make_new_run_id()
    instance.add_run(DagsterRun(job_name="flywheel_job", run_id=run_id, status=DagsterRunStatus.STARTED,
                                tags={RUN_PROCESS_TAG: owner.encode(), "dagster/partition": partition}))
    instance.event_log_storage.initialize_concurrency_limit_to_default("gpu")  # as a run's first claim does
    claim = instance.event_log_storage.claim_concurrency_slot("gpu", run_id, step)
    assert claim.is_claimed
    return run_id


def _gpu_holders(instance: dg.DagsterInstance) -> set[str]:
    return {slot.run_id for slot in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots}


def test_release_fails_dead_runs_and_frees_their_slots(project):
    instance = get_instance(project)  # the Dagster instance alone: no git or DVC needed
    dead_ref, _ = _process(alive=False)
    live_ref, live = _process(alive=True)
    try:
        dead = _started_run_holding_gpu(instance, dead_ref)
        released = release_dead_runs(instance)
        assert released == [dead]
        assert instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE
        assert dead not in _gpu_holders(instance)
        failure = instance.all_logs(dead, of_type=dg.DagsterEventType.RUN_FAILURE)[0]
        assert f"pid {dead_ref.pid}" in failure.message and "is gone" in failure.message

        alive = _started_run_holding_gpu(instance, live_ref)
        assert release_dead_runs(instance) == []
        assert instance.get_run_by_id(alive).status == DagsterRunStatus.STARTED
        assert _gpu_holders(instance) == {alive}
    finally:
        live.kill()
        live.wait()


def test_launcher_health_check_tells_dead_from_alive(project):
    instance = get_instance(project)  # the Dagster instance alone: no git or DVC needed
    assert isinstance(instance.run_launcher, FlenRunLauncher), "dagster.yaml names flen's launcher"
    dead_ref, _ = _process(alive=False)
    live_ref, live = _process(alive=True)
    try:
        dead = instance.get_run_by_id(_started_run_holding_gpu(instance, dead_ref))
        assert instance.run_launcher.check_run_worker_health(dead).status == WorkerStatus.FAILED
        instance.event_log_storage.free_concurrency_slots_for_run(dead.run_id)
        alive = instance.get_run_by_id(_started_run_holding_gpu(instance, live_ref))
        assert instance.run_launcher.check_run_worker_health(alive).status == WorkerStatus.RUNNING
    finally:
        live.kill()
        live.wait()


def test_a_daemon_run_worker_is_known_by_its_engine_event(project):
    # Runs launched by the daemon carry no flen tag: their worker's pid comes from Dagster's own event.
    instance = get_instance(project)  # the Dagster instance alone: no git or DVC needed
    ref, _ = _process(alive=False)
    run = instance.add_run(DagsterRun(job_name="flywheel_job", run_id=make_new_run_id(),
                                      status=DagsterRunStatus.STARTED))
    instance.report_engine_event(f"Started process for run (pid: {ref.pid}).", run, EngineEventData.in_process(ref.pid))
    assert release_dead_runs(instance) == [run.run_id]


def test_step_processes_a_killed_worker_left_are_stopped_before_the_slot_is_freed(project):
    # The multiprocess executor (runs launched from the UI) starts a process per step; when its run
    # worker is killed they keep running, and would keep the GPU the freed slot stands for.
    instance = get_instance(project)
    worker, _ = _process(alive=False)
    step, step_proc = _process(alive=True)
    run_id = _started_run_holding_gpu(instance, worker, step="enriched_images")
    run = instance.get_run_by_id(run_id)
    instance.report_engine_event("Launching subprocess for enriched_images", run,
                                 EngineEventData.multiprocess(step.pid), step_key="enriched_images")
    instance.report_engine_event("Executing step enriched_images in subprocess", run,
                                 EngineEventData(metadata={"step_key": dg.MetadataValue.text("enriched_images")}),
                                 step_key="enriched_images")
    instance.report_run_failed(run, "marked failed from outside (the code server saw its worker die)")
    said = []
    release_dead_runs(instance, said.append)
    assert step_proc.wait(timeout=10) == -signal.SIGKILL, "the orphaned step process was stopped"
    assert not _gpu_holders(instance)
    assert any(f"pid {step.pid}" in line and "stopped" in line for line in said), said


def test_the_sensor_releases_dead_runs(project):
    from flen_assets.sensors import dead_runs_sensor

    instance = get_instance(project)
    dead_ref, _ = _process(alive=False)
    dead = _started_run_holding_gpu(instance, dead_ref)
    result = dead_runs_sensor(dg.build_sensor_context(instance=instance))
    assert "released 1 dead run" in result.skip_message
    assert instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE and not _gpu_holders(instance)


def test_old_instance_config_is_upgraded(project):
    from flen_assets.instance import _OLD_DAGSTER_YAMLS, DAGSTER_YAML, ensure_dagster_home

    config = project.dagster_home / "dagster.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(_OLD_DAGSTER_YAMLS[0])
    ensure_dagster_home(project)
    assert config.read_text() == DAGSTER_YAML
    config.write_text(DAGSTER_YAML + "# my edit\n")
    ensure_dagster_home(project)
    assert config.read_text().endswith("# my edit\n"), "a file the user edited is left alone"


def _env(project) -> dict[str, str]:
    return {**os.environ, "FLEN_PROJECT_DIR": str(project.root), "DAGSTER_HOME": str(project.dagster_home),
            "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


class Console:
    """Collects a process's output on a thread, so a test can wait for a line without blocking on a pipe."""

    def __init__(self, proc: subprocess.Popen):
        import threading

        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=lambda: self.lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        self._thread.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float) -> str:
        """The output so far, once it holds `needle` (fails after `timeout` seconds or when the process ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text:
                return self.text
            if self.proc.poll() is not None and not self._thread.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"{needle!r} not printed within {timeout}s:\n{self.text[-4000:]}")

    def finish(self, timeout: float) -> str:
        """All output, once the process has ended."""
        self.proc.wait(timeout=timeout)
        self._thread.join(timeout=10)
        return self.text


@pytest.mark.slow
def test_waiting_command_names_the_holder_and_stops_on_ctrl_c(project, tmp_path):
    instance = init_project(project)
    write_sample_inbox(project.inbox_for("kc"))
    live_ref, holder = _process(alive=True)
    try:
        # Another character's run: a run of kc itself is waited for before the job starts (one run per character).
        holder_run = _started_run_holding_gpu(instance, live_ref, step="enriched_images", partition="bo|v1")
        proc = subprocess.Popen([*FLEN, "materialize", "kc", "v1"], env=_env(project), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        console = Console(proc)
        out = console.wait_for("waiting for a slot in pool 'gpu'", timeout=240)
        assert f"held by run {holder_run[:8]} (flywheel_job bo|v1, step enriched_images)" in out
        assert "Ctrl-C" in out
        # Waiting sleeps between claim checks (Dagster's own wait spins at 100% CPU: see runs._patch_busy_slot_wait).
        assert psutil.Process(proc.pid).cpu_percent(interval=5) < 30
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = console.finish(timeout=30)
        assert time.monotonic() - started < 15, "Ctrl-C stops a waiting command at once"
        assert proc.returncode == 130, rest
        assert "marked canceled and holds no pool slot" in rest
        waiting_run = [r for r in instance.get_runs() if r.run_id != holder_run][0]
        assert waiting_run.status == DagsterRunStatus.CANCELED
        assert not slot_holders(instance, waiting_run.run_id), "the canceled run waits for nothing"
        assert _gpu_holders(instance) == {holder_run}
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_waiting_command_goes_on_when_the_holder_dies(project):
    instance = init_project(project)
    write_sample_inbox(project.inbox_for("kc"))
    live_ref, holder = _process(alive=True)
    # Another character's run: a run of kc itself is waited for before the job starts (one run per character).
    holder_run = _started_run_holding_gpu(instance, live_ref, step="enriched_images", partition="bo|v1")
    config = project.root / "small.yaml"
    config.write_text("ops:\n  enriched_images:\n    config:\n      max_entries: 1\n")
    proc = subprocess.Popen([*FLEN, "materialize", "kc", "v1", "--config", str(config)], env=_env(project),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        console = Console(proc)
        console.wait_for("waiting for a slot in pool 'gpu'", timeout=240)
        holder.kill()  # the holder's process dies while the command waits
        holder.wait()
        out = console.finish(timeout=400)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-4000:]
    assert f"run {holder_run[:8]} (flywheel_job bo|v1) had died" in out
    assert "got the slot in pool 'gpu'" in out
    assert instance.get_run_by_id(holder_run).status == DagsterRunStatus.FAILURE


@pytest.mark.slow
def test_the_daemon_fails_a_dead_run_and_frees_its_slot(project):
    instance = get_instance(project)  # the Dagster instance alone: no git or DVC needed
    dead_ref, _ = _process(alive=False)
    dead = _started_run_holding_gpu(instance, dead_ref)
    workspace = Path(__file__).resolve().parents[2] / "workspace.yaml"
    daemon = subprocess.Popen([str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", str(workspace)],
                              env=_env(project), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE and not _gpu_holders(instance):
                break
            time.sleep(1)
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        out = daemon.communicate(timeout=60)[0]
    assert instance.get_run_by_id(dead).status == DagsterRunStatus.FAILURE, out[-4000:]
    assert not _gpu_holders(instance), "the daemon freed the dead run's slot"
