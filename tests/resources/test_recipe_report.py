"""flen_resources.recipe_report on real manifests (Parquet files read by DuckDB): rates per entry and LoRA stack."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flen_resources.project import Project
from flen_resources.recipe_report import lora_stack, recipe_report, report_markdown

ANGLES = json.dumps([{"name": "angles", "weight": 1.0, "sha256": "a"}, {"name": "lightning-8step", "weight": 1.0}])
WITH_ADAPTER = json.dumps([{"name": "angles", "weight": 1.0}, {"name": "lightning-8step", "weight": 1.0},
                           {"name": "qwen-adapter", "weight": 0.8, "dvc_md5": "x.dir"}])


def _write(project: Project, character: str, iteration: str, edits: list[tuple]) -> None:
    """edits: (image_id, recipe_id, prompt or operation, adapters, distance, threshold, review_source, accepted)."""
    enriched = project.partition_dir("enriched_images", character, iteration)
    filtered = project.partition_dir("filtered_images", character, iteration)
    enriched.mkdir(parents=True)
    filtered.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"image_id": i, "recipe": "angles", "recipe_id": r, "operation": None if a != "[]" else w,
         "prompt": w if a != "[]" else None, "adapters": a} for i, r, w, a, *_ in edits]), enriched / "manifest.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"image_id": i, "recipe_id": r, "identity_distance": d, "identity_threshold": t, "review_source": s,
         "accepted": ok} for i, r, _, _, d, t, s, ok in edits],
        schema=pa.schema([("image_id", pa.string()), ("recipe_id", pa.string()), ("identity_distance", pa.float64()),
                          ("identity_threshold", pa.float64()), ("review_source", pa.string()),
                          ("accepted", pa.bool_())])), filtered / "manifest.parquet")


@pytest.fixture
def project(tmp_path):
    project = Project(tmp_path)
    _write(project, "alice", "v1", [
        ("a1", "left-45", "turn left", ANGLES, 0.30, 0.5, "policy", True),
        ("a2", "left-45", "turn left", ANGLES, 0.70, 0.5, "human", True),  # a person kept a failed one
        ("a3", "mirror", "mirror", "[]", 0.20, 0.5, "human", False),
        ("a4", "mirror", "mirror", "[]", None, 0.5, "policy", False),  # no face
    ])
    _write(project, "alice", "v2", [("a5", "left-45", "turn left", WITH_ADAPTER, 0.40, 0.5, "policy", True)])
    _write(project, "bob", "v1", [("b1", "mirror", "mirror", "[]", 0.10, 0.5, "policy", True)])
    return project


def test_each_entry_and_lora_stack_of_each_character_gets_its_rates(project):
    stats = {(s.character, s.recipe_id, s.loras): s for s in recipe_report(project)}
    left = stats[("alice", "left-45", "angles 1 + lightning-8step 1")]
    assert (left.edits, left.identity_pass_rate, left.human_reviewed, left.human_acceptance_rate) == (2, 0.5, 1, 1.0)
    assert left.mean_distance == pytest.approx(0.5) and left.what == "turn left"
    adapted = stats[("alice", "left-45", "angles 1 + lightning-8step 1 + qwen-adapter 0.8")]
    assert adapted.edits == 1 and adapted.human_acceptance_rate is None
    mirror = stats[("alice", "mirror", "none")]
    assert (mirror.identity_pass_rate, mirror.human_acceptance_rate, mirror.mean_distance) == (0.5, 0.0, 0.2)
    assert stats[("bob", "mirror", "none")].identity_pass_rate == 1.0


def test_across_characters_and_for_some(project):
    across = {(s.recipe_id, s.loras): s for s in recipe_report(project, across=True)}
    assert across[("mirror", "none")].edits == 3 and across[("mirror", "none")].character is None
    assert {s.character for s in recipe_report(project, ["bob"])} == {"bob"}


def test_the_markdown_table_says_why_a_cell_is_empty(project):
    table = report_markdown(recipe_report(project, ["alice"]))
    assert "| alice | mirror | mirror | none | 2 | 50% | 0% of 1 | 0.200 |" in table
    assert "n/a (none reviewed)" in table
    assert report_markdown([]) == "no gated edits yet"
    assert lora_stack("[]") == "none"


def test_pass_rates_for_pruning_read_only_earlier_iterations(project):
    from flen_resources.recipe_report import entry_pass_rates

    assert entry_pass_rates(project, "alice", before=2) == {"left-45": (0.5, 2), "mirror": (0.5, 2)}
    rates = entry_pass_rates(project, "alice", before=3)  # v1 and v2: left-45's two stacks weighed together
    assert rates["left-45"] == (pytest.approx(2 / 3), 3)
    assert entry_pass_rates(project, "alice", before=1) == {}
