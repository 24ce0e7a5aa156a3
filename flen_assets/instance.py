"""The project's persistent Dagster instance (DAGSTER_HOME under .flen/dagster), and dead runs.

A run whose process died (kill -9, OOM, power loss) stays STARTED in Dagster's storage and keeps
its pool slots, which blocks every later run of the pool. Dagster's run monitoring frees them when
the run launcher can tell a run worker is dead; `FlenRunLauncher` tells it from the worker's
recorded process. `release_dead_runs` applies the same check from the `flen` commands, so whichever
comes first (a command, `flen ui`, the daemon) frees the slots.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import dagster as dg
import yaml
from dagster._core.events import DagsterEventType
from dagster._core.launcher import CheckRunHealthResult, DefaultRunLauncher, WorkerStatus
from dagster._core.run_coordinator import QueuedRunCoordinator, SubmitRunContext
from dagster._core.storage.dagster_run import FINISHED_STATUSES, DagsterRunStatus, RunsFilter
from dagster._core.storage.tags import PARTITION_NAME_TAG, PRIORITY_TAG

from flen_resources.atomic import write_text_atomic
from flen_resources.deployment import PG_ENV, check_postgres, cluster_settings, setting
from flen_resources.gpu_lease import GPU_POOL, gpu_pool_limit
from flen_resources.processes import ProcessRef
from flen_resources.project import Project, iteration_number, split_partition_key

# The process that executes a run: set by `flen` on the runs it executes in process; runs launched
# by the daemon are known by the pid of their run worker's first engine event.
RUN_PROCESS_TAG = "flen/process"
# Set on a run that died or was stopped midway (how, in words): the same command resumes it.
STOPPED_TAG = "flen/stopped"
# The character of a partition's run, set on every run (FlenRunCoordinator, runs.materialize_partition):
# dagster.yaml's tag_concurrency_limits start one run per character at a time, so vN never runs beside v(N-1).
CHARACTER_TAG = "flen/character"

# Iterations in order: FlenRunCoordinator tags each queued run with its character and priority -N, the
# tag limit on flen/character lets one run per character out of the queue at a time, and among the
# queued runs of a character the lowest iteration goes first (then the oldest).
# Pools: `gpu` (one big model per card: its limit is the number of cards, size_gpu_pool). Run monitoring asks FlenRunLauncher whether a
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
run_coordinator:
  module: flen_assets.instance
  class: FlenRunCoordinator
  config:
    dequeue_interval_seconds: 2
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
    tag_concurrency_limits:
      - key: flen/character
        value:
          applyLimitPerUniqueValue: true
        limit: 1
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
""", """\
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
""")

_LIVE_STATUSES = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]


def postgres_storage_config() -> dict[str, Any]:
    """The `cluster` instance's `storage` section: PostgreSQL, every value read from the environment when the
    instance starts (the password never lands in a file)."""
    names = dict(zip(("hostname", "port", "username", "password", "db_name"), PG_ENV.values()))
    # dagster-postgres installs psycopg2; SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3.
    return {"postgres": {"postgres_db": {**{key: {"env": var} for key, var in names.items()},
                                         "scheme": "postgresql+psycopg2"}}}


def dagster_yaml(cluster: bool) -> str:
    """The dagster.yaml flen writes: DAGSTER_YAML, plus PostgreSQL storage in the `cluster` deployment."""
    return DAGSTER_YAML + (yaml.safe_dump({"storage": postgres_storage_config()}, sort_keys=False) if cluster else "")


def ensure_dagster_home(project: Project) -> str:
    """Create DAGSTER_HOME with dagster.yaml if missing, point the environment at it, return it.
    (The project folder reaches runs through run config: flen_assets.runs.project_run_config.)"""
    cluster = cluster_settings()
    home = project.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    # flen's own texts follow the deployment; a text someone edited is left alone.
    if not config.exists() or config.read_text() in (*_OLD_DAGSTER_YAMLS, dagster_yaml(False), dagster_yaml(True)):
        write_text_atomic(config, dagster_yaml(cluster is not None))
    if cluster is not None:
        # Dagster reads {env: ...}: a value that came from the secrets file must be in the environment.
        os.environ.setdefault(PG_ENV["port"], str(cluster.pg_port))
        for var in PG_ENV.values():
            if var not in os.environ and setting(var):
                os.environ[var] = setting(var)
    os.environ["DAGSTER_HOME"] = str(home)
    return str(home)


def get_instance(project: Project, log: Callable[[str], None] | None = None) -> dg.DagsterInstance:
    """The project's Dagster instance (the same one `flen ui` serves), with dead runs released."""
    ensure_dagster_home(project)
    cluster = cluster_settings()
    if cluster is not None:  # before dagster-postgres, which retries for seconds and logs each try
        check_postgres(cluster)
    instance = dg.DagsterInstance.get()
    release_dead_runs(instance, log)
    size_gpu_pool(instance)
    return instance


def size_gpu_pool(instance: dg.DagsterInstance) -> int:
    """Set the `gpu` pool's limit to the number of cards (gpu_lease.gpu_pool_limit); returns it."""
    limit = gpu_pool_limit()
    storage = instance.event_log_storage
    if storage.get_concurrency_info(GPU_POOL).slot_count != limit:
        storage.set_concurrency_slots(GPU_POOL, limit)
    return limit


