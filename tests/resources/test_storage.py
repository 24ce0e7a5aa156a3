"""DVC storage: publishing is atomic and content-addressed; earlier versions come back."""

from __future__ import annotations

from pathlib import Path

from flen_resources.storage import DvcStore
from tests_helpers import folder_digest


def _stage(store: DvcStore, files: dict[str, bytes]) -> Path:
    staged = store.stage("source_images", "alice", "v1")
    for name, data in files.items():
        (staged / name).write_bytes(data)
    return staged


def test_publish_restore_and_idempotence(project):
    store = DvcStore(project)
    store.ensure_repo()
    store.ensure_repo()  # a second init changes nothing
    a = store.publish(_stage(store, {"one.txt": b"1", "two.txt": b"2"}), "source_images", "alice", "v1")
    digest_a = folder_digest(a.path)
    again = store.publish(_stage(store, {"one.txt": b"1", "two.txt": b"2"}), "source_images", "alice", "v1")
    assert again.dvc_md5 == a.dvc_md5  # same content, same version
    b = store.publish(_stage(store, {"one.txt": b"1", "three.txt": b"3"}), "source_images", "alice", "v1")
    assert b.dvc_md5 != a.dvc_md5
    assert not (b.path / "two.txt").exists()
    assert store.status().strip() in ("", "Data and pipelines are up to date.")

    store.restore("source_images", "alice", "v1", a.dvc_file)
    assert folder_digest(a.path) == digest_a
    assert (project.dvc_remote_dir).is_dir() and any(project.dvc_remote_dir.rglob("*"))
    assert not list(project.staging_dir.glob("source_images-*")), "staging folders are consumed by publish"


def test_restore_pulls_from_remote_when_cache_is_gone(project):
    import shutil

    store = DvcStore(project)
    store.ensure_repo()
    a = store.publish(_stage(store, {"x.txt": b"x"}), "source_images", "alice", "v1")
    store.publish(_stage(store, {"y.txt": b"y"}), "source_images", "alice", "v1")
    shutil.rmtree(project.root / ".dvc" / "cache")
    store.restore("source_images", "alice", "v1", a.dvc_file)
    assert (a.path / "x.txt").read_bytes() == b"x"
