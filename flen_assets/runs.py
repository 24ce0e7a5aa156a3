"""Run services the CLI and the demo share: create a project, materialize a partition, iterate a character,
and read a run's result (why a step failed, which review gates stopped it).

The project is a value: every service takes a Project, and a run gets its folder through run config
(`project_run_config`), never through the environment.

A run executes on a worker thread of this process while this thread watches it: it says which run
holds a pool slot the run waits for, releases slots of runs whose process died, and on Ctrl-C or
SIGTERM marks the run canceled and frees its slots, so nothing is left holding a pool.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import dagster as dg
from dagster._core.utils import make_new_run_id

from flen_assets.console import console_loggers
from flen_assets.instance import (
    CHARACTER_TAG,
    RUN_PROCESS_TAG,
    STOPPED_TAG,
    daemon_is_running,
    describe_run,
    get_instance,
    release_dead_runs,
    run_state,
    runs_ahead,
    slot_holders,
)
from flen_resources.processes import ProcessRef
from flen_resources.project import Project, flen_command, iteration_number
from flen_resources.run_settings import CPU_DEMO

Log = Callable[[str], None]

def with_run_settings(run_config: dict | None, name: str | None) -> dict | None:
    """`run_config` with the run settings named (auto | cpu-demo | 24gb-card | large-card); None keeps the default."""
    if name is None:
        return run_config
    run_config = dict(run_config or {})
    resources = dict(run_config.get("resources") or {})
    resources["run_settings"] = {"config": {"name": name}}
    return {**run_config, "resources": resources}


# What `flen demo` runs: the embedded tiny pack's CPU-sized settings, whatever the machine.
DEMO_RUN_CONFIG = with_run_settings(None, CPU_DEMO.name)


def _patch_busy_slot_wait() -> None:
    """Make a run blocked on a pool sleep until its next claim check instead of spinning.

    Dagster 1.13's InstanceConcurrencyContext returns min(0, ...) as the time to the next claim
    check, so the in-process executor sleeps 0 s and a waiting run spins at 100% CPU, holding the
    GIL the watcher thread needs (dagster-io/dagster PR 20367, closed unmerged). Remove this once
    Dagster returns max(0, ...) itself.
    """
    from dagster._core.execution.plan.instance_concurrency_context import InstanceConcurrencyContext

    def interval_to_next_pending_claim_check(self: InstanceConcurrencyContext) -> float:
        if not self._pending_claims or not self._pending_timeouts:
            return 0.0
        now = time.time()
        return max(0.0, min(ready_at - now for ready_at in self._pending_timeouts.values()))

    InstanceConcurrencyContext.interval_to_next_pending_claim_check = interval_to_next_pending_claim_check


_patch_busy_slot_wait()

# How often the watcher looks at the pools: each look costs about 0.1 s of CPU (Dagster reconciles its
# pool tables), a tenth of a core at one look a second. A run that ends or is stopped is seen at once.
_WATCH_INTERVAL_S = 3.0
_RELEASE_INTERVAL_S = 5.0  # how often, while waiting for a slot, it looks for dead holders
# What the user asked for, as a digest: a rerun of the same request may resume a stopped run.
REQUEST_TAG = "flen/request"


class RunInterrupted(Exception):
    """The user stopped a run (Ctrl-C or SIGTERM); it was marked canceled and its slots freed."""

    def __init__(self, run_id: str):
        super().__init__(f"run {run_id} interrupted")
        self.run_id = run_id


class SelectionError(ValueError):
    """`start_at` names no asset of the job: the message says why (the CLI reports it against --from)."""


class NothingToIterate(ValueError):
    """The character has no complete iteration to continue from."""


class OutOfTurn(ValueError):
    """A run must wait for another run of its character that nothing will start (or the wait was stopped)."""


def init_project(project: Project, log: Log | None = None) -> dg.DagsterInstance:
    """Create the project's folders, git + DVC with a local remote, lineage tables and Dagster home."""
    from flen_resources.bucket import cluster_bucket
    from flen_resources.lineage import LineageStore
    from flen_resources.storage import DvcStore

    # The cluster's servers first: one unreachable is one line naming it, with nothing written yet.
    bucket = cluster_bucket()
    if bucket is not None:
        bucket.check()
    instance = get_instance(project, log)
    for folder in (project.data_dir, project.inbox_dir, project.state_dir, project.staging_dir, project.locks_dir):
        folder.mkdir(parents=True, exist_ok=True)
    DvcStore(project).ensure_repo()
    LineageStore(project.lineage_dir).ensure()
    DvcStore(project).clean_staging()
    return instance


