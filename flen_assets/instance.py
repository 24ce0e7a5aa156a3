"""The project's persistent Dagster instance (DAGSTER_HOME under .flen/dagster), and dead runs.

A run whose process died (kill -9, OOM, power loss) stays STARTED in Dagster's storage and keeps
its pool slots, which blocks every later run of the pool. Dagster's run monitoring frees them when
the run launcher can tell a run worker is dead; `FlenRunLauncher` tells it from the worker's
recorded process. `release_dead_runs` applies the same check from the `flen` commands, so whichever
comes first (a command, `flen ui`, the daemon) frees the slots.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import dagster as dg
from dagster._core.events import DagsterEventType
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus
from dagster._core.storage.dagster_run import FINISHED_STATUSES, DagsterRunStatus, RunsFilter

from flen_resources.atomic import write_text_atomic
from flen_resources.processes import ProcessRef
from flen_resources.project import Project

# The process that executes a run: set by `flen` on the runs it executes in process; runs launched
# by the daemon are known by the pid of their run worker's first engine event.
RUN_PROCESS_TAG = "flen/process"
# Set on a run that died or was stopped midway (how, in words): the same command resumes it.
STOPPED_TAG = "flen/stopped"

# Pools: `gpu` (one big model on the card at a time). Run monitoring asks FlenRunLauncher whether a
# run's worker still lives and fails the run when not; dead_runs_sensor stops the step processes a
# killed worker left and frees the slots of ended runs within seconds; the daemon's own freeing of
# slots (60 s after a run ends) is the backstop.
DAGSTER_YAML = """\
# Written by flen; edit freely, flen only creates it when missing.
telemetry:
  enabled: false
run_launcher:
  module: flen_assets.instance
  class: FlenRunLauncher
run_monitoring:
  enabled: true
  poll_interval_seconds: 10
  max_resume_run_attempts: 0
  free_slots_after_run_end_seconds: 60
concurrency:
  pools:
    default_limit: 1
    granularity: op
  runs:
    max_concurrent_runs: 4
"""

# What earlier versions wrote; a project still holding one of these exact texts gets today's.
_OLD_DAGSTER_YAMLS = ("""\
# Written by flen; edit freely, flen only creates it when missing.
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 60
concurrency:
  pools:
    default_limit: 1
    granularity: op
  runs:
    max_concurrent_runs: 4
""",)

_LIVE_STATUSES = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def ensure_dagster_home(project: Project) -> str:
    """Create DAGSTER_HOME with dagster.yaml if missing, point the environment at it, return it.
    (The project folder reaches runs through run config: flen_assets.runs.project_run_config.)"""
    home = project.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists() or config.read_text() in _OLD_DAGSTER_YAMLS:
        write_text_atomic(config, DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(home)
    return str(home)


def get_instance(project: Project, log: Callable[[str], None] | None = None) -> dg.DagsterInstance:
    """The project's Dagster instance (the same one `flen ui` serves), with dead runs released."""
    ensure_dagster_home(project)
    instance = dg.DagsterInstance.get()
    release_dead_runs(instance, log)
    return instance


def run_process(instance: dg.DagsterInstance, run: dg.DagsterRun) -> ProcessRef | None:
    """The process executing `run`: its flen tag, else the pid of its first engine event (None: unknown yet)."""
    if RUN_PROCESS_TAG in run.tags:
        return ProcessRef.decode(run.tags[RUN_PROCESS_TAG])
    records = instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ENGINE_EVENT, limit=20).records
    for record in records:
        entry = record.event_log_entry
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = data.metadata.get("pid") if data else None
        if pid is not None:
            from flen_resources.processes import this_host

            # The daemon's run launcher starts workers on this host; the event is logged after the worker started.
            return ProcessRef(this_host(), int(pid.value), entry.timestamp)
    return None


def release_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] | None = None) -> list[str]:
    """Fail the live-looking runs whose process died and free every pool slot of an ended run; returns run ids."""
    released = []
    for record in instance.get_run_records(RunsFilter(statuses=_LIVE_STATUSES)):
        run = record.dagster_run
        process = run_process(instance, run)
        if process is None or not process.is_dead():
            continue
        message = (f"the process of this run (pid {process.pid} on {process.host}) is gone: killed, out of memory "
                   "or the machine stopped. Marked failed by flen; its pool slots are freed. Launch it again to "
                   "resume (finished assets and training checkpoints are kept).")
        instance.add_run_tags(run.run_id, {STOPPED_TAG: _where_it_stopped(instance, run)})
        if run.status == DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message)
        else:
            instance.report_run_failed(run, message)
        released.append(run.run_id)
        if log:
            log(f"run {run.run_id[:8]} ({describe_run(run)}) had died: marked failed, its slots freed")
    _free_slots_of_ended_runs(instance, log)
    return released


