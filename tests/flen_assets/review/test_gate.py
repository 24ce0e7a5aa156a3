"""The review gate in real Dagster runs: under policy `required` the blocking check stops the run
before the training set, the partition's metadata links to its review page, human decisions made on
the page are picked up when the run is repeated, and next_iteration_sensor waits for synthetic review."""

from __future__ import annotations

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_flen, shared_project

from flen_assets.dagster_resources import ProjectResource
from flen_assets.demo_data import write_sample_inbox
from flen_assets.instance import get_instance
from flen_assets.partitions import character_partitions, iteration_partitions
from flen_assets.review.policy import ReviewPolicy, set_character_policy
from flen_assets.review.store import Partition, ReviewStore
from flen_assets.runs import init_project
from flen_resources.lineage import LineageStore
from tests_helpers import build_review_partition, review_session, running_server

pytestmark = pytest.mark.slow
PART = Partition.of("filtered_images", "astronaut", "v1")


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """astronaut|v1 with the classic recipe under policy `required`, run once: stopped at the gate."""
    with shared_project(tmp_path_factory, "gate") as project:
        init_project(project)
        write_sample_inbox(project.inbox_for("astronaut"))
        # Without the other person among the sources, nothing waits at identity_reference's gate
        # (tests/flen_assets/test_source_identity_gate.py covers that one): the run stops at the edits'.
        (project.inbox_for("astronaut") / "grace_hopper.jpg").unlink()
        set_character_policy(project, "astronaut", ReviewPolicy("required"))
        config = project.root / "classic.yaml"
        config.write_text(yaml.safe_dump({"ops": {"enriched_images": {"config": {"recipe": "classic"}}}}))
        first = run_flen("materialize", "astronaut", "v1", "--config", str(config), project=project.root, check=False)
        yield project, config, first


def test_required_policy_stops_at_the_gate(gated):
    project, _, first = gated
    assert first.returncode == 1, first.stdout + first.stderr
    assert "stopped at the review gate" in first.stdout + first.stderr
    assert "flen review astronaut --iteration v1" in first.stdout
    assert "http://127.0.0.1:8765/review/astronaut/v1/filtered_images" in first.stdout
    assert not (project.data_dir / "training_set" / "astronaut" / "v1").exists(), "nothing trained on an unreviewed set"
    rows = pq.read_table(project.partition_dir("filtered_images", "astronaut", "v1") / "manifest.parquet").to_pylist()
    pending = [r for r in rows if r["review_status"] == "pending"]
    assert pending and all(not r["failed_gates"] and not r["accepted"] for r in pending)
    assert all(r["review_status"] == "rejected" for r in rows if r["failed_gates"]), "failed gates need no human"
    instance = get_instance(project)
    record = instance.fetch_materializations(dg.AssetKey("filtered_images"), limit=1).records[0]
    meta = record.asset_materialization.metadata
    assert meta["review_page"].value == "http://127.0.0.1:8765/review/astronaut/v1/filtered_images"
    assert meta["pending"].value == len(pending) and meta["review_policy"].value == "required"
    check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("filtered_images"), "review_complete")])
    record = next(iter(check.values()))
    evaluation = record.event.dagster_event.event_specific_data
    assert not evaluation.passed and evaluation.metadata["pending"].value == len(pending)
    # The UI lists the evaluation under its partition, and every command it shows names the project.
    assert record.partition == evaluation.partition == "astronaut|v1"
    where = f"--project {project.root}"
    assert f"`flen review astronaut --iteration v1 {where}`" in evaluation.description
    assert f"`flen materialize astronaut v1 --from filtered_images {where}`" in evaluation.description
    assert meta["review_command"].value == f"`flen review astronaut --iteration v1 {where}`"
    assert f"flen review astronaut --iteration v1 {where}" in first.stdout
    assert f"flen materialize astronaut v1 --all --from filtered_images {where}" in first.stdout