def downstream_of(asset: str, job_name: str) -> list[dg.AssetKey]:
    """`asset` and every asset of the job downstream of it (what changes when `asset` changes);
    SelectionError when the job has no such asset."""
    from flen_assets.definitions import defs
    from flen_assets.jobs import TRAINING_SET_ASSETS

    graph = defs.resolve_asset_graph()
    if dg.AssetKey(asset) not in graph.get_all_asset_keys():
        raise SelectionError(f"no asset named {asset!r}")
    keys = dg.AssetSelection.assets(asset).downstream().resolve(graph)
    if job_name == "training_set_job":
        keys &= {dg.AssetKey(a) for a in TRAINING_SET_ASSETS}
        if not keys:
            raise SelectionError(f"{asset} is not part of the training-set chain; add --all")
    return sorted(keys, key=lambda k: k.to_user_string())


def materialize_partition(project: Project, character: str, iteration: str, run_config: dict | None = None,
                          job_name: str = "training_set_job", start_at: str | None = None,
                          log: Log = print, restart: bool = False) -> dg.ExecuteInProcessResult:
    """Run a job for one partition on the project's Dagster instance (the run shows in the UI);
    with `start_at`, only that asset and what is downstream of it in the job. When the same
    command's last run died or was stopped, only the assets it had not finished run (unless `restart`)."""
    from flen_assets.definitions import defs
    from flen_assets.partitions import add_partitions, check_new_partition
    from flen_resources.disk import HEADROOM_BYTES, require_space

    selection = downstream_of(start_at, job_name) if start_at else None
    # A run on a full disk would die inside SQLite with a page of trace: say it before starting.
    require_space({project.state_dir: HEADROOM_BYTES})
    instance = init_project(project, log)
    check_new_partition(project, instance, character, iteration)  # PartitionRefused: nothing registered
    key = add_partitions(instance, character, iteration)
    wait_for_turn(instance, character, iteration_number(iteration), log)
    job = defs.resolve_job_def(job_name)
    request = request_tag(job_name, str(key), selection, run_config)
    resumed = None if restart else find_resumable(instance, job, str(key), request)
    if resumed is not None:
        selection = resumed.remaining
        log(f"resuming run {resumed.run_id[:8]}, which {resumed.how}: {', '.join(resumed.kept)} "
            "are kept from it (--restart rebuilds everything)")
    ops = (run_config or {}).get("ops", {})
    if selection is not None:  # config of assets outside the selection would be rejected
        wanted = {k.to_python_identifier() for k in selection}
        run_config = {**(run_config or {}), "ops": {k: v for k, v in ops.items() if k in wanted}}
    config = project_run_config(project, {"loggers": console_loggers(), **(run_config or {})})
    tags = {REQUEST_TAG: request, CHARACTER_TAG: character, **({"flen/resumes": resumed.run_id} if resumed else {})}
    return execute_watched(job, instance, log, tags, partition_key=str(key), run_config=config,
                           asset_selection=selection)


# The resources that read the project folder; `project_run_config` points each at the run's project.
PROJECT_RESOURCES = ("project", "partition_io_manager")


def project_run_config(project: Project, run_config: dict | None = None) -> dict:
    """`run_config` with the project folder set on every resource that reads it: how a run of this
    process knows its project (a run launched by the UI or the daemon finds it in $FLEN_PROJECT_DIR)."""
    run_config = dict(run_config or {})
    resources = dict(run_config.get("resources") or {})
    for name in PROJECT_RESOURCES:
        entry = dict(resources.get(name) or {})
        entry["config"] = {**(entry.get("config") or {}), "project_dir": str(project.root)}
        resources[name] = entry
    run_config["resources"] = resources
    return run_config


def iterate_character(project: Project, character: str, run_config: dict | None = None,
                      log: Log = print) -> tuple[str, dg.ExecuteInProcessResult]:
    """Add v(N+1) after the last complete iteration N and run the whole flywheel for it:
    (the new iteration, its run's result); NothingToIterate when there is no complete iteration."""
    # What runs of this character are queued or running come first: the last complete one is known after them.
    wait_for_turn(get_instance(project, log), character, _AFTER_ALL, log)
    done = project.latest_iteration(character)
    if done == 0:
        raise NothingToIterate(f"{character} has no complete iteration yet: "
                               f"run `{flen_command(project, 'materialize', character, 'v1', '--all')}` first")
    nxt = f"v{done + 1}"
    log(f"{character}: v{done} is complete (synthetic batch published); launching {nxt}")
    return nxt, materialize_partition(project, character, nxt, run_config, "flywheel_job", log=log)


_AFTER_ALL = 10**9  # an iteration number after every queued one
_TURN_INTERVAL_S = 1.0  # how often a run waiting for its turn looks again


