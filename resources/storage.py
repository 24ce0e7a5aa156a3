"""DVC-versioned partition folders: stage, publish atomically, record the DVC md5, restore."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock

from flen_resources.atomic import write_text_atomic
from flen_resources.bucket import s3_credentials
from flen_resources.deployment import ClusterSettings, cluster_settings
from flen_resources.disk import (
    HEADROOM_BYTES,
    DiskFullError,
    disk_full_message,
    first_full_disk,
    folder_size,
    free_bytes,
    is_disk_full,
    require_space,
)
from flen_resources.processes import ProcessRef
from flen_resources.project import MANIFEST, Project

# The DVC of this interpreter, whatever PATH says.
DVC = [sys.executable, "-m", "dvc"]
# A staging folder whose owner is unknown (written before owners were named) is surely abandoned after a day.
_UNOWNED_STAGING_MAX_AGE_S = 24 * 3600


class DvcError(RuntimeError):
    """A DVC command failed; the message carries DVC's own words."""


class PartitionMissing(FileNotFoundError):
    """A partition that was never published; the message says what to materialize."""


def pointer_md5(text: str) -> str:
    """The md5 a .dvc pointer's text records for its one output."""
    return yaml.safe_load(text)["outs"][0]["md5"]


@dataclass(frozen=True)
class PublishedFolder:
    """A partition folder as DVC now tracks it."""

    path: Path
    dvc_md5: str
    dvc_file: str  # the text of the .dvc pointer, enough to restore this exact version
    n_files: int
    size_bytes: int


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=_dvc_env())
    if proc.returncode != 0:
        raise DvcError(f"`{' '.join(cmd)}` failed in {cwd}:\n{proc.stdout}{proc.stderr}".strip())
    return proc.stdout


def _inside_git(path: Path) -> Path | None:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    return Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None


def _dvc_env() -> dict[str, str]:
    """DVC's environment: this one, with the S3 keys of a secrets file (dvc-s3 reads them from the environment)."""
    return {**os.environ, **s3_credentials()}


