"""Which process owns a piece of work, and whether that process still lives (dead runs, stale staging)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from functools import cache

import psutil

# psutil rounds create_time; a process started this long after the moment it was recorded as the
# owner is another process that reused the PID.
_START_SLACK_S = 1.0


@cache
def this_host() -> str:
    """The host name recorded with an owner process."""
    return socket.gethostname()


@dataclass(frozen=True)
class ProcessRef:
    """A process as recorded by its owner: host, PID and start time (seconds since the epoch)."""

    host: str
    pid: int
    started: float

    @classmethod
    def current(cls) -> ProcessRef:
        """This process."""
        return cls(this_host(), os.getpid(), psutil.Process().create_time())

    def encode(self) -> str:
        """'host:pid:started', for a run tag or a folder name."""
        return f"{self.host}:{self.pid}:{self.started:.2f}"

    @classmethod
    def decode(cls, text: str) -> ProcessRef | None:
        """The inverse of encode(); None for text that is not one."""
        host, _, rest = text.rpartition(":")
        host, _, pid = host.rpartition(":")
        try:
            return cls(host, int(pid), float(rest))
        except ValueError:
            return None

    def is_dead(self) -> bool:
        """True only when this host can tell the process is gone (another host's process: False)."""
        if self.host != this_host():
            return False
        return not pid_alive(self.pid, started_by=self.started + _START_SLACK_S)


def pid_alive(pid: int, started_by: float) -> bool:
    """Whether PID `pid` runs (not a zombie) and is the process that existed at time `started_by`."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.create_time() <= started_by
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's live process
        return True
