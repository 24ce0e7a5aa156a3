"""`flen demo` end to end: v1 of the sample character, its lineage, DVC state and a rerun."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import run_flen

from flen_resources.lineage import LineageStore

pytestmark = pytest.mark.slow
ASSETS = ["source_images", "identity_reference", "enriched_images", "filtered_images", "training_set"]


def _md5s(project) -> dict[str, str]:
    rows = LineageStore(project.lineage_dir).rows(
        "SELECT asset, dvc_md5 FROM latest_artifacts WHERE character='astronaut' AND iteration='v1'")
    return {r["asset"]: r["dvc_md5"] for r in rows}


def test_demo_materializes_every_asset(demo_project):
    assert set(ASSETS) <= set(_md5s(demo_project)), "the training-set chain is published (and the flywheel beyond it)"
    sources = pq.read_table(demo_project.partition_dir("source_images", "astronaut", "v1") / "manifest.parquet").to_pylist()
    reasons = {r["original_name"]: r["reason_code"] for r in sources}
    assert reasons["broken.jpg"] == "corrupt"
    assert reasons["notes.png"] == "not_an_image"
    assert reasons["cameraman.png"] == "no_face"
    assert reasons["group_photo.png"] == "several_faces"
    assert reasons["portrait_copy.jpg"] == "duplicate"
    assert reasons["portrait.jpg"] == "ok"
    reference = pq.read_table(demo_project.partition_dir("identity_reference", "astronaut", "v1") / "manifest.parquet")
    outliers = [r["original_name"] for r in reference.to_pylist() if not r["inlier"]]
    assert outliers == ["grace_hopper.jpg"], "another person in the inbox is left out of the reference"
    gates = pq.read_table(demo_project.partition_dir("filtered_images", "astronaut", "v1") / "manifest.parquet").to_pylist()
    assert all(r["reason"] for r in gates), "every candidate has a recorded reason"
    grace_edits = [r for r in gates if r["parent_id"] == next(s["image_id"] for s in sources if s["original_name"] == "grace_hopper.jpg")]
    assert grace_edits and not any(r["accepted"] for r in grace_edits), "the identity gate rejects the other person"
    enriched = pq.read_table(demo_project.partition_dir("enriched_images", "astronaut", "v1") / "manifest.parquet").to_pylist()
    qwen = {r["image_id"] for r in enriched if r["model"].startswith("tiny/qwen-image-edit-2509@")}
    assert qwen, "the demo runs the real qwen_edit path on the tiny pack"
    assert all(json.loads(r["adapters"]) for r in enriched if r["image_id"] in qwen), "LoRAs recorded"
    assert not any(r["accepted"] for r in gates if r["image_id"] in qwen), "random-weight edits are noise: rejected"
    training = demo_project.partition_dir("training_set", "astronaut", "v1")
    manifest = pq.read_table(training / "manifest.parquet").to_pylist()
    assert manifest and all((training / r["file"]).with_suffix(".txt").read_text().startswith("photo of astronaut_flen")
                            for r in manifest)


def test_lineage_traces_training_images_to_source_files(demo_project):
    out = run_flen("lineage", "astronaut", "v1", project=demo_project.root).stdout
    blocks = out.split("● ")[1:]
    manifest = pq.read_table(demo_project.partition_dir("training_set", "astronaut", "v1") / "manifest.parquet")
    assert len(blocks) == manifest.num_rows
    for block in blocks:
        assert "source file '" in block, block  # every image ends at an inbox file
    assert "zoom factor=" in out and "normalize" in out and "[classic/1]" in out
    rows = LineageStore(demo_project.lineage_dir).trace("astronaut", "v1")
    enriched_roots = {r["root_id"] for r in rows if r["origin"] == "enriched"}
    with_ops = {r["root_id"] for r in rows if r["depth"] == 1 and r["model"] == "classic/1"}
    assert enriched_roots == with_ops


def test_dvc_is_clean_after_demo(demo_project):
    out = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=demo_project.root, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout or not out.stdout.strip(), out.stdout


def test_rerun_is_idempotent(demo_project, tmp_path):
    before = _md5s(demo_project)
    inbox = {p.name: p.read_bytes() for p in demo_project.inbox_for("astronaut").iterdir()}
    config = tmp_path / "run.yaml"
    config.write_text("ops:\n  enriched_images:\n    config:\n      recipe: demo\n")  # what `flen demo` ran
    run_flen("materialize", "astronaut", "v1", "--config", str(config), project=demo_project.root)
    assert _md5s(demo_project) == before, "an unchanged partition re-materializes to the same DVC md5"
    assert {p.name: p.read_bytes() for p in demo_project.inbox_for("astronaut").iterdir()} == inbox
    versions = run_flen("versions", "training_set", "astronaut", "v1", project=demo_project.root).stdout
    assert versions.count(before["training_set"]) == 2


def test_every_sized_asset_records_the_run_settings_it_ran_with(demo_project):
    """The demo runs cpu-demo: each sized asset's materialization and lineage row name the settings and their knobs."""
    import dagster as dg

    from flen_assets.instance import get_instance
    from flen_resources.run_settings import CPU_DEMO, SIZED_KNOBS

    instance = get_instance(demo_project)
    runs = {r["asset"]: json.loads(r["params"]) for r in LineageStore(demo_project.lineage_dir).rows(
        "SELECT asset, params FROM runs WHERE character='astronaut' AND iteration='v1'")}
    for asset in SIZED_KNOBS:
        event = instance.get_latest_materialization_event(dg.AssetKey(asset))
        metadata = event.asset_materialization.metadata
        assert metadata["run_settings"].value == "cpu-demo", asset
        detail = metadata["run_settings_detail"].value
        assert detail["knobs"] == CPU_DEMO.knobs[asset] and detail["overruled"] == {}, (asset, detail)
        assert runs[asset]["run_settings"]["name"] == "cpu-demo", asset


def test_which_recipe_entries_keep_the_character(demo_project):
    """`flen recipes report` and the gate's metadata: the classic edits keep the astronaut, the tiny pack's
    Qwen camera edit (noise) never does."""
    import dagster as dg

    from flen_assets.instance import get_instance

    report = run_flen("recipes", "report", "astronaut", project=demo_project.root).stdout
    rows = {line.split("|")[2].strip() + "|" + line.split("|")[4].strip(): line for line in report.splitlines()[2:]}
    assert "| 0% | n/a (none reviewed) | n/a (no face) |" in rows["left-45|angles 1 + lightning-8step 1"]
    assert "| 0% |" not in rows["mirror|none"], "the classic mirror keeps the character"
    instance = get_instance(demo_project)
    filtered = instance.get_latest_materialization_event(dg.AssetKey("filtered_images")).asset_materialization
    assert "| left-45 |" in filtered.metadata["recipe_entries"].value
    enriched = instance.fetch_materializations(dg.AssetRecordsFilter(
        asset_key=dg.AssetKey("enriched_images"), asset_partitions=["astronaut|v2"]), limit=1).records[0]
    assert "| astronaut | mirror |" in enriched.asset_materialization.metadata["recipe_entries_so_far"].value
