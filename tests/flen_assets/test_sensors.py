"""The inbox sensor registers characters from folders under inbox/."""

from __future__ import annotations

import dagster as dg

from flen_assets.dagster_resources import ProjectResource
from flen_assets.partitions import character_partitions, iteration_partitions
from flen_assets.runs import init_project
from flen_assets.sensors import inbox_sensor


def _evaluate(instance: dg.DagsterInstance, project) -> dg.SensorResult | dg.SkipReason:
    context = dg.build_sensor_context(instance=instance, resources={"project": ProjectResource(project_dir=str(project.root))})
    return inbox_sensor(context)


def test_new_inbox_folder_adds_character_and_launches_v1(project):
    instance = init_project(project)
    (project.inbox_dir / "alice").mkdir(parents=True)
    (project.inbox_dir / "alice" / "a.jpg").write_bytes(b"x")
    (project.inbox_dir / "Bad Name").mkdir()
    (project.inbox_dir / "Bad Name" / "b.jpg").write_bytes(b"x")
    (project.inbox_dir / "empty").mkdir()

    result = _evaluate(instance, project)
    assert isinstance(result, dg.SensorResult)
    assert [r.partition_key for r in result.run_requests] == ["alice|v1"]
    added = {req.partitions_def_name: list(req.partition_keys) for req in result.dynamic_partitions_requests}
    assert added == {character_partitions.name: ["alice"], iteration_partitions.name: ["v1"]}


def test_known_character_is_skipped(project):
    instance = init_project(project)
    (project.inbox_dir / "alice").mkdir(parents=True)
    (project.inbox_dir / "alice" / "a.jpg").write_bytes(b"x")
    instance.add_dynamic_partitions(character_partitions.name, ["alice"])
    assert isinstance(_evaluate(instance, project), dg.SkipReason)


def test_next_iteration_sensor_launches_v2_after_v1_synthetic(project):
    from flen_assets.sensors import next_iteration_sensor

    instance = init_project(project)
    instance.add_dynamic_partitions(character_partitions.name, ["alice", "bob"])
    instance.add_dynamic_partitions(iteration_partitions.name, ["v1"])
    context = dg.build_sensor_context(instance=instance, resources={"project": ProjectResource(project_dir=str(project.root))})
    assert isinstance(next_iteration_sensor(context), dg.SkipReason)
    pointer = project.data_dir / "synthetic_batch" / "alice" / "v1.dvc"
    pointer.parent.mkdir(parents=True)
    pointer.write_text("outs: []\n")
    result = next_iteration_sensor(context)
    assert [r.partition_key for r in result.run_requests] == ["alice|v2"]
    assert [list(r.partition_keys) for r in result.dynamic_partitions_requests] == [["v2"]]
    (project.data_dir / "training_set" / "alice").mkdir(parents=True)
    (project.data_dir / "training_set" / "alice" / "v2.dvc").write_text("outs: []\n")
    assert isinstance(next_iteration_sensor(context), dg.SkipReason), "v2 already started"
