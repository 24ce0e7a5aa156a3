"""Iterations in order: vN of a character never starts before v(N-1) has finished (issue 13).

The rule has three places, all tested here without executing a job:
  * the run queue (dagster.yaml): FlenRunCoordinator tags each run with its character and priority -N;
    the tag limit lets one run per character out at a time, the lowest iteration first;
  * `flen materialize` / `flen iterate` (runs executed in this process) wait their turn;
  * PartitionRun.previous refuses to read v(N-1) while an earlier iteration is queued or running.
The end-to-end check (a backfill of v1..v3 launched from the UI, run by the daemon) is tests/test_ui_launch.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import dagster as dg
import psutil
import pytest
from dagster._core.remote_origin import RegisteredCodeLocationOrigin, RemoteJobOrigin, RemoteRepositoryOrigin
from dagster._core.run_coordinator import SubmitRunContext
from dagster._core.storage.dagster_run import DagsterRun, DagsterRunStatus
from dagster._core.storage.tags import PRIORITY_TAG
from dagster._core.utils import make_new_run_id
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster._daemon.types import DaemonHeartbeat

from flen_assets import runs
from flen_assets.assets.common import PartitionRun
from flen_assets.instance import (
    _OLD_DAGSTER_YAMLS,
    CHARACTER_TAG,
    DAGSTER_YAML,
    RUN_PROCESS_TAG,
    FlenRunCoordinator,
    ensure_dagster_home,
    get_instance,
    runs_ahead,
)
from flen_assets.runs import OutOfTurn, wait_for_turn
from flen_resources.lineage import LineageStore
from flen_resources.processes import ProcessRef, this_host

# Where a run launched from the UI comes from (a queued run must name one).
ORIGIN = RemoteJobOrigin(RemoteRepositoryOrigin(RegisteredCodeLocationOrigin("flenwheel"), "__repository__"),
                         "flywheel_job")


def _run(instance: dg.DagsterInstance, partition: str, status: DagsterRunStatus = DagsterRunStatus.NOT_STARTED,
         owner: ProcessRef | None = None, **tags: str) -> DagsterRun:
    tags = {"dagster/partition": partition, **({RUN_PROCESS_TAG: owner.encode()} if owner else {}), **tags}
    return instance.add_run(DagsterRun(job_name="flywheel_job", run_id=make_new_run_id(), status=status, tags=tags,
                                       remote_job_origin=ORIGIN))


def _submit(instance: dg.DagsterInstance, partition: str, **tags: str) -> DagsterRun:
    """Queue a run the way the webserver, a backfill or a sensor does (instance.submit_run -> coordinator)."""
    run = _run(instance, partition, **tags)
    return instance.run_coordinator.submit_run(SubmitRunContext(run, workspace=None))


def _dequeue_order(instance: dg.DagsterInstance) -> list[str]:
    """The partitions the daemon's run queue would launch now, in order (its own selection code)."""
    daemon = QueuedRunCoordinatorDaemon(interval_seconds=2)
    chosen = daemon._get_runs_to_dequeue(instance, instance.get_concurrency_config(), fixed_iteration_time=None)
    return [run.tags["dagster/partition"] for run in chosen]


@pytest.fixture
def instance(project):
    return get_instance(project)  # the Dagster instance alone: no git or DVC needed


def test_the_instance_limits_runs_per_character(instance):
    assert isinstance(instance.run_coordinator, FlenRunCoordinator)
    queue = instance.get_concurrency_config().run_queue_config
    assert {"key": CHARACTER_TAG, "value": {"applyLimitPerUniqueValue": True}, "limit": 1} in queue.tag_concurrency_limits


@pytest.mark.parametrize("old", range(len(_OLD_DAGSTER_YAMLS)))
def test_every_old_instance_config_is_upgraded(project, old):
    config = project.dagster_home / "dagster.yaml"
    config.parent.mkdir(parents=True)
    config.write_text(_OLD_DAGSTER_YAMLS[old])
    ensure_dagster_home(project)
    assert config.read_text() == DAGSTER_YAML


