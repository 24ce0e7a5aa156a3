"""The identity gate holds for sources: another person among the photos (the demo's grace_hopper.jpg)
stays out of the training set unless a person accepts it on the review page, under policy auto
(rejected) and required (pending: the blocking check stops the run)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml
from conftest import run_flen, shared_project
from PIL import Image

from flen_assets.demo_data import write_sample_inbox
from flen_assets.review.policy import ReviewPolicy, set_character_policy
from flen_assets.review.store import Partition, ReviewStore
from flen_assets.runs import init_project
from flen_assets.visuals import FLAGGED

pytestmark = pytest.mark.slow
SOURCES = Partition.of("identity_reference", "astronaut", "v1")


def rows(project, asset: str) -> list[dict]:
    return pq.read_table(project.partition_dir(asset, "astronaut", "v1") / "manifest.parquet").to_pylist()


def grace_id(project) -> str:
    return next(r["image_id"] for r in rows(project, "identity_reference") if r["original_name"] == "grace_hopper.jpg")


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """astronaut|v1's training set under policy auto, with the classic recipe (fast, deterministic)."""
    with shared_project(tmp_path_factory, "srcgate") as project:
        init_project(project)
        write_sample_inbox(project.inbox_for("astronaut"))
        config = project.root / "classic.yaml"
        config.write_text(yaml.safe_dump({"ops": {"enriched_images": {"config": {"recipe": "classic"}}}}))
        run_flen("materialize", "astronaut", "v1", "--config", str(config), project=project.root)
        yield project, config


def test_auto_policy_keeps_another_person_out_of_the_training_set(auto_run):
    project, _ = auto_run
    by_name = {r["original_name"]: r for r in rows(project, "identity_reference")}
    grace = by_name["grace_hopper.jpg"]
    assert (grace["inlier"], grace["failed_gates"], grace["review_status"]) == (False, "identity", "rejected")
    assert "identity outlier" in grace["gate_reason"]
    assert all(r["review_status"] == "accepted" for n, r in by_name.items() if n != "grace_hopper.jpg")
    members = {r["image_id"] for r in rows(project, "training_set") if r["origin"] == "source"}
    assert grace["image_id"] not in members
    assert members == {r["image_id"] for n, r in by_name.items() if n != "grace_hopper.jpg"}


def test_the_contact_sheets_show_the_outlier_in_its_own_colour(auto_run):
    project, _ = auto_run
    for asset in ("source_images", "identity_reference"):
        sheet = Image.open(project.partition_dir(asset, "astronaut", "v1") / "contact_sheet.png").convert("RGB")
        colours = set(sheet.getdata())
        assert FLAGGED in colours, f"{asset}'s contact sheet has no amber (flagged) tile"


def test_a_person_can_accept_the_outlier_into_the_training_set(auto_run):
    project, config = auto_run
    store = ReviewStore.shared(project)
    ids = {i["id"] for i in store.items(SOURCES)}
    assert grace_id(project) in ids, "the review page lists the source photos"
    store.decide(SOURCES, [grace_id(project)], "accept", "same person, older photo")
    run_flen("materialize", "astronaut", "v1", "--config", str(config), "--from", "training_set", project=project.root)
    members = {r["image_id"] for r in rows(project, "training_set") if r["origin"] == "source"}
    assert grace_id(project) in members, "a human acceptance lets the source photo in"
    store.decide(SOURCES, [grace_id(project)], "clear")


def test_required_policy_stops_at_the_sources_review_gate(tmp_path_factory):
    with shared_project(tmp_path_factory, "srcreq") as project:
        init_project(project)
        write_sample_inbox(project.inbox_for("astronaut"))
        set_character_policy(project, "astronaut", ReviewPolicy("required"))
        config = project.root / "classic.yaml"
        config.write_text(yaml.safe_dump({"ops": {"enriched_images": {"config": {"recipe": "classic"}}}}))
        proc = run_flen("materialize", "astronaut", "v1", "--config", str(config), project=project.root, check=False)
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        assert "stopped at the review gate" in out and "identity_reference" in out
        for downstream in ("filtered_images", "training_set"):  # enriched_images needs only source_images
            assert not (project.data_dir / downstream / "astronaut" / "v1").exists(), f"{downstream} ran past the gate"
        statuses = ReviewStore.shared(project).statuses(SOURCES)
        assert statuses[grace_id(project)] == "pending"
        assert sum(s == "pending" for s in statuses.values()) == 1, "only the outlier waits for a person"
