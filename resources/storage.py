"""DVC-versioned partition folders: stage, publish atomically, record the DVC md5, restore."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml
from filelock import FileLock

from flen_assets.project import Project


# The DVC of this interpreter, whatever PATH says.
DVC = [sys.executable, "-m", "dvc"]


class DvcError(RuntimeError):
    """A DVC command failed; the message carries DVC's own words."""


@dataclass(frozen=True)
class PublishedFolder:
    """A partition folder as DVC now tracks it."""

    path: Path
    dvc_md5: str
    dvc_file: str  # the text of the .dvc pointer, enough to restore this exact version
    n_files: int
    size_bytes: int


def _run(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DvcError(f"`{' '.join(cmd)}` failed in {cwd}:\n{proc.stdout}{proc.stderr}".strip())
    return proc.stdout


def _inside_git(path: Path) -> Path | None:
    proc = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=path, capture_output=True, text=True)
    return Path(proc.stdout.strip()).resolve() if proc.returncode == 0 else None


class DvcStore:
    """Publishes partition folders under data/ as DVC outputs and pushes them to the default remote."""

    def __init__(self, project: Project):
        self.project = project
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
            remotes = _run([*DVC, "remote", "list"], root)
            if not remotes.strip():
                self.project.dvc_remote_dir.mkdir(parents=True, exist_ok=True)
                # Relative, so the project folder can move: DVC stores it relative to .dvc/config.
                remote = os.path.relpath(self.project.dvc_remote_dir, root)
                _run([*DVC, "remote", "add", "-d", "local", remote], root)

    # -- staging and publishing ---------------------------------------------------------------
    def stage(self, asset: str, character: str, iteration: str) -> Path:
        """A fresh empty folder to build a partition in, on the same filesystem as data/."""
        self.project.partition_dir(asset, character, iteration)  # validates the names
        folder = self.project.staging_dir / f"{asset}-{character}-{iteration}-{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        return folder

    def publish(self, staged: Path, asset: str, character: str, iteration: str) -> PublishedFolder:
        """Swap `staged` in as data/<asset>/<character>/<iteration>, `dvc add` and push it."""
        target = self.project.partition_dir(asset, character, iteration)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            trash = None
            if target.exists():
                trash = self.project.staging_dir / f".trash-{uuid.uuid4().hex[:8]}"
                target.rename(trash)
            staged.rename(target)  # readers see the old folder or the new one, never a mix
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
            dvc_file = target.with_name(target.name + ".dvc")
            self._dvc(["add", "-q", str(target)])
            self._dvc(["push", "-q", str(dvc_file)])
            text = dvc_file.read_text()
        out = yaml.safe_load(text)["outs"][0]
        return PublishedFolder(
            path=target,
            dvc_md5=out["md5"],
            dvc_file=text,
            n_files=int(out.get("nfiles", 0)),
            size_bytes=int(out.get("size", 0)),
        )

    def restore(self, asset: str, character: str, iteration: str, dvc_file: str) -> Path:
        """Bring back an earlier version of a partition from its recorded .dvc text."""
        target = self.project.partition_dir(asset, character, iteration)
        pointer = target.with_name(target.name + ".dvc")
        with self._lock:
            tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:6]}.tmp")
            tmp.write_text(dvc_file)
            tmp.replace(pointer)
            try:
                self._dvc(["checkout", "-q", "--force", str(pointer)])
            except DvcError:
                self._dvc(["pull", "-q", "--force", str(pointer)])  # not in the local cache
        return target

    def status(self) -> str:
        """`dvc status` output ('' when the workspace matches the cache)."""
        with self._lock:
            return self._dvc(["status", "-q"], check=False)

    def _dvc(self, args: list[str], check: bool = True) -> str:
        # The CLI in a subprocess keeps DVC's global state out of Dagster's step processes.
        proc = subprocess.run([*DVC, *args], cwd=self.project.root, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise DvcError(f"`dvc {' '.join(args)}` failed:\n{proc.stdout}{proc.stderr}".strip())
        return proc.stdout