def wait_for_turn(instance: dg.DagsterInstance, character: str, number: int, log: Log) -> None:
    """Wait until no run of `character` is running and none of an iteration below `number` is queued:
    one run per character at a time, iterations in order (the run queue's rule, for runs this process
    executes). OutOfTurn when a queued run comes first and no daemon runs to start it, or on Ctrl-C."""
    said: tuple = ()
    last_release = time.monotonic()
    try:
        with _sigterm_as_interrupt():
            while ahead := runs_ahead(instance, character, number, any_live=True):
                queued = [run for run in ahead if run_state(run) == "queued"]
                if queued and not daemon_is_running(instance):
                    raise OutOfTurn(f"run {queued[0].run_id[:8]} ({describe_run(queued[0])}) is queued and comes first, "
                                    "but no dagster-daemon runs to start it: start `flen ui` (it runs the daemon) "
                                    "and let it finish, or terminate it in the UI, then run this again")
                if tuple(run.run_id for run in ahead) != said:
                    said = tuple(run.run_id for run in ahead)
                    runs = ", ".join(f"run {run.run_id[:8]} ({describe_run(run)}, {run_state(run)})" for run in ahead)
                    log(f"  … waiting for {runs}: one run of {character} at a time, iterations in order; "
                        "this one starts after (Ctrl-C to stop)")
                time.sleep(_TURN_INTERVAL_S)
                if time.monotonic() - last_release > _RELEASE_INTERVAL_S:
                    last_release = time.monotonic()
                    release_dead_runs(instance, log)
    except KeyboardInterrupt:
        raise OutOfTurn(f"stopped while waiting for its turn: nothing of {character} was started") from None
    if said:
        log(f"  … {character}'s turn: starting")


REVIEW_CHECKS = ("review_complete", "synthetic_review_complete", "sources_review_complete")


def user_error(error: Any) -> Any:
    """The error the step's code raised, under Dagster's wrappers (DagsterExecutionStepExecutionError,
    DagsterResourceFunctionError, ...): walks `cause` while the error is Dagster's own, and stops at the
    first other one, which names its own cause (ModelNotAvailable from the hub's LocalEntryNotFoundError)."""
    while getattr(error, "cause", None) is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    return error


def root_cause(error: Any) -> str:
    """One line a user can act on: the first line of the step's own error, without Dagster's wrapper.

    FLENwheel's errors (and dg.Failure) carry the cause and the fix in their first line, so their class
    name is left out; another error keeps its short class name (`KeyError: 'x'`)."""
    error = user_error(error)
    lines = error.message.strip().splitlines()
    if not lines:
        return error.cls_name
    first = lines[0].strip()
    qualified, sep, rest = first.partition(": ")
    if sep and qualified.split(".")[-1] == error.cls_name:
        module = qualified.rpartition(".")[0]
        first = rest if module.startswith(("flen_", "dagster")) else f"{error.cls_name}: {rest}"
    elif first in (error.cls_name, f"{error.cls_name}:"):
        first = error.cls_name
    return first


def is_review_stop(error: Any) -> bool:
    """Whether a step failed only because a review check (a human's decision pending) blocked it."""
    message = user_error(error).message
    return "blocking asset check failed" in message and any(c in message for c in REVIEW_CHECKS)


def failed_steps(result: dg.ExecuteInProcessResult) -> list[tuple[str, str]]:
    """(step, cause) for each step that failed in a run, in order (a review gate's stop is no failure),
    or ("run", cause) when the run failed before any step (a resource that could not start)."""
    steps = [(e.step_key, root_cause(e.event_specific_data.error)) for e in result.all_events
             if e.event_type_value == "STEP_FAILURE" and not is_review_stop(e.event_specific_data.error)]
    if steps or result.success:
        return steps
    for event in result.all_events:
        error = getattr(event.event_specific_data, "error", None)
        if event.event_type_value in ("RUN_FAILURE", "ENGINE_EVENT") and error is not None:
            return [("run", root_cause(error))]
    return []


def review_gate_stops(result: dg.ExecuteInProcessResult) -> list[tuple[str, int]]:
    """(asset, pending) for each review check that failed in a run: the run stopped at the review gate."""
    stops = []
    for event in result.all_events:
        if event.event_type_value == "ASSET_CHECK_EVALUATION":
            check = event.event_specific_data
            if check.check_name in REVIEW_CHECKS and not check.passed:
                pending = check.metadata.get("pending")
                stops.append((check.asset_key.to_user_string(), int(pending.value) if pending else 0))
    return stops


