"""Publishing is all or nothing: any failure leaves the previous version current; a full disk says which disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flen_resources.disk import DiskFullError, is_disk_full, looks_like_disk_full, mount_point, require_space
from flen_resources.processes import ProcessRef, this_host
from flen_resources.storage import DVC, DvcStore
from tests_helpers import folder_digest


def _stage(store: DvcStore, files: dict[str, bytes]) -> Path:
    staged = store.stage("source_images", "alice", "v1")
    for name, data in files.items():
        (staged / name).write_bytes(data)
    return staged


def _state(store: DvcStore) -> tuple[dict[str, str], str | None]:
    """What a reader sees of alice|v1: the folder's files and the .dvc pointer's text."""
    target = store.project.partition_dir("source_images", "alice", "v1")
    pointer = target.with_name("v1.dvc")
    return (folder_digest(target) if target.exists() else {}), (pointer.read_text() if pointer.exists() else None)


@pytest.fixture
def store(project) -> DvcStore:
    store = DvcStore(project)
    store.ensure_repo()
    return store


def test_a_failure_after_dvc_add_puts_the_previous_version_back(store):
    store.publish(_stage(store, {"a.txt": b"version A"}), "source_images", "alice", "v1")
    before = _state(store)
    staged = _stage(store, {"b.txt": b"version B"})
    with pytest.raises(RuntimeError, match="lineage write failed"):
        with store.publishing(staged, "source_images", "alice", "v1") as published:
            assert published.path.joinpath("b.txt").is_file()  # B was in place, added and pushed ...
            raise RuntimeError("lineage write failed")  # ... when what records it failed
    assert _state(store) == before
    assert store.status().strip() in ("", "Data and pipelines are up to date.")


def test_a_failed_push_puts_the_previous_version_back(store):
    store.publish(_stage(store, {"a.txt": b"version A"}), "source_images", "alice", "v1")
    before = _state(store)
    remote = store.local_remote()
    shutil.rmtree(remote)
    remote.write_text("not a folder")  # the push of B fails
    with pytest.raises(Exception, match="push"):
        store.publish(_stage(store, {"b.txt": b"version B"}), "source_images", "alice", "v1")
    assert _state(store) == before


def test_a_failed_first_publish_leaves_nothing(store):
    staged = _stage(store, {"a.txt": b"A"})
    with pytest.raises(RuntimeError):
        with store.publishing(staged, "source_images", "alice", "v1"):
            raise RuntimeError("boom")
    assert _state(store) == ({}, None)


def test_clean_staging_removes_only_what_dead_processes_left(store):
    staging = store.project.staging_dir
    mine = store.stage("source_images", "alice", "v1")
    dead = subprocess.Popen(["sleep", "60"])
    import psutil

    dead_ref = ProcessRef(this_host(), dead.pid, psutil.Process(dead.pid).create_time())
    dead.kill()
    dead.wait()
    killed = staging / dead_ref.encode() / "source_images-alice-v1-deadbeef"
    killed.mkdir(parents=True)
    (killed / "half.png").write_bytes(b"half written")
    legacy_old = staging / f"source_images-alice-v1-{uuid.uuid4().hex[:8]}"  # an older version's name: no owner
    legacy_old.mkdir()
    os.utime(legacy_old, (time.time() - 2 * 86400,) * 2)
    legacy_new = staging / f"source_images-bob-v1-{uuid.uuid4().hex[:8]}"
    legacy_new.mkdir()
    other_host = staging / ProcessRef("another-host", dead_ref.pid, dead_ref.started).encode()
    other_host.mkdir()

    removed = store.clean_staging()
    assert sorted(removed) == sorted([killed.parent, legacy_old])
    assert mine.is_dir() and legacy_new.is_dir() and other_host.is_dir()


def test_disk_full_is_recognised_in_the_words_of_each_writer():
    import errno
    import sqlite3

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(RuntimeError("wrapped").with_traceback(None)) is False
    try:
        try:
            raise sqlite3.OperationalError("disk I/O error")
        except sqlite3.OperationalError as inner:
            raise RuntimeError("storing the event failed") from inner
    except RuntimeError as outer:
        assert is_disk_full(outer)
    assert looks_like_disk_full("OSError: [Errno 28] No space left on device: '/x'")
    assert not looks_like_disk_full("FileNotFoundError: [Errno 2] No such file")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 48 MB tmpfs (needs root and mount; skipped with the reason otherwise)."""
    with _tmpfs(tmp_path / "disk", "48m") as disk:
        yield disk


@contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}): run as root to test a full disk")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill `disk` (a tmpfs this test mounted) until about `leave` bytes are free; returns the filler file."""
    assert os.path.ismount(disk) and mount_point(disk) == disk, f"{disk} is not a test tmpfs: refusing to fill it"
    filler = disk / "filler.bin"
    free = shutil.disk_usage(disk).free - leave
    with open(filler, "wb") as fh:
        chunk = b"\0" * (1 << 20)
        while free > 0:
            fh.write(chunk[:min(len(chunk), free)])
            free -= len(chunk)
    return filler


