"""Services started together and stopped together (what `flen ui` does with Dagster's webserver and daemon)."""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from flen_resources.supervisor import ServiceExited, Services

pytestmark = pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
PY = sys.executable


def _script(code: str) -> list[str]:
    return [PY, "-u", "-c", textwrap.dedent(code)]


def _pids(services: Services) -> set[int]:
    found = set()
    for service in services.services.values():
        try:
            proc = psutil.Process(service.proc.pid)
            found |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    return found


def _all_gone(pids: set[int]) -> bool:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return not alive


def test_when_one_service_dies_it_is_named_with_its_last_lines_and_the_other_is_stopped():
    out = io.StringIO()
    with Services(os.environ, out=out, grace_s=10) as services:
        services.start("daemon", _script("""
            import subprocess, time
            subprocess.Popen(["sleep", "600"])  # a child of its own, like a code server
            print("daemon up", flush=True)
            time.sleep(600)
        """))
        services.start("webserver", _script("""
            import sys
            print("\\x1b[32mloading\\x1b[0m")
            print("port 3000 already in use")
            sys.exit(3)
        """))
        with pytest.raises(ServiceExited) as exc:
            services.watch(poll_s=0.05)
        assert exc.value.name == "webserver" and exc.value.returncode == 3 and exc.value.how == "exit status 3"
        assert exc.value.tail == ["loading", "port 3000 already in use"], "colours stripped outside a terminal"
        deadline = time.monotonic() + 10
        while "daemon | daemon up" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        started = _pids(services)
        assert len(started) == 2, "the daemon and its child"
        codes = services.stop()
    assert codes == {"daemon": -signal.SIGTERM, "webserver": 3}
    assert _all_gone(started), "the daemon's child was stopped with it"
    assert "webserver | port 3000 already in use" in out.getvalue()


def test_a_service_that_ignores_sigterm_is_killed_after_the_grace_period():
    out = io.StringIO()
    services = Services(os.environ, out=out, grace_s=1)
    services.start("stubborn", _script("""
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(600)
    """))
    deadline = time.monotonic() + 10
    while "ready" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = _pids(services)
    began = time.monotonic()
    assert services.stop() == {"stubborn": None}
    assert time.monotonic() - began < 8
    assert _all_gone(started)
    assert "stubborn did not stop within 1s of SIGTERM: killed" in out.getvalue()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not shutil.which("setpriv"),
                    reason="PR_SET_PDEATHSIG is Linux's, set through util-linux's setpriv")
def test_services_stop_when_the_supervisor_is_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    supervisor = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
        import os, sys, time
        from flen_resources.supervisor import Services
        services = Services(os.environ)
        services.start("child", [sys.executable, "-c",
                                 "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"])
        time.sleep(600)
    """)], env=os.environ)
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        child = psutil.Process(int(pid_file.read_text()))
        supervisor.kill()  # kill -9: no chance to stop its services itself
        supervisor.wait()
        child.wait(timeout=10)  # the kernel sent it SIGTERM
    finally:
        supervisor.kill()
