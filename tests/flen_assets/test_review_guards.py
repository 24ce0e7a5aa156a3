"""The assets that read reviewed images guard themselves, whatever else runs: training_set and
edit_triplets take human decisions made after filtered_images was published (a rejected edit
leaves both, and a triplet carried from v(N-1) too), and refuse a set with pending images even
when the blocking check is not part of the run."""

from __future__ import annotations

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_flen, shared_project

from flen_assets.definitions import defs
from flen_assets.demo_data import write_sample_inbox
from flen_assets.instance import get_instance
from flen_assets.partitions import add_partitions
from flen_assets.review.policy import ReviewPolicy, set_character_policy
from flen_assets.review.store import Partition, ReviewStore
from flen_assets.runs import init_project

pytestmark = pytest.mark.slow
CLASSIC = {"ops": {"enriched_images": {"config": {"recipe": "classic"}}}}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """astronaut|v1 with the classic recipe under policy `auto`: training set published."""
    with shared_project(tmp_path_factory, "guards") as project:
        init_project(project)
        write_sample_inbox(project.inbox_for("astronaut"))
        config = project.root / "classic.yaml"
        config.write_text(yaml.safe_dump(CLASSIC))
        run_flen("materialize", "astronaut", "v1", "--config", str(config), project=project.root)
        yield project


def _run(project, *assets: str, iteration: str = "v1") -> dg.ExecuteInProcessResult:
    """Materialize only `assets` of one partition, in this process, on the project's instance
    (classic edits; on the CPU, run settings auto are cpu-demo: the demo's small LoRA settings)."""
    instance = get_instance(project)
    add_partitions(instance, "astronaut", iteration)
    ops = {k: v for k, v in CLASSIC["ops"].items() if k in assets}
    return defs.resolve_job_def("flywheel_job").execute_in_process(
        instance=instance, partition_key=f"astronaut|{iteration}", raise_on_error=False,
        asset_selection=[dg.AssetKey(a) for a in assets], run_config={"ops": ops})


def _manifest(project, asset: str, iteration: str = "v1") -> list[dict]:
    return pq.read_table(project.partition_dir(asset, "astronaut", iteration) / "manifest.parquet").to_pylist()


def _failure(result: dg.ExecuteInProcessResult) -> str:
    return " ".join(e.event_specific_data.error.message for e in result.all_events
                    if e.event_type_value == "STEP_FAILURE")


def test_an_edit_rejected_after_publishing_leaves_training_set_and_triplets(published):
    project = published
    accepted = [r["image_id"] for r in _manifest(project, "filtered_images") if r["accepted"]]
    assert len(accepted) >= 2
    assert _run(project, "edit_triplets").success
    assert set(accepted) <= {r["after_id"] for r in _manifest(project, "edit_triplets")}
    rejected = accepted[0]
    ReviewStore(project).decide(Partition.of("filtered_images", "astronaut", "v1"), [rejected], "reject")

    assert _run(project, "training_set", "edit_triplets").success  # filtered_images is not run again
    training = {r["image_id"] for r in _manifest(project, "training_set")}
    triplets = {r["after_id"] for r in _manifest(project, "edit_triplets")}
    assert rejected not in training and rejected not in triplets
    assert set(accepted[1:]) <= training and set(accepted[1:]) <= triplets

    # v2 carries v1's triplets: the rejected one stays out, the others come along.
    assert _run(project, "source_images", "identity_reference", "enriched_images", "filtered_images",
                "edit_triplets", iteration="v2").success
    carried = {r["after_id"] for r in _manifest(project, "edit_triplets", "v2") if r["origin_iteration"] == "v1"}
    assert rejected not in carried and set(accepted[1:]) <= carried


def test_a_synthetic_image_accepted_on_the_page_joins_the_next_training_set(published):
    """The gates reject every tiny-pack generation (noise); a human accepting one after v1's batch was
    published puts it in training set v2, read through v1's reviewed statuses."""
    project = published
    # synthetic_batch generates with the checkpoint lora_eval promoted
    assert _run(project, "flux_lora", "lora_eval", "synthetic_batch").success
    generated = _manifest(project, "synthetic_batch")
    assert generated and not any(r["accepted"] for r in generated)
    chosen = generated[0]["image_id"]
    ReviewStore(project).decide(Partition.of("synthetic_batch", "astronaut", "v1"), [chosen], "accept")
    assert _run(project, "training_set", iteration="v2").success
    synthetic = {r["image_id"] for r in _manifest(project, "training_set", "v2") if r["origin"] == "synthetic"}
    assert synthetic == {chosen}


def test_pending_images_stop_training_set_and_triplets_without_the_check(published):
    project = published
    set_character_policy(project, "astronaut", ReviewPolicy("required"))
    try:
        gate = _run(project, "filtered_images")  # publishes pending images; its blocking check fails
        assert not gate.success
        assert any(r["review_status"] == "pending" for r in _manifest(project, "filtered_images"))
        before = _manifest(project, "training_set")
        for asset in ("training_set", "edit_triplets"):
            result = _run(project, asset)  # the blocking check is not in this run
            assert not result.success and "await human review" in _failure(result), asset
        assert _manifest(project, "training_set") == before, "the published training set is untouched"
    finally:
        set_character_policy(project, "astronaut", ReviewPolicy("auto"))