def run_process(instance: dg.DagsterInstance, run: dg.DagsterRun) -> ProcessRef | None:
    """The process executing `run`: its flen tag, else the pid of its first engine event (None: unknown yet)."""
    if RUN_PROCESS_TAG in run.tags:
        return ProcessRef.decode(run.tags[RUN_PROCESS_TAG])
    if cluster_settings() is not None:
        # A run worker of the cluster runs on another host or in a pod: its engine event's pid says nothing
        # here. The run launcher's own monitoring (K8sRunLauncher, DockerRunLauncher) tells dead runs.
        return None
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
    # Steps run on their worker's host; a worker nobody can place (a cluster's pod) leaves them unknown.
    host = worker.host if worker is not None else (this_host() if cluster_settings() is None else None)
    if host is None:
        return []
    found = []
    for record in instance.get_records_for_run(run.run_id, of_type=DagsterEventType.ENGINE_EVENT).records:
        entry = record.event_log_entry
        data = entry.dagster_event.engine_event_data if entry.dagster_event else None
        pid = data.metadata.get("pid") if data else None
        if pid is not None and (worker is None or int(pid.value) != worker.pid):
            found.append(ProcessRef(host, int(pid.value), entry.timestamp))
    return found


def stop_orphaned_steps(instance: dg.DagsterInstance, run: dg.DagsterRun) -> list[int]:
    """Kill the step processes an ended run left behind (its worker was killed; they would keep the GPU)."""
    import psutil

    from flen_resources.processes import this_host

    killed = []
    for ref in step_processes(instance, run):
        if ref.host != this_host() or ref.is_dead():  # another host's process is not ours to stop
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
    """'flywheel_job kc|v1' for messages; a run of assets launched from the UI is named by its assets
    ('source_images kc|v1', 'enriched_images +3 kc|v1') rather than Dagster's '__ASSET_JOB'."""
    partition = run.tags.get("dagster/partition", "")
    what = run.job_name
    if what.startswith("__ASSET_JOB") and run.asset_selection:
        names = sorted(key.to_user_string() for key in run.asset_selection)
        what = names[0] + (f" +{len(names) - 1}" if len(names) > 1 else "")
    return f"{what} {partition}".strip()


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


# -- iterations in order ------------------------------------------------------------------------------

# Runs that are on their way or running: a run of the same character must not start beside them.
# (NOT_STARTED: a run `flen` executes in process is created so for a moment before it starts.)
_QUEUED_OR_LIVE = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, *_LIVE_STATUSES]


def partition_of(tags: Mapping[str, str]) -> tuple[str, int] | None:
    """(character, iteration number) of a run's `dagster/partition` tag ('alice|v2'); None when the run
    is not for one character x iteration partition."""
    key = tags.get(PARTITION_NAME_TAG)
    if not key:
        return None
    try:
        character, iteration = split_partition_key(key)
        return character, iteration_number(iteration)
    except ValueError:  # another partitions definition, or an iteration that is not vN
        return None


def order_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """The tags that order a partition's run: its character (for the per-character run limit) and, unless
    set, `dagster/priority` = -N (the queue starts higher priorities first: v1 before v2, v9 before v10)."""
    found = partition_of(tags)
    if found is None:
        return {}
    character, number = found
    extra = {CHARACTER_TAG: character}
    if PRIORITY_TAG not in tags:
        extra[PRIORITY_TAG] = str(-number)
    return {k: v for k, v in extra.items() if tags.get(k) != v}


class FlenRunCoordinator(QueuedRunCoordinator):
    """Dagster's run queue, with each run tagged by its character and iteration (order_tags) before it is
    queued: a run from the UI, a backfill, a sensor or a schedule alike."""

    def submit_run(self, context: SubmitRunContext) -> dg.DagsterRun:
        run = context.dagster_run
        extra = order_tags(run.tags)
        if extra and run.status == DagsterRunStatus.NOT_STARTED:
            self._instance.add_run_tags(run.run_id, extra)
            context = SubmitRunContext(self._instance.get_run_by_id(run.run_id) or run, context.workspace)
        return super().submit_run(context)


def runs_ahead(instance: dg.DagsterInstance, character: str, number: int, exclude: str | None = None, *,
               any_live: bool = False) -> list[dg.DagsterRun]:
    """The runs of `character` that a run of iteration `number` comes after: those of a lower iteration
    that are queued or running, and with `any_live` every running one (one run per character at a time).
    A run whose process is dead does not count (release_dead_runs marks it failed)."""
    found = []
    for record in instance.get_run_records(RunsFilter(statuses=_QUEUED_OR_LIVE)):
        run = record.dagster_run
        where = partition_of(run.tags)
        if run.run_id == exclude or where is None or where[0] != character:
            continue
        live = run.status != DagsterRunStatus.QUEUED
        if not (where[1] < number or (any_live and live)):
            continue
        if live:
            process = run_process(instance, run)
            if process is not None and process.is_dead():
                continue
        found.append(run)
    return sorted(found, key=lambda r: partition_of(r.tags)[1])


def run_state(run: dg.DagsterRun) -> str:
    """'queued', 'starting' or 'running' (started or canceling), for messages."""
    if run.status == DagsterRunStatus.QUEUED:
        return "queued"
    return "starting" if run.status in (DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING) else "running"


def daemon_is_running(instance: dg.DagsterInstance, within_s: float = 60.0) -> bool:
    """Whether a dagster-daemon dequeues this instance's runs (its run-queue heartbeat is recent)."""
    import time

    beat = instance.get_daemon_heartbeats().get("QUEUED_RUN_COORDINATOR")
    return beat is not None and time.time() - beat.timestamp < within_s
