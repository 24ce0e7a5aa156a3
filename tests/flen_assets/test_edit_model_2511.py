"""Qwen-Image-Edit-2511 through Dagster on the tiny pack: a recipe with edit_model 2511 enriches with it,
lineage and metadata say which release made each edit, qwen_adapter trains on that release, and the next
iteration's enrichment with a 2509 recipe stops before any edit, naming the setting and the fix.

  v1: source_images, identity_reference, enriched_images (two classic edits + a 2511 camera preset),
      filtered_images, edit_triplets, qwen_adapter (2 steps at 64 px)
  v2: source_images, enriched_images with the `demo` recipe (2509) -> fails: adapter v1 is 2511's
"""

from __future__ import annotations

import json

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import shared_project

from flen_resources.lineage import LineageStore

CHARACTER = "bea"
SAMPLES = ("portrait.jpg", "closeup.png")  # two sources keep it quick: each 2511 edit encodes ~1024² on the CPU
Q2511 = "qwen-image-edit-2511"
RECIPE = f"""name = "angles-2511-test"
version = 1
editor = "classic"
edit_model = "{Q2511}"

[[entries]]
id = "mirror"
operation = "mirror"
caption = "mirrored view"

[[entries]]
id = "bw"
operation = "grayscale"
caption = "black and white photo"

[[entries]]
id = "left-45"
editor = "qwen_edit"
preset = "rotate-left-45"
caption = "three-quarter view from the left"
"""

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _failures(result) -> str:
    return "\n".join(e.event_specific_data.error.to_string() for e in result.all_events
                     if e.event_type_value == "STEP_FAILURE")


def _metadata(result, asset: str) -> dict:
    return next(e.event_specific_data.materialization.metadata for e in result.all_events
                if e.event_type_value == "ASSET_MATERIALIZATION" and e.asset_key.to_user_string() == asset)


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, one_torch_thread):
    from flen_assets.definitions import defs
    from flen_assets.demo_data import sample_files
    from flen_assets.partitions import add_partitions
    from flen_assets.runs import init_project

    with shared_project(tmp_path_factory, "edit_2511") as project:
        instance = init_project(project)
        inbox = project.inbox_for(CHARACTER)
        inbox.mkdir(parents=True)
        for name, data in sample_files().items():
            if name in SAMPLES:
                (inbox / name).write_bytes(data)
        recipe = project.root / "angles-2511-test.toml"
        recipe.write_text(RECIPE)
        job = defs.resolve_job_def("flywheel_job")

        def run(iteration: str, assets: list[str], recipe_name: str):
            key = add_partitions(instance, CHARACTER, iteration)
            return job.execute_in_process(
                instance=instance, partition_key=str(key), raise_on_error=False,
                asset_selection=[dg.AssetKey(a) for a in assets],
                run_config={"ops": {"enriched_images": {"config": {"recipe": recipe_name}},
                                    "qwen_adapter": {"config": {"steps": 2, "resolution": 64, "rank": 4,
                                                                "min_triplets": 1}}}})

        v1 = run("v1", ["source_images", "identity_reference", "enriched_images", "filtered_images", "edit_triplets",
                        "qwen_adapter"], str(recipe))
        assert v1.success, _failures(v1)
        v2 = run("v2", ["source_images", "enriched_images"], "demo")

        def rows(asset: str, iteration: str) -> list[dict]:
            return pq.read_table(project.partition_dir(asset, CHARACTER, iteration) / "manifest.parquet").to_pylist()

        yield {"project": project, "v1": v1, "v2": v2, "rows": rows}


def test_enrichment_edits_with_the_recipes_release_and_records_it(flow):
    rows = flow["rows"]("enriched_images", "v1")
    assert {r["recipe_edit_model"] for r in rows} == {Q2511}
    qwen = [r for r in rows if r["operation"] == "qwen_edit"]
    assert len(qwen) == len(SAMPLES)
    for r in qwen:
        assert r["model"].startswith(f"tiny/{Q2511}@") and json.loads(r["params"])["model_key"] == Q2511
        assert [a["name"] for a in json.loads(r["adapters"])] == ["lightning-8step-2511"]
    assert _metadata(flow["v1"], "enriched_images")["edit_model"].value == Q2511
    edges = LineageStore(flow["project"].lineage_dir).rows(
        "SELECT model, params FROM edges WHERE operation = 'qwen_edit' AND character = $c", {"c": CHARACTER})
    assert len(edges) == len(SAMPLES)
    assert all(e["model"].startswith(f"tiny/{Q2511}@") and json.loads(e["params"])["model_key"] == Q2511
               for e in edges)


def test_the_adapter_trains_on_the_release_the_edits_used(flow):
    triplets = flow["rows"]("edit_triplets", "v1")
    assert triplets and {t["edit_model"] for t in triplets} == {Q2511}
    (row, *_) = flow["rows"]("qwen_adapter", "v1")
    assert row["status"] == "trained" and row["edit_model"] == Q2511
    assert row["base_model"].startswith(f"tiny/{Q2511}@")
    assert _metadata(flow["v1"], "qwen_adapter")["edit_model"].value == Q2511


def test_a_2509_recipe_after_a_2511_adapter_stops_before_any_edit(flow):
    result = flow["v2"]
    assert not result.success
    message = _failures(result)
    assert f"qwen_adapter v1 was trained on {Q2511} and recipe 'demo' edits with qwen-image-edit-2509" in message
    assert "adapter_weight to 0" in message and f'edit_model = "{Q2511}"' in message
    assert not flow["project"].partition_dir("enriched_images", CHARACTER, "v2").exists()