def test_the_queue_starts_one_run_per_character_lowest_iteration_first(instance):
    # Submitted out of order (as two launches can be, or a backfill past v9: 'v10' < 'v2' as text).
    for partition in ("alice|v3", "alice|v10", "alice|v2", "alice|v1", "bob|v1"):
        queued = _submit(instance, partition)
        assert queued.status == DagsterRunStatus.QUEUED
        number = int(partition.split("|v")[1])
        assert queued.tags[CHARACTER_TAG] == partition.split("|")[0] and queued.tags[PRIORITY_TAG] == str(-number)
    assert _dequeue_order(instance) == ["alice|v1", "bob|v1"]

    by_partition = {r.tags["dagster/partition"]: r for r in instance.get_runs()}
    instance.run_storage.handle_run_event(by_partition["alice|v1"].run_id, dg.DagsterEvent(  # alice v1 starts
        event_type_value=dg.DagsterEventType.RUN_START.value, job_name="flywheel_job"))
    assert _dequeue_order(instance) == ["bob|v1"], "alice v2 waits while alice v1 runs"
    instance.report_run_failed(instance.get_run_by_id(by_partition["alice|v1"].run_id), "done")
    assert _dequeue_order(instance) == ["bob|v1", "alice|v2"], "then alice v2, not v3 nor v10"


def test_a_priority_set_by_the_user_is_kept(instance):
    queued = _submit(instance, "alice|v2", **{PRIORITY_TAG: "5"})
    assert queued.tags[PRIORITY_TAG] == "5" and queued.tags[CHARACTER_TAG] == "alice"


@pytest.fixture
def live_process():
    proc = subprocess.Popen(["sleep", "600"])
    yield ProcessRef(this_host(), proc.pid, psutil.Process(proc.pid).create_time())
    proc.kill()
    proc.wait()


def test_runs_ahead(instance, live_process):
    dead = subprocess.Popen(["true"])
    dead.wait()
    dead_ref = ProcessRef(this_host(), dead.pid, time.time() - 5)
    v1 = _run(instance, "alice|v1", DagsterRunStatus.STARTED, live_process)
    _run(instance, "alice|v2", DagsterRunStatus.STARTED, dead_ref)  # died: released later, blocks nothing
    v3 = _run(instance, "alice|v3", DagsterRunStatus.QUEUED)
    _run(instance, "bob|v1", DagsterRunStatus.STARTED, live_process)
    _run(instance, "alice|v1", DagsterRunStatus.SUCCESS)
    ids = lambda found: [r.run_id for r in found]  # noqa: E731
    assert ids(runs_ahead(instance, "alice", 2)) == [v1.run_id]
    assert ids(runs_ahead(instance, "alice", 4)) == [v1.run_id, v3.run_id]
    assert ids(runs_ahead(instance, "alice", 1)) == []
    assert ids(runs_ahead(instance, "alice", 1, any_live=True)) == [v1.run_id], "one run of a character at a time"
    assert ids(runs_ahead(instance, "alice", 2, exclude=v1.run_id)) == []
    starting = _run(instance, "carol|v1", DagsterRunStatus.NOT_STARTED, live_process)  # `flen` creates, then starts
    assert ids(runs_ahead(instance, "carol", 2)) == [starting.run_id]


