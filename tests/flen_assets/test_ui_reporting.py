"""What the Dagster UI shows of the demo's two iterations (issue 13): each check evaluation under its
character|vN partition, commands that name the project, and training set v2 flagged as a copy of v1."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster._core.event_api import PartitionKeyFilter  # not exported by dagster 1.13

from flen_assets.definitions import defs
from flen_assets.instance import get_instance
from flen_assets.partitions import character_iteration

pytestmark = pytest.mark.slow


def test_every_check_is_partitioned_like_its_asset():
    graph = defs.resolve_asset_graph()
    unpartitioned = [str(k) for k in graph.asset_check_keys if graph.get_check_spec(k).partitions_def != character_iteration]
    assert not unpartitioned, f"checks the UI would show as 'Partition —': {unpartitioned}"


def test_check_evaluations_name_their_partition(demo_project):
    storage = get_instance(demo_project).event_log_storage
    graph = defs.resolve_asset_graph()
    for key in graph.asset_check_keys:
        records = storage.get_asset_check_execution_history(key, limit=20)
        assert records, f"{key} never ran in the demo"
        assert {r.partition for r in records} == {"astronaut|v1", "astronaut|v2"}, (str(key), [r.partition for r in records])
        latest = storage.get_latest_asset_check_execution_by_key(
            [key], partition_filter=PartitionKeyFilter(key="astronaut|v1"))[key]
        assert latest.partition == "astronaut|v1"


def _metadata(project, asset: str, iteration: str) -> dict:
    instance = get_instance(project)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[f"astronaut|{iteration}"]), limit=1).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()}


def test_commands_in_metadata_name_the_project(demo_project):
    where = f"--project {demo_project.root}"
    assert _metadata(demo_project, "training_set", "v1")["lineage"] == f"`flen lineage astronaut v1 {where}`"
    filtered = _metadata(demo_project, "filtered_images", "v2")
    assert filtered["review_command"] == f"`flen review astronaut --iteration v2 {where}`"
    assert filtered["apply_review_command"] == f"`flen materialize astronaut v2 --from filtered_images {where}`"
    synthetic = _metadata(demo_project, "synthetic_batch", "v1")
    assert synthetic["review_command"] == f"`flen review astronaut --iteration v1 --asset synthetic_batch {where}`"


def test_training_set_v2_identical_to_v1_is_flagged(demo_project):
    """The tiny pack's generations are noise: none is accepted, so v2 trains on exactly v1's set."""
    instance = get_instance(demo_project)
    said = _metadata(demo_project, "training_set", "v2")["identical_to_previous"]
    assert said.startswith("identical to v1 (the same ") and "no synthetic image was accepted in v1's review" in said
    assert f"`flen review astronaut --iteration v1 --asset synthetic_batch --project {demo_project.root}`" in said
    assert "identical_to_previous" not in _metadata(demo_project, "training_set", "v1")
    key = dg.AssetCheckKey(dg.AssetKey("training_set"), "differs_from_previous")
    by_partition = {}
    for record in instance.event_log_storage.get_asset_check_execution_history(key, limit=10):
        by_partition.setdefault(record.partition, record.event.dagster_event.event_specific_data)
    v2, v1 = by_partition["astronaut|v2"], by_partition["astronaut|v1"]
    assert not v2.passed and v2.severity == dg.AssetCheckSeverity.WARN and v2.description == said
    assert v1.passed
    # ... and the run's log says it too.
    run_id = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("training_set"), asset_partitions=["astronaut|v2"]), limit=1).records[0].run_id
    warnings = [e.message for e in instance.all_logs(run_id) if e.level == 30 and e.step_key == "training_set"]
    assert any("training_set astronaut|v2: identical to v1" in (m or "") for m in warnings), warnings