class DvcStore:
    """Publishes partition folders under data/ as DVC outputs and pushes them to the default remote.

    In the `cluster` deployment the remote is the bucket, and the version of a partition is the one
    lineage recorded last (its artifacts row holds the .dvc pointer's text): a host whose folder
    holds another version, or none, takes the recorded one from the bucket before reading it.
    """

    def __init__(self, project: Project):
        self.project = project
        self.cluster: ClusterSettings | None = cluster_settings()
        # DVC holds a repo-wide lock and fails at once when another process has it: every DVC
        # write from FLENwheel goes through this one cross-process lock instead.
        self._lock = FileLock(str(project.locks_dir / "dvc.lock"), timeout=600)

    # -- set-up -------------------------------------------------------------------------------
    def ensure_repo(self) -> None:
        """Initialise git and DVC in the project when missing, with a local default remote."""
        root = self.project.root
        root.mkdir(parents=True, exist_ok=True)
        self.project.locks_dir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            git_top = _inside_git(root)
            if git_top is None:
                _run(["git", "init", "-q"], root)
                git_top = root.resolve()
            if not (root / ".dvc").is_dir():
                cmd = [*DVC, "init", "-q"] + ([] if git_top == root.resolve() else ["--subdir"])
                _run(cmd, root)
                _run([*DVC, "config", "core.analytics", "false"], root)
            if self.cluster is not None:
                self._use_bucket_remote(self.cluster)
                return
            remotes = _run([*DVC, "remote", "list"], root)
            if not remotes.strip():
                self.project.dvc_remote_dir.mkdir(parents=True, exist_ok=True)
                # Relative, so the project folder can move: DVC stores it relative to .dvc/config.
                remote = os.path.relpath(self.project.dvc_remote_dir, root)
                _run([*DVC, "remote", "add", "-d", "local", remote], root)

    def _use_bucket_remote(self, cluster: ClusterSettings) -> None:
        """Make the cluster's bucket the default DVC remote `bucket` (endpoint and region, never keys)."""
        import configparser

        config = configparser.ConfigParser()
        config.read(self.project.root / ".dvc" / "config")
        section = "'remote \"bucket\"'"
        want = {"url": cluster.dvc_remote_url, "region": cluster.region,
                **({"endpointurl": cluster.endpoint_url} if cluster.endpoint_url else {})}
        have = dict(config[section]) if config.has_section(section) else {}
        if have == want and config.get("core", "remote", fallback=None) == "bucket":
            return
        _run([*DVC, "remote", "add", "-d", "-f", "bucket", cluster.dvc_remote_url], self.project.root)
        for key, value in want.items():
            if key != "url":
                _run([*DVC, "remote", "modify", "bucket", key, value], self.project.root)

    # -- staging and publishing ---------------------------------------------------------------
    def _process_staging(self) -> Path:
        """This process's staging folder: named after the process, so a dead owner's leftovers can be told apart."""
        return self.project.staging_dir / ProcessRef.current().encode()

    def stage(self, asset: str, character: str, iteration: str) -> Path:
        """A fresh empty folder to build a partition in, on the same filesystem as data/."""
        self.project.partition_dir(asset, character, iteration)  # validates the names
        self.clean_staging()
        folder = self._process_staging() / f"{asset}-{character}-{iteration}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def clean_staging(self) -> list[Path]:
        """Remove the staging folders of processes that died (killed runs); returns what was removed."""
        removed = []
        staging = self.project.staging_dir
        for entry in sorted(staging.iterdir()) if staging.is_dir() else []:
            owner = ProcessRef.decode(entry.name)
            if owner is not None:
                stale = owner.is_dead()
            else:  # left by a version that did not name the owner: stale once nobody can still be writing it
                stale = time.time() - entry.lstat().st_mtime > _UNOWNED_STAGING_MAX_AGE_S
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        return removed

    def publish(self, staged: Path, asset: str, character: str, iteration: str) -> PublishedFolder:
        """Swap `staged` in as data/<asset>/<character>/<iteration>, `dvc add` and push it."""
        with self.publishing(staged, asset, character, iteration) as published:
            return published

    @contextmanager
    def publishing(self, staged: Path, asset: str, character: str, iteration: str) -> Iterator[PublishedFolder]:
        """Publish `staged` (swap in, `dvc add`, push); the body records it elsewhere (lineage).

        All or nothing: when anything fails, here or in the body, the previous version is put back
        (folder and .dvc pointer) and the new one is nowhere visible; a full disk is reported as one
        line naming the disk, before anything changes when the space can be known ahead.
        """
        target = self.project.partition_dir(asset, character, iteration)
        target.parent.mkdir(parents=True, exist_ok=True)
        pointer = target.with_name(target.name + ".dvc")
        size = folder_size(staged)
        # The blobs land in the workspace (a rename), the DVC cache and, for a local remote, the remote.
        remote = self.local_remote()
        require_space({self.project.root / ".dvc": size, **({remote: size} if remote else {}),
                       self.project.dagster_home: HEADROOM_BYTES})
        with self._lock:
            old_pointer = pointer.read_text() if pointer.is_file() else None
            trash = None
            if target.exists():
                trash = staged.parent / f".trash-{uuid.uuid4().hex[:8]}"
                target.rename(trash)
            staged.rename(target)  # readers see the old folder or the new one, never a mix
            try:
                self._dvc(["add", "-q", str(target)])
                self._dvc(["push", "-q", str(pointer)])
                text = pointer.read_text()
                out = yaml.safe_load(text)["outs"][0]  # md5 and the counts DVC adds
                yield PublishedFolder(path=target, dvc_md5=out["md5"], dvc_file=text,
                                      n_files=int(out.get("nfiles", 0)), size_bytes=int(out.get("size", 0)))
            except BaseException as exc:
                self._roll_back(target, trash, pointer, old_pointer)
                disks = [self.project.data_dir, self.project.root / ".dvc", self.project.lineage_dir,
                         *([remote] if remote else [])]
                fullest = first_full_disk(disks)
                # DVC reports a failed upload without its cause: a disk left with less than the
                # partition's size is taken as the cause.
                full = is_disk_full(exc) or (isinstance(exc, DvcError) and free_bytes(fullest) < max(size, 1 << 20))
                if full and not isinstance(exc, DiskFullError):
                    raise DiskFullError(disk_full_message(fullest)) from exc
                raise
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        _remove_if_empty(staged.parent)

    def local_remote(self) -> Path | None:
        """The default DVC remote's folder when it is a local path (None for a cloud remote or none)."""
        import configparser

        config = configparser.ConfigParser()
        dvc_dir = self.project.root / ".dvc"
        config.read([dvc_dir / "config", dvc_dir / "config.local"])  # config.local overrides, as in DVC
        name = config.get("core", "remote", fallback=None)
        url = config.get(f"'remote \"{name}\"'", "url", fallback=None) if name else None
        if not url or "://" in url:
            return None
        return (dvc_dir / url).resolve()  # DVC resolves a relative url against .dvc/

    @staticmethod
    def _roll_back(target: Path, trash: Path | None, pointer: Path, old_pointer: str | None) -> None:
        """Put the previous version of a partition back: its folder and its .dvc pointer."""
        shutil.rmtree(target, ignore_errors=True)
        if trash is not None:
            trash.rename(target)
        DvcStore._roll_back_pointer(pointer, old_pointer)

    def published(self, asset: str, character: str, iteration: str) -> tuple[Path, str]:
        """(folder, DVC md5) of a published partition, restoring a missing folder from the DVC cache or remote."""
        path = self.project.partition_dir(asset, character, iteration)
        pointer = path.with_name(path.name + ".dvc")
        recorded = self._recorded_pointer(asset, character, iteration)
        if recorded is not None and (not pointer.is_file() or pointer_md5(pointer.read_text()) != pointer_md5(recorded)):
            self.restore(asset, character, iteration, recorded)  # another host published it last
        if not pointer.is_file():
            raise PartitionMissing(f"{asset} has no data for {character}|{iteration}: materialize {asset} "
                                   f"for partition {character}|{iteration} first")
        text = pointer.read_text()
        if not (path / MANIFEST).is_file():
            self.restore(asset, character, iteration, text)
        return path, pointer_md5(text)

    def _recorded_pointer(self, asset: str, character: str, iteration: str) -> str | None:
        """In a cluster, the .dvc text of the partition's version lineage recorded last (None: local, or none)."""
        if self.cluster is None:
            return None
        from flen_resources.lineage import LineageStore

        rows = LineageStore(self.project.lineage_dir).rows(
            "SELECT dvc_file FROM latest_artifacts WHERE asset = $a AND character = $c AND iteration = $i",
            {"a": asset, "c": character, "i": iteration})
        return rows[0]["dvc_file"] if rows else None

    def restore(self, asset: str, character: str, iteration: str, dvc_file: str) -> Path:
        """Bring back an earlier version of a partition from its recorded .dvc text."""
        target = self.project.partition_dir(asset, character, iteration)
        pointer = target.with_name(target.name + ".dvc")
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            old_pointer = pointer.read_text() if pointer.is_file() else None
            write_text_atomic(pointer, dvc_file)
            try:
                self._dvc(["checkout", "-q", "--force", str(pointer)])
            except DvcError:
                try:
                    self._dvc(["pull", "-q", "--force", str(pointer)])  # not in the local cache
                except DvcError as exc:
                    self._roll_back_pointer(pointer, old_pointer)
                    raise PartitionMissing(self._missing_message(asset, character, iteration, dvc_file, exc)) from exc
        return target

    @staticmethod
    def _roll_back_pointer(pointer: Path, old_pointer: str | None) -> None:
        if old_pointer is None:
            pointer.unlink(missing_ok=True)
        else:
            write_text_atomic(pointer, old_pointer)

    def _missing_message(self, asset: str, character: str, iteration: str, dvc_file: str, exc: DvcError) -> str:
        """One line for a version the remote cannot give back: the partition, the missing objects, the fix."""
        import re

        md5 = pointer_md5(dvc_file)
        missing = re.findall(r"md5: ([0-9a-f]{32}(?:\.dir)?)", str(exc)) or [md5]
        remote = self.cluster.dvc_remote_url if self.cluster else "the DVC remote"
        objects = ", ".join(f"{remote}/files/md5/{m[:2]}/{m[2:]}" for m in dict.fromkeys(missing))
        return (f"{asset} {character}|{iteration} version {md5[:12]} cannot be restored: missing from the remote "
                f"and this host's cache: {objects}: materialize {asset} for {character}|{iteration} again, "
                f"or restore the objects to the remote")

    def status(self) -> str:
        """`dvc status` output ('' when the workspace matches the cache)."""
        with self._lock:
            return self._dvc(["status", "-q"], check=False)

    def _dvc(self, args: list[str], check: bool = True) -> str:
        # The CLI in a subprocess keeps DVC's global state out of Dagster's step processes.
        proc = subprocess.run([*DVC, *args], cwd=self.project.root, capture_output=True, text=True, env=_dvc_env())
        if check and proc.returncode != 0:
            raise DvcError(f"`dvc {' '.join(args)}` failed:\n{proc.stdout}{proc.stderr}".strip())
        return proc.stdout


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty: another partition of this process is being staged there
        pass