def test_materialize_waits_for_a_running_run_of_the_character(instance, live_process, monkeypatch):
    monkeypatch.setattr(runs, "_TURN_INTERVAL_S", 0.05)
    v1 = _run(instance, "alice|v1", DagsterRunStatus.STARTED, live_process)
    said: list[str] = []
    waiter = threading.Thread(target=wait_for_turn, args=(instance, "alice", 2, said.append), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while not said and time.monotonic() < deadline:
        time.sleep(0.05)
    assert said and f"waiting for run {v1.run_id[:8]} (flywheel_job alice|v1, running)" in said[0], said
    assert waiter.is_alive()
    instance.report_run_failed(instance.get_run_by_id(v1.run_id), "finished")
    waiter.join(10)
    assert not waiter.is_alive() and said[-1] == "  … alice's turn: starting"


def test_a_queued_earlier_iteration_comes_first(instance, monkeypatch):
    monkeypatch.setattr(runs, "_TURN_INTERVAL_S", 0.05)
    v1 = _submit(instance, "alice|v1")
    with pytest.raises(OutOfTurn, match=rf"run {v1.run_id[:8]} \(flywheel_job alice\|v1\) is queued and comes first, "
                                        r"but no dagster-daemon runs to start it: start `flen ui`"):
        wait_for_turn(instance, "alice", 2, print)
    wait_for_turn(instance, "alice", 1, print)  # a later-queued or same iteration does not hold v1 back
    wait_for_turn(instance, "bob", 2, print)

    # With a daemon to start it, v2 waits for the queued v1 instead.
    instance.add_daemon_heartbeat(DaemonHeartbeat(time.time(), "QUEUED_RUN_COORDINATOR", "d", None))
    said: list[str] = []
    waiter = threading.Thread(target=wait_for_turn, args=(instance, "alice", 2, said.append), daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10  # a busy CI box may take a while to run the thread's first check
    while not said and time.monotonic() < deadline:
        time.sleep(0.05)
    assert waiter.is_alive() and said and "queued" in said[0], said
    instance.run_coordinator.cancel_run(v1.run_id)
    waiter.join(10)
    assert not waiter.is_alive()


def test_previous_refuses_while_an_earlier_iteration_is_unfinished(instance, project):
    lineage = LineageStore(project.lineage_dir)
    own = _run(instance, "alice|v2", DagsterRunStatus.STARTED)
    context = SimpleNamespace(instance=instance, run_id=own.run_id)
    run = PartitionRun(context=context, project=project, lineage=lineage, asset="training_set",
                       character="alice", iteration="v2")
    v1 = _submit(instance, "alice|v1")
    with pytest.raises(dg.Failure, match=rf"training_set alice\|v2 reads synthetic_batch of v1, but run "
                                         rf"{v1.run_id[:8]} \(flywheel_job alice\|v1\) is queued: iterations of "
                                         r"one character run in order; launch alice\|v2 again once it has finished"):
        run.previous("synthetic_batch")
    instance.run_coordinator.cancel_run(v1.run_id)
    # v1 has ended: the read goes on (and fails here only because v1 was never materialized).
    with pytest.raises(dg.Failure, match=r"materialize synthetic_batch for partition alice\|v1 first"):
        run.previous("synthetic_batch")


@pytest.mark.slow
def test_flen_materialize_says_when_it_must_wait_for_a_queued_run(project, instance):
    v1 = _submit(instance, "alice|v1")
    env = {**os.environ, "FLEN_PROJECT_DIR": str(project.root), "DAGSTER_HOME": str(project.dagster_home),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "flen_assets", "materialize", "alice", "v2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: run {v1.run_id[:8]} (flywheel_job alice|v1) is queued and comes first" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [r.tags["dagster/partition"] for r in instance.get_runs()] == ["alice|v1"], "nothing was started"


def test_a_run_launched_from_the_asset_page_is_named_by_its_assets():
    from flen_assets.instance import describe_run

    one = DagsterRun(job_name="__ASSET_JOB", run_id=make_new_run_id(), tags={"dagster/partition": "alice|v1"},
                     asset_selection=frozenset({dg.AssetKey("source_images")}))
    many = DagsterRun(
        job_name="__ASSET_JOB", run_id=make_new_run_id(), tags={"dagster/partition": "alice|v2"},
        asset_selection=frozenset({dg.AssetKey("training_set"), dg.AssetKey("enriched_images")}))
    assert describe_run(one) == "source_images alice|v1"
    assert describe_run(many) == "enriched_images +1 alice|v2"
