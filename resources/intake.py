"""Photo folders are untrusted: their regular files are data, read once from an fd; nothing in them is followed.

A photo folder is the `--from DIR` of `flen character add` or an inbox folder `inbox/<character>/`, where
people and tools may drop files directly. Its entries are classified without following anything
(lstat through an fd on the folder): regular files are read, each from one fd opened with O_NOFOLLOW and
checked with fstat (imaging.open_regular); symlinks, subfolders, FIFOs, sockets and devices are refused by
name and reason. Hidden entries (leading dot) are skipped silently: editors' and our own temp files live there.

What `character add` refused never reaches the inbox, so it is remembered in the inbox's hidden record
(REFUSED_RECORD, written atomically) and source_images reports it next to what it refused itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from flen_resources.imaging import ImageRejected, entry_kind, open_regular, read_regular

REFUSED_RECORD = ".flen-refused.json"  # hidden, so ingestion never takes it for a photo
REFUSED_CODES = frozenset({"symlink", "not_regular_file", "subfolder", "bad_name", "unreadable"})
_RECORD_MAX_BYTES = 4 << 20
_CHUNK = 1 << 20


class IntakeError(Exception):
    """A photo folder that cannot be used at all (a link in place of the inbox, a name clash)."""


@dataclass(frozen=True)
class Refused:
    """A directory entry that was not read: `name` (printable), a stable reason `code`, and why."""

    name: str
    code: str
    detail: str

    @property
    def message(self) -> str:
        """`name: detail`, the form every rejection message takes."""
        return f"{self.name}: {self.detail}"


@dataclass
class PhotoFolder:
    """An open photo folder: the names of its regular files, and the entries refused."""

    fd: int
    files: list[str] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)

    def read(self, name: str, max_bytes: int | None = None) -> bytes:
        """All bytes of the file `name`, from one O_NOFOLLOW fd relative to the folder (ImageRejected if not regular)."""
        return read_regular(name, self.fd, max_bytes)


@dataclass
class AddReport:
    """What add_photos did with each entry of the source folder."""

    copied: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # already in the inbox with the same bytes
    refused: list[Refused] = field(default_factory=list)


def printable_name(name: str) -> str:
    """`name` with control characters and undecodable bytes escaped, safe for one line of output or Parquet."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in name)


def refused_entry_id(name: str) -> str:
    """A stable lineage id for a refused entry: no byte of it was read, so it has no content hash."""
    return hashlib.sha256(b"flen-refused-entry\0" + name.encode("utf-8", "backslashreplace")).hexdigest()


@contextmanager
def open_photo_folder(path: Path, *, follow: bool = True, with_record: bool = False) -> Iterator[PhotoFolder]:
    """Open and scan the folder `path`; with follow=False a symlink in its place is refused (IntakeError)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0) | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        kind = "a symbolic link or not a folder" if not follow and os.path.islink(path) else exc.strerror
        raise IntakeError(f"cannot open photo folder {path}: {kind}") from exc
    try:
        folder = PhotoFolder(fd)
        _scan(folder)
        if with_record:
            seen = set(folder.files) | {r.name for r in folder.refused}
            folder.refused += [r for r in load_record(fd) if r.name not in seen]  # a file added since wins
        yield folder
    finally:
        os.close(fd)


def _scan(folder: PhotoFolder) -> None:
    """Sort the folder's non-hidden entries into regular files and refusals, following nothing."""
    with os.scandir(folder.fd) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            refusal = _refusal(entry)
            if refusal is None:
                folder.files.append(entry.name)
            else:
                folder.refused.append(refusal)


def _refusal(entry: os.DirEntry) -> Refused | None:
    """None for a regular file with a usable name; else why the entry is refused."""
    name = printable_name(entry.name)
    if name != entry.name:  # not UTF-8, or a newline: it would break manifests and one-line reports
        return Refused(name, "bad_name", "file name is not valid UTF-8 or holds control characters")
    try:
        mode = entry.stat(follow_symlinks=False).st_mode  # lstat, relative to the folder's fd
    except OSError as exc:
        return Refused(name, "unreadable", f"cannot read entry ({exc.strerror})")
    kind = entry_kind(mode)
    return None if kind is None else Refused(name, *kind)


