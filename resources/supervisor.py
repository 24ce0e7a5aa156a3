"""Long-running processes started together and stopped together (`flen ui`: Dagster's webserver and daemon).

Each service runs in a session of its own, so a Ctrl+C in the terminal reaches only the supervisor,
which then stops every service the same way: SIGTERM, SIGKILL after a grace period, and then the
same for what the service started and left in its process group (code servers, run workers). On
Linux a service also gets SIGTERM when the supervisor dies without stopping it (killed with -9).
Each service's output is copied to the supervisor's, prefixed with its name, and its last lines are
kept for the message that says why it stopped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import cache
from typing import IO

import psutil

TAIL_LINES = 20
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ServiceExited(RuntimeError):
    """A service stopped by itself: which one, its exit status and its last lines."""

    def __init__(self, name: str, returncode: int, tail: Sequence[str]):
        self.name, self.returncode, self.tail = name, returncode, list(tail)
        self.how = f"exit status {returncode}" if returncode >= 0 else f"killed by {signal.Signals(-returncode).name}"
        super().__init__(f"{name} stopped ({self.how})")


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    reader: threading.Thread | None = None


@cache
def _parent_death_prefix() -> tuple[str, ...]:
    """A command prefix that makes the kernel send the service SIGTERM when its parent dies (Linux
    PR_SET_PDEATHSIG, through util-linux's setpriv); empty where that is not available.

    Not a Popen preexec_fn: Python code between fork and exec can deadlock in a process with other
    threads (a test runner's, or this supervisor's output readers), and such a child ignores SIGTERM.
    """
    if not sys.platform.startswith("linux"):
        return ()
    setpriv = shutil.which("setpriv")
    return (setpriv, "--pdeathsig", "TERM", "--") if setpriv else ()


class Services:
    """Named processes sharing one environment; use as a context manager: leaving it stops them all."""

    def __init__(self, env: Mapping[str, str], cwd: str | None = None, out: IO[str] | None = None,
                 grace_s: float = 20.0, on_line: Callable[[str, str], None] | None = None):
        self.env, self.cwd, self.grace_s, self.on_line = dict(env), cwd, grace_s, on_line
        self.out = out or sys.stdout
        self.services: dict[str, Service] = {}
        self._write = threading.Lock()

    def __enter__(self) -> Services:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, name: str, argv: Sequence[str]) -> Service:
        proc = subprocess.Popen([*_parent_death_prefix(), *argv], env=self.env, cwd=self.cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        service = Service(name, proc)
        service.reader = threading.Thread(target=self._copy, args=(service,), name=f"{name}-output", daemon=True)
        service.reader.start()
        self.services[name] = service
        return service

    def say(self, line: str) -> None:
        """A line of the supervisor's own, between the services' lines."""
        with self._write:
            self.out.write(line + "\n")
            self.out.flush()

    def _copy(self, service: Service) -> None:
        assert service.proc.stdout is not None
        plain = not (hasattr(self.out, "isatty") and self.out.isatty())
        for raw in iter(service.proc.stdout.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            if plain:  # colours are for a terminal, not for a log file
                line = _ANSI.sub("", line)
            service.tail.append(line)
            self.say(f"{service.name} | {line}")
            if self.on_line:
                self.on_line(service.name, line)

    def watch(self, poll_s: float = 0.5) -> None:
        """Return never: raise ServiceExited as soon as one service stops (KeyboardInterrupt passes through)."""
        while True:
            for service in self.services.values():
                code = service.proc.poll()
                if code is not None:
                    if service.reader is not None:
                        service.reader.join(5)  # its last lines
                    raise ServiceExited(service.name, code, service.tail)
            time.sleep(poll_s)

    def stop(self, leftovers_s: float = 5.0) -> dict[str, int | None]:
        """Stop every service, then what it started and left (its process group: code servers, run
        workers): SIGTERM to each service, SIGKILL to one still running after the grace period; then
        SIGTERM to what is left in its group, SIGKILL after `leftovers_s`. A second Ctrl+C kills at once.
        Returns each service's exit status (None: it was killed)."""
        killed = set()
        try:
            for service in self.services.values():
                if service.proc.poll() is None:
                    service.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + self.grace_s
            for service in self.services.values():
                with suppress(subprocess.TimeoutExpired):
                    service.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            for service in self.services.values():
                if service.proc.poll() is None:
                    self.say(f"{service.name} did not stop within {self.grace_s:.0f}s of SIGTERM: killed")
                    killed.add(service.name)
                    _signal_group(service.proc.pid, signal.SIGKILL)
            left = [s for s in self.services.values() if _group_alive(s.proc.pid)]
            for service in left:
                _signal_group(service.proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + leftovers_s
            while time.monotonic() < deadline and any(_group_alive(s.proc.pid) for s in left):
                time.sleep(0.1)
        except KeyboardInterrupt:
            self.say("interrupted again: killing what is left")
        for service in self.services.values():
            _signal_group(service.proc.pid, signal.SIGKILL)
            service.proc.wait()
            if service.reader is not None:
                service.reader.join(2)
        return {name: (None if name in killed else s.proc.returncode) for name, s in self.services.items()}


def _signal_group(pgid: int, sig: int) -> None:
    """Signal a service's process group (the service leads it: start_new_session)."""
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, which only wait to be reaped, do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for proc in psutil.process_iter(["status"]):
        with suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
    return False


@contextmanager
def signals_as_interrupt(*signums: int) -> Iterator[None]:
    """SIGTERM, SIGHUP, ... raise KeyboardInterrupt in the main thread while inside, like Ctrl+C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signo: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, interrupt) for signum in signums}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
