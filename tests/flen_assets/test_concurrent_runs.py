"""Two `flen materialize` processes on one project at the same time: no lock errors, no lost lineage."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from flen_assets.demo_data import write_sample_inbox
from flen_assets.jobs import TRAINING_SET_ASSETS
from flen_assets.partitions import add_partitions
from flen_assets.runs import init_project
from flen_resources.lineage import LineageStore

pytestmark = pytest.mark.slow
CHARACTERS = ("alice", "bob")
# DVC's repo lock, DuckDB's file lock, SQLite's (Dagster storage) busy error.
LOCK_ERRORS = re.compile(r"Unable to acquire lock|Could not set lock|database is locked", re.IGNORECASE)


def test_two_materialize_processes_at_once(project, tmp_path):
    instance = init_project(project)
    instance.dispose()
    for name in CHARACTERS:
        write_sample_inbox(project.inbox_for(name))
    config = tmp_path / "run_config.yaml"  # two recipe entries instead of all: same code path, faster
    config.write_text(yaml.safe_dump({"ops": {"enriched_images": {"config": {"max_entries": 2}}}}))

    env = {**os.environ, "FLEN_PROJECT_DIR": str(project.root), "DAGSTER_HOME": str(project.dagster_home),
           "PYTHONWARNINGS": "ignore"}
    procs = {name: subprocess.Popen([sys.executable, "-m", "flen_assets", "materialize", name, "v1", "--config", str(config)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in CHARACTERS}
    outputs = {}
    for name, proc in procs.items():
        try:
            outputs[name] = proc.communicate(timeout=600)[0]
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
    for name, proc in procs.items():
        assert proc.returncode == 0, f"flen materialize {name} v1 failed:\n{outputs[name][-6000:]}"
        assert not LOCK_ERRORS.search(outputs[name]), f"lock error in {name}'s run:\n{outputs[name][-6000:]}"
        assert "succeeded" in outputs[name]

    store = LineageStore(project.lineage_dir)
    runs = store.rows("SELECT character, asset, status, run_id FROM runs")
    assert sorted((r["character"], r["asset"]) for r in runs) == sorted(
        (c, a) for c in CHARACTERS for a in TRAINING_SET_ASSETS), "one runs row per asset and character"
    assert {r["status"] for r in runs} == {"success"}
    run_ids = {c: {r["run_id"] for r in runs if r["character"] == c} for c in CHARACTERS}
    assert all(len(ids) == 1 for ids in run_ids.values()) and run_ids["alice"] != run_ids["bob"]

    artifacts = store.rows("SELECT character, asset, path, dvc_md5 FROM artifacts")
    assert sorted((r["character"], r["asset"]) for r in artifacts) == sorted(
        (c, a) for c in CHARACTERS for a in TRAINING_SET_ASSETS)
    for r in artifacts:
        pointer = project.root / (r["path"] + ".dvc")
        assert yaml.safe_load(pointer.read_text())["outs"][0]["md5"] == r["dvc_md5"], r

    # The same inbox and recipe: each character has exactly as many rows as the other, in every table.
    for table in ("images", "edges", "decisions", "members", "metrics"):
        counts = {r["character"]: r["n"] for r in store.rows(f"SELECT character, count(*) AS n FROM {table} GROUP BY 1")}
        assert counts.get("alice", 0) > 0 and counts.get("alice") == counts.get("bob"), f"{table}: {counts}"
    for name in CHARACTERS:
        manifest = pq.read_table(project.partition_dir("training_set", name, "v1") / "manifest.parquet")
        members = store.rows("SELECT image_id FROM latest_members WHERE character = $c AND asset = 'training_set'", {"c": name})
        assert sorted(r["image_id"] for r in members) == sorted(manifest.column("image_id").to_pylist())
        assert {r["root_id"] for r in store.trace(name, "v1")} == set(manifest.column("image_id").to_pylist())
        assert len(pq.read_table(project.partition_dir("enriched_images", name, "v1") / "manifest.parquet")) == 2 * 8

    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project.root, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert "up to date" in status.stdout or not status.stdout.strip(), status.stdout
    assert not LOCK_ERRORS.search(status.stdout + status.stderr)

    import dagster as dg

    with dg.DagsterInstance.get() as inst:
        dagster_runs = inst.get_runs()
        assert len(dagster_runs) == 2 and all(r.status == dg.DagsterRunStatus.SUCCESS for r in dagster_runs)
        assert {r.run_id for r in dagster_runs} == set().union(*run_ids.values())



def test_add_partitions_tolerates_another_process_adding_the_same_key(project):
    """Two runs register 'v1' at once: both see it missing, the second insert hits the storage's unique index.

    (Reproduced for real with 6 spawned processes calling add_partitions for one new key: about one
    in 30 failed with sqlite3.IntegrityError before add_partitions handled it.)"""
    import sqlalchemy.exc

    instance = init_project(project)
    try:
        real_add = instance.add_dynamic_partitions

        def lose_the_race(name, keys):
            real_add(name, keys)  # the other process's insert lands first...
            raise sqlalchemy.exc.IntegrityError(  # ...and this one's hits the unique index
                "INSERT INTO dynamic_partitions", {}, Exception("UNIQUE constraint failed"))

        instance.add_dynamic_partitions = lose_the_race
        assert str(add_partitions(instance, "alice", "v1")) == "alice|v1"
        assert instance.get_dynamic_partitions("iteration") == ["v1"]
        assert instance.get_dynamic_partitions("character") == ["alice"]

        def broken(name, keys):  # a real failure (nothing was added) still surfaces
            raise sqlalchemy.exc.OperationalError("INSERT INTO dynamic_partitions", {}, Exception("disk I/O error"))

        instance.add_dynamic_partitions = broken
        with pytest.raises(sqlalchemy.exc.OperationalError):
            add_partitions(instance, "bob", "v1")
    finally:
        instance.dispose()