@dataclass(frozen=True)
class Resumable:
    """A dead or stopped run of the same request: which assets it finished and which remain."""

    run_id: str
    how: str
    kept: list[str]
    remaining: list[dg.AssetKey]


def request_tag(job_name: str, partition: str, selection: list[dg.AssetKey] | None, run_config: dict | None) -> str:
    """A digest of what the user asked for (job, partition, selection, config): equal requests may resume."""
    text = json.dumps([job_name, partition, sorted(k.to_user_string() for k in selection or []), run_config or {}],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def find_resumable(instance: dg.DagsterInstance, job: dg.JobDefinition, partition: str,
                   request: str) -> Resumable | None:
    """The last run of this partition, when it was the same request and died or was stopped midway."""
    from dagster._core.storage.dagster_run import RunsFilter

    last = instance.get_runs(filters=RunsFilter(job_name=job.name, tags={"dagster/partition": partition}), limit=1)
    if not last or last[0].tags.get(STOPPED_TAG) is None or last[0].tags.get(REQUEST_TAG) != request:
        return None
    run = last[0]
    everything = job.asset_layer.selected_asset_keys
    planned = run.asset_selection or everything  # a resumed run planned only what its parent left
    done = {e.step_key for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)}
    remaining = sorted((k for k in planned if k.to_python_identifier() not in done), key=lambda k: k.to_user_string())
    kept = sorted(k.to_user_string() for k in everything if k not in remaining)
    if not kept or not remaining:
        return None
    return Resumable(run.run_id, run.tags[STOPPED_TAG], kept, remaining)


def execute_watched(job: dg.JobDefinition, instance: dg.DagsterInstance, log: Log, tags: dict[str, str],
                    **kwargs: Any) -> dg.ExecuteInProcessResult:
    """`job.execute_in_process` on a worker thread, watched from this one (slot waits, dead holders, Ctrl-C)."""
    run_id = make_new_run_id()
    tags = {**tags, RUN_PROCESS_TAG: ProcessRef.current().encode()}
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = job.execute_in_process(instance=instance, run_id=run_id, tags=tags,
                                                       raise_on_error=False, **kwargs)
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    # A daemon thread: after Ctrl-C the process may exit while the step still computes (its writes
    # are staged and atomic, so stopping it anywhere loses nothing).
    worker = threading.Thread(target=work, name=f"run-{run_id[:8]}", daemon=True)
    with _sigterm_as_interrupt():
        worker.start()
        try:
            _watch(worker, run_id, log)
        except KeyboardInterrupt:
            cancel_run(run_id, "stopped by the user (Ctrl-C or SIGTERM)")
            raise RunInterrupted(run_id) from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _watch(worker: threading.Thread, run_id: str, log: Log) -> None:
    """Until the worker ends: say when the run waits for a pool slot and who holds it; free dead holders."""
    monitor = dg.DagsterInstance.get()  # its own connections: the worker thread uses the other instance
    said: dict[str, tuple] = {}
    last_release = 0.0
    while worker.is_alive():
        worker.join(_WATCH_INTERVAL_S)
        if not worker.is_alive():
            break
        waiting = slot_holders(monitor, run_id)
        for pool, holders in waiting.items():
            if said.get(pool) != tuple(holders):
                said[pool] = tuple(holders)
                log(f"  … waiting for a slot in pool '{pool}': {_holders_text(monitor, holders)}; "
                    "it starts when that run ends (Ctrl-C to stop)")
        if waiting and time.monotonic() - last_release > _RELEASE_INTERVAL_S:
            last_release = time.monotonic()
            release_dead_runs(monitor, log)
        for pool in set(said) - set(waiting):
            del said[pool]
            log(f"  … got the slot in pool '{pool}'")


def _holders_text(instance: dg.DagsterInstance, holders: list[tuple[str, str]]) -> str:
    """'held by run 1a2b3c4d (flywheel_job kc|v1, step flux_lora)' for each holder."""
    if not holders:
        return "all its slots are taken"
    parts = []
    for holder_id, step in holders:
        run = instance.get_run_by_id(holder_id)
        what = describe_run(run) if run else "unknown run"
        parts.append(f"run {holder_id[:8]} ({what}, step {step})")
    return "held by " + ", ".join(parts)


def cancel_run(run_id: str, why: str) -> None:
    """Mark a run of this process canceled and free its pool slots."""
    instance = dg.DagsterInstance.get()
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.add_run_tags(run_id, {STOPPED_TAG: "was stopped"})
        instance.report_run_canceled(run, why)
    if instance.event_log_storage.supports_global_concurrency_limits:
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt in this (the main) thread, so `kill` stops a run as cleanly as Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signo: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