def test_require_space_names_the_disk_and_the_space_needed(small_disk):
    with pytest.raises(DiskFullError) as info:
        require_space({small_disk / "data": 100 * 1024 * 1024})
    message = str(info.value)
    assert "\n" not in message
    assert f"disk full: {small_disk}" in message and "more is needed" in message


def test_full_disk_before_publish_changes_nothing_and_the_rerun_completes(small_disk):
    from flen_resources.project import Project

    store = DvcStore(Project(small_disk / "project"))
    store.ensure_repo()
    store.publish(_stage(store, {"a.txt": b"version A"}), "source_images", "alice", "v1")
    before = _state(store)
    big = {f"{i}.bin": os.urandom(1 << 20) for i in range(4)}
    staged = _stage(store, big)
    filler = _fill(small_disk, leave=6 << 20)  # the staged 4 MB fit; their copies in the cache do not
    with pytest.raises(DiskFullError) as info:
        store.publish(staged, "source_images", "alice", "v1")
    assert str(info.value).startswith(f"disk full: {small_disk}") and "\n" not in str(info.value)
    assert _state(store) == before
    filler.unlink()
    published = store.publish(staged, "source_images", "alice", "v1")
    assert published.n_files == 4 and _state(store)[0].keys() == big.keys()


def test_remote_running_out_of_space_mid_push_rolls_back(project, tmp_path):
    """The remote on its own small disk: the preflight cannot know DVC's push overhead, the push hits ENOSPC."""
    with _tmpfs(tmp_path / "remote", "3m") as remote_disk:
        store = DvcStore(project)
        store.ensure_repo()
        subprocess.run([*DVC, "remote", "add", "-d", "-f", "small", str(remote_disk)], cwd=project.root, check=True,
                       capture_output=True)
        store.publish(_stage(store, {"a.txt": b"version A"}), "source_images", "alice", "v1")
        before = _state(store)
        # 300 small files: 30 KB by their sizes, so the preflight passes, but 1.2 MB in 4 KB blocks on the remote.
        _fill(remote_disk, leave=512 * 1024)
        files = {f"{i}.txt": os.urandom(100) for i in range(300)}
        with pytest.raises(DiskFullError) as info:
            store.publish(_stage(store, files), "source_images", "alice", "v1")
        assert f"disk full: {remote_disk}" in str(info.value)
        assert _state(store) == before


def test_mount_point_of_a_missing_path_is_its_disk(tmp_path):
    assert mount_point(tmp_path / "not" / "yet") == mount_point(tmp_path)


@pytest.mark.slow
def test_flen_materialize_on_a_full_disk_says_so_in_one_line_and_the_rerun_completes(tmp_path):
    """The whole command on a project whose disk fills up: before the run, and inside a step's publish."""
    from flen_assets.demo_data import write_sample_inbox
    from flen_resources.lineage import LineageStore

    photos = tmp_path / "photos"
    write_sample_inbox(photos)
    with _tmpfs(tmp_path / "disk", "160m") as disk:
        root = disk / "project"
        config = disk / "small.yaml"
        config.write_text("ops:\n  enriched_images: {config: {recipe: classic, max_entries: 1}}\n")
        env = {**os.environ, "FLEN_PROJECT_DIR": str(root), "DAGSTER_HOME": str(root / ".flen" / "dagster"),
               "PYTHONWARNINGS": "ignore"}

        def flen(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "flen_assets", *args], env=env, capture_output=True,
                                  text=True, timeout=600)

        inbox = root / "inbox" / "kc"
        inbox.mkdir(parents=True)
        for name in ("portrait.jpg", "closeup.png", "side_light.jpg"):
            shutil.copyfile(photos / name, inbox / name)
        first = flen("materialize", "kc", "v1", "--config", str(config))
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        pointer = root / "data" / "source_images" / "kc" / "v1.dvc"
        version_a = pointer.read_text()

        def current_md5() -> str:
            rows = LineageStore(root / ".flen" / "lineage").rows(
                "SELECT dvc_md5 FROM latest_artifacts WHERE asset='source_images' AND character='kc'")
            return rows[0]["dvc_md5"]

        md5_a = current_md5()
        shutil.copyfile(photos / "print_cmyk.jpg", inbox / "print_cmyk.jpg")  # the next version has 4 photos

        filler = _fill(disk, leave=512 * 1024)  # too little to start a run
        full = flen("materialize", "kc", "v1", "--config", str(config))
        assert full.returncode == 1
        assert full.stdout == "" and full.stderr.startswith(f"error: disk full: {disk}"), full.stderr
        assert full.stderr.count("\n") == 1 and "Traceback" not in full.stderr
        filler.unlink()

        filler = _fill(disk, leave=33 * 1024 * 1024)  # the run starts, the publish of source_images cannot fit
        mid = flen("materialize", "kc", "v1", "--config", str(config))
        assert mid.returncode == 1
        summary = [line for line in mid.stdout.splitlines() if line.startswith("  ✗ source_images:")]
        assert len(summary) == 1 and f"disk full: {disk}" in summary[0] and "more is needed" in summary[0], mid.stdout
        assert pointer.read_text() == version_a and current_md5() == md5_a, "the previous version stays current"
        filler.unlink()

        rerun = flen("materialize", "kc", "v1", "--config", str(config))
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert current_md5() != md5_a and "'accepted': 4" in rerun.stdout