def test_decisions_on_the_page_open_the_gate(gated):
    project, config, _ = gated
    store = ReviewStore(project)
    pending = [i for i in store.items(PART) if i["status"] == "pending"]
    rejected_id = pending[0]["id"]
    with running_server(project) as url:  # the page's own API, as the browser calls it
        api = f"{url}/api/review/astronaut/v1/filtered_images"
        session = review_session(url, "astronaut", "v1")
        assert session.post(f"{api}/decide", json={"ids": [rejected_id], "decision": "reject"}, timeout=30).ok
        assert session.post(f"{api}/bulk", json={"decision": "accept", "side": "below", "score": 9.0},
                             timeout=60).ok
    assert store.pending(PART) == 0
    assert store.counts(store.items(PART))["unapplied"] == len(pending), "decided, not yet materialized"
    second = run_flen("materialize", "astronaut", "v1", "--config", str(config), project=project.root, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    rows = pq.read_table(project.partition_dir("filtered_images", "astronaut", "v1") / "manifest.parquet").to_pylist()
    by_id = {r["image_id"]: r for r in rows}
    assert by_id[rejected_id]["review_status"] == "rejected" and by_id[rejected_id]["review_source"] == "human"
    assert all(by_id[i["id"]]["accepted"] for i in pending[1:])
    training = pq.read_table(project.partition_dir("training_set", "astronaut", "v1") / "manifest.parquet").to_pylist()
    enriched = {r["image_id"] for r in training if r["origin"] == "enriched"}
    assert enriched == {i["id"] for i in pending[1:]}, "the training set takes exactly the human-accepted edits"
    assert store.counts(store.items(PART))["unapplied"] == 0, "materialized again: every decision is applied"
    lineage = LineageStore(project.lineage_dir)
    history = lineage.rows(
        "SELECT count(*) AS n FROM decisions WHERE source = 'human' AND image_id = $i", {"i": rejected_id})
    assert history[0]["n"] == 1
    # The rerun wrote the policy's verdict again, under gate 'policy': the human decision stays the
    # latest 'review' row of latest_decisions (a policy row once shadowed it there).
    latest = {r["gate"]: r for r in lineage.rows(
        "SELECT gate, source, passed FROM latest_decisions WHERE image_id = $i AND asset = 'filtered_images' "
        "AND character = 'astronaut' AND iteration = 'v1'", {"i": rejected_id})}
    assert (latest["review"]["source"], latest["review"]["passed"]) == ("human", False)
    assert latest["policy"]["source"] == "policy" and latest["policy"]["passed"] is None
    assert lineage.rows("SELECT count(*) AS n FROM decisions WHERE gate = 'review' AND source <> 'human'")[0]["n"] == 0


def test_next_iteration_sensor_waits_for_synthetic_review(project):
    from flen_assets.sensors import next_iteration_sensor

    instance = init_project(project)
    instance.add_dynamic_partitions(character_partitions.name, ["bench"])
    instance.add_dynamic_partitions(iteration_partitions.name, ["v1"])
    ids = build_review_partition(project, 5, asset="synthetic_batch")
    (project.data_dir / "synthetic_batch" / "bench" / "v1.dvc").write_text("outs: []\n")
    context = dg.build_sensor_context(instance=instance,
                                      resources={"project": ProjectResource(project_dir=str(project.root))})
    waiting = next_iteration_sensor(context)
    assert isinstance(waiting, dg.SkipReason) and "5 synthetic image(s) await review" in waiting.skip_message
    store = ReviewStore(project)
    store.decide(Partition.of("synthetic_batch", "bench", "v1"), ids[:4], "accept")
    assert isinstance(next_iteration_sensor(context), dg.SkipReason), "one still pending"
    store.decide(Partition.of("synthetic_batch", "bench", "v1"), ids[4:], "reject")
    result = next_iteration_sensor(context)
    assert [r.partition_key for r in result.run_requests] == ["bench|v2"]