def _free_slots_of_ended_runs(instance: dg.DagsterInstance, log: Callable[[str], None] | None = None) -> None:
    """Free the pool slots still held by ended runs, once the step processes they left are stopped."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    holders = storage.get_concurrency_run_ids()
    if not holders:
        return
    for record in instance.get_run_records(RunsFilter(run_ids=list(holders), statuses=list(FINISHED_STATUSES))):
        run = record.dagster_run
        # A killed run worker leaves its step processes running: they would keep the card the slot stands for.
        orphans = stop_orphaned_steps(instance, run)
        if orphans and log:
            log(f"run {run.run_id[:8]} had left step processes running (pid {', '.join(map(str, orphans))}): stopped")
        storage.free_concurrency_slots_for_run(run.run_id)


def unfinished_steps(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[str]:
    """The steps a run had started and not finished (where it was when it stopped)."""
    started, ended = [], set()
    ends = {DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE, DagsterEventType.STEP_SKIPPED}
    for record in instance.get_records_for_run(run.run_id, of_type={DagsterEventType.STEP_START, *ends}).records:
        entry = record.event_log_entry
        if entry.dagster_event.event_type == DagsterEventType.STEP_START:
            started.append(entry.step_key)
        else:
            ended.add(entry.step_key)
    return [step for step in started if step not in ended]


def _where_it_stopped(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    steps = unfinished_steps(instance, run)
    return f"died in {', '.join(steps)}" if steps else "died between steps"


def step_processes(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[ProcessRef]:
    """The processes a run started for its steps (the multiprocess executor logs each one's pid)."""
    from flen_resources.processes import this_host

    worker = run_process(instance, run)
    found = []
    for record in instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ENGINE_EVENT).records:
        entry = record.event_log_entry
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = data.metadata.get("pid") if data else None
        if pid is not None and (worker is None or int(pid.value) != worker.pid):
            found.append(ProcessRef(this_host(), int(pid.value), entry.timestamp))
    return found


def stop_orphaned_steps(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[int]:
    """Kill the step processes an ended run left behind (its worker was killed; they would keep the GPU)."""
    import psutil

    killed = []
    for ref in step_processes(instance, run):
        if ref.is_dead():
            continue
        try:
            proc = psutil.Process(ref.pid)
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
            killed.append(ref.pid)
        except psutil.NoSuchProcess:
            pass
    return killed


def describe_run(run: dg.DagsterRun) -> str:
    """'flywheel_job kc|v1' for messages."""
    partition = run.tags.get("dagster/partition", "")
    return f"{run.job_name} {partition}".strip()


def slot_holders(instance: dg.DagsterInstance, run_id: str) -> dict[str, list[tuple[str, str]]]:
    """For each pool where `run_id` waits for a slot: the (run id, step) pairs holding its slots."""
    storage = instance.event_log_storage
    waiting: dict[str, list[tuple[str, str]]] = {}
    for pool in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(pool)
        if run_id in info.pending_run_ids:
            waiting[pool] = [(slot.run_id, slot.step_key) for slot in info.claimed_slots if slot.run_id != run_id]
    return waiting


class FlenRunLauncher(DefaultRunLauncher):
    """Dagster's default launcher, plus a worker health check (for run monitoring) from the run's process."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        process = run_process(self._instance, run)
        if process is None:  # run monitoring fails a run on anything but RUNNING: not known yet is alive
            return CheckRunHealthResult(WorkerStatus.RUNNING, "no process recorded yet")
        if process.is_dead():
            self._instance.add_run_tags(run.run_id, {STOPPED_TAG: _where_it_stopped(self._instance, run)})
            stop_orphaned_steps(self._instance, run)
            return CheckRunHealthResult(WorkerStatus.FAILED,
                                        f"run worker pid {process.pid} on {process.host} is gone (killed or crashed)")
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"pid {process.pid} on {process.host}")