def add_photos(src: Path, dest: Path) -> AddReport:
    """Copy the regular files of `src` into the inbox folder `dest`; refuse, report and record every other entry."""
    report = AddReport()
    # `src` is the folder the user named, so a link to it is their choice; inside it nothing is followed.
    # `dest` is ours: a link planted in its place would send the copies anywhere.
    with open_photo_folder(src) as source, open_photo_folder(dest, follow=False) as inbox:
        report.refused += source.refused
        for name in source.files:
            try:
                copied = _copy_in(name, source.fd, inbox.fd)
            except ImageRejected as exc:  # it changed kind since the scan: still refused, never followed
                report.refused.append(Refused(name, exc.code, exc.detail))
                continue
            except IntakeError as exc:
                raise IntakeError(f"{dest / name} {exc}; rename {src / name} and retry") from None
            (report.copied if copied else report.unchanged).append(name)
        update_record(inbox.fd, report)
    return report


def _copy_in(name: str, src_fd: int, dest_fd: int) -> bool:
    """Copy `name` from one O_NOFOLLOW fd to a temp file in the inbox, then rename it in; False if already there."""
    tmp = f".flen-{uuid.uuid4().hex}.tmp"  # hidden: ingestion skips it while it is written
    fd = open_regular(name, src_fd)
    try:
        digest = _copy_fd(fd, tmp, dest_fd)
    finally:
        os.close(fd)
    existing = _entry_digest(name, dest_fd)
    if existing is None:
        os.replace(tmp, name, src_dir_fd=dest_fd, dst_dir_fd=dest_fd)
        return True
    os.unlink(tmp, dir_fd=dest_fd)
    if existing != digest:
        raise IntakeError("already exists with other content")
    return False


def _copy_fd(src: int, name: str, dest_fd: int) -> str:
    """Copy the open file `src` into a new file `name` of the folder `dest_fd` (fsynced); its sha256."""
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                  0o644, dir_fd=dest_fd)
    h = hashlib.sha256()
    try:
        while chunk := os.read(src, _CHUNK):
            h.update(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(out, view):]
        os.fsync(out)
    except BaseException:
        os.close(out)
        os.unlink(name, dir_fd=dest_fd)
        raise
    os.close(out)
    return h.hexdigest()


def _entry_digest(name: str, dir_fd: int) -> str | None:
    """sha256 of the inbox file `name`, None if there is none; IntakeError if it is not a regular file."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(mode):
        raise IntakeError("already exists and is not a regular file")
    try:
        fd = open_regular(name, dir_fd)
    except ImageRejected as exc:  # swapped for a link or a pipe since the stat
        raise IntakeError("already exists and is not a regular file") from exc
    try:
        h = hashlib.sha256()
        while chunk := os.read(fd, _CHUNK):
            h.update(chunk)
        return h.hexdigest()
    finally:
        os.close(fd)


def load_record(dir_fd: int) -> list[Refused]:
    """The entries a past `character add` refused, as report rows (from the folder's hidden record)."""
    return [Refused(r.name, r.code, f"{r.detail} (refused by `flen character add`, never copied)")
            for r in _read_record(dir_fd)]


def _read_record(dir_fd: int) -> list[Refused]:
    """The record's entries as written; [] when there is none or it is not one of ours (it is untrusted too)."""
    try:
        entries = json.loads(read_regular(REFUSED_RECORD, dir_fd, max_bytes=_RECORD_MAX_BYTES))["refused"]
    except (ImageRejected, ValueError, TypeError, KeyError):
        return []
    refused = []
    for entry in entries if isinstance(entries, list) else []:
        fields = [entry.get(k) if isinstance(entry, dict) else None for k in ("name", "code", "detail")]
        if all(isinstance(f, str) for f in fields) and fields[1] in REFUSED_CODES:
            refused.append(Refused(*(printable_name(f)[:300] for f in fields)))
    return refused


def update_record(dir_fd: int, report: AddReport) -> None:
    """Record this add's refusals, forget names that are now real files; atomic, written only when it changes."""
    previous = {r.name: r for r in _read_record(dir_fd)}
    now_files = set(report.copied) | set(report.unchanged)
    current = {name: r for name, r in previous.items() if name not in now_files}
    current.update({r.name: r for r in report.refused})
    if current == previous:
        return
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    body = {"refused": [{**asdict(r), "recorded_at": now} for r in current.values()]}
    _write_atomic(dir_fd, REFUSED_RECORD, json.dumps(body, indent=1).encode())


def _write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """Write `data` to a temp name in the folder, fsync, then rename it over `name`."""
    tmp = f".flen-{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                 0o644, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
