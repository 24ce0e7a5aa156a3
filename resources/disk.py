"""Disk space: say which disk is full and how much is needed, before and after a write fails."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

# Room to leave on the project's disk beside a publish, for what follows it: lineage files,
# Dagster's event log, DVC's index.
HEADROOM_BYTES = 32 * 1024 * 1024

# How a full disk reads in the messages of the libraries that write for us (SQLite says "disk I/O
# error" when a write hits ENOSPC mid-transaction, "database or disk is full" when it sees it).
_FULL_WORDS = ("no space left on device", "database or disk is full", "disk i/o error", "[errno 28]")


class DiskFullError(OSError):
    """Not enough space on a disk; the message names the disk, the space free and the space needed."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def mount_point(path: Path) -> Path:
    """The mount point holding `path` (or its nearest existing parent)."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    while not os.path.ismount(path):
        path = path.parent
    return path


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def disk_full_message(path: Path, needed: int | None = None) -> str:
    """One line: the disk holding `path`, its free space, and (when known) the space needed."""
    mount = mount_point(path)
    free = shutil.disk_usage(mount).free
    need = f"; about {_human(needed)} more is needed" if needed else ""
    return (f"disk full: {mount} (holding {path}) has {_human(free)} free{need}. "
            "Free some space there (or move the project to a larger disk) and run the same command again.")


def require_space(needs: Mapping[Path, int]) -> None:
    """Raise DiskFullError unless each disk has room for the bytes wanted on it (paths on one disk add up)."""
    by_disk: dict[Path, tuple[Path, int]] = {}
    for path, size in needs.items():
        mount = mount_point(path)
        first, total = by_disk.get(mount, (path, 0))
        by_disk[mount] = (first, total + size)
    for mount, (path, wanted) in by_disk.items():
        free = shutil.disk_usage(mount).free
        if free < wanted:
            raise DiskFullError(disk_full_message(path, wanted - free))


def folder_size(folder: Path) -> int:
    """Bytes of the regular files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file() and not p.is_symlink())


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an exception it was raised from, is a full disk."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if looks_like_disk_full(str(current)):  # SQLite, SQLAlchemy and DVC carry it in their words
            return True
        current = current.__cause__ or current.__context__
    return False


def looks_like_disk_full(message: str) -> bool:
    """Whether an error message (from a step failure, SQLite or DVC) reports a full disk."""
    lowered = message.lower()
    return any(word in lowered for word in _FULL_WORDS)


def free_bytes(path: Path) -> int:
    """Free bytes on the disk holding `path`."""
    return shutil.disk_usage(mount_point(path)).free


def first_full_disk(paths: Iterable[Path]) -> Path:
    """Of `paths`, the one on the disk with the least free space (where a write most likely failed)."""
    return min(paths, key=free_bytes)
