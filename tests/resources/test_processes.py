"""ProcessRef: a recorded owner process is dead only when this host can tell it is gone."""

from __future__ import annotations

import subprocess
import time

from flen_resources.processes import ProcessRef, pid_alive, this_host


def _dead_process() -> ProcessRef:
    """The ref of a process that ran and was killed (and reaped)."""
    import psutil

    proc = subprocess.Popen(["sleep", "60"])
    ref = ProcessRef(this_host(), proc.pid, psutil.Process(proc.pid).create_time())
    proc.kill()
    proc.wait()
    return ref


def test_this_process_is_alive_and_round_trips():
    ref = ProcessRef.current()
    assert not ref.is_dead()
    assert ProcessRef.decode(ref.encode()) == ProcessRef(ref.host, ref.pid, round(ref.started, 2))


def test_a_killed_process_is_dead():
    assert _dead_process().is_dead()


def test_a_reused_pid_is_another_process():
    # This PID is alive, but it was started long after the recorded owner: the owner is gone.
    ref = ProcessRef.current()
    older = ProcessRef(ref.host, ref.pid, ref.started - 3600)
    assert older.is_dead()
    assert not pid_alive(ref.pid, started_by=time.time() - 10 ** 7)


def test_another_hosts_process_is_never_judged_dead():
    dead = _dead_process()
    assert not ProcessRef("some-other-host", dead.pid, dead.started).is_dead()


def test_decode_refuses_what_is_not_a_ref():
    for text in ("", "abc", "host:pid:time", "host:12", "astronaut-v1-1234abcd"):
        assert ProcessRef.decode(text) is None, text
