"""The partition-folder IO manager hands downstream assets published folders."""

from __future__ import annotations

import shutil

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flen_assets.partitions import add_partitions, character_iteration
from flen_io_managers.partition_folder import MANIFEST, PartitionFolderIOManager
from flen_resources.storage import DvcStore


def _context(key: str = "alice|v1") -> dg.InputContext:
    instance = dg.DagsterInstance.ephemeral()
    character, iteration = key.split("|")
    add_partitions(instance, character, iteration)
    return dg.build_input_context(asset_key=dg.AssetKey("source_images"), partition_key=key,
                                  asset_partitions_def=character_iteration, instance=instance)


def _publish(project) -> None:
    store = DvcStore(project)
    store.ensure_repo()
    staged = store.stage("source_images", "alice", "v1")
    pq.write_table(pa.table({"image_id": ["a", "b"]}), staged / MANIFEST)
    store.publish(staged, "source_images", "alice", "v1")


def test_loads_manifest_and_md5(project):
    _publish(project)
    folder = PartitionFolderIOManager(project_dir=str(project.root)).load_input(_context())
    assert folder.path == project.partition_dir("source_images", "alice", "v1")
    assert [r["image_id"] for r in folder.rows()] == ["a", "b"]
    assert folder.dvc_md5.endswith(".dir")


def test_restores_a_missing_workspace_folder_from_dvc(project):
    _publish(project)
    shutil.rmtree(project.partition_dir("source_images", "alice", "v1"))
    folder = PartitionFolderIOManager(project_dir=str(project.root)).load_input(_context())
    assert folder.manifest.num_rows == 2


def test_never_materialized_says_what_to_materialize(project):
    with pytest.raises(FileNotFoundError, match="materialize source_images for partition bob\\|v1 first"):
        PartitionFolderIOManager(project_dir=str(project.root)).load_input(_context("bob|v1"))
