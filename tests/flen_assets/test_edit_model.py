"""The edit-model flywheel through Dagster on a tiny project: edit_triplets, qwen_adapter, and
enrichment of v2 stacking the adapter of v1 (or failing fast when it is missing).

One sequence of runs per module, shared by every assert:
  v1: source_images, identity_reference, enriched_images (recipe demo), filtered_images
  v2: source_images, then enriched_images -> fails: qwen_adapter v1 is missing
  v1: edit_triplets, qwen_adapter with min_triplets too high -> skipped, the run succeeds
  v1: qwen_adapter (4 steps at 64 px, rank 4) -> trained
  v2: enriched_images -> its qwen_edit rows stack 'qwen-adapter'; then identity_reference,
      filtered_images and edit_triplets of v2 (cumulative: carries v1's rows)
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import shared_project
from safetensors import safe_open

from flen_resources.lineage import LineageStore
from flen_resources.project import Project

CHARACTER = "alice"
SAMPLES = ("portrait.jpg", "closeup.png", "side_light.jpg", "print_cmyk.jpg")  # the same person, 4 framings
ADAPTER_CONFIG = {"steps": 4, "resolution": 64, "rank": 4, "min_triplets": 4}
V1 = ["source_images", "identity_reference", "enriched_images", "filtered_images"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _failures(result) -> str:
    return "\n".join(e.event_specific_data.error.to_string() for e in result.all_events
                     if e.event_type_value == "STEP_FAILURE")


def _materializations(result) -> dict[str, dict]:
    return {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
            for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}


class Flow:
    """The results of the module's runs, by name."""

    def __init__(self, project: Project):
        self.project = project
        self.results: dict[str, object] = {}

    def rows(self, asset: str, iteration: str) -> list[dict]:
        return pq.read_table(self.project.partition_dir(asset, CHARACTER, iteration) / "manifest.parquet").to_pylist()


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> Flow:
    from flen_assets.definitions import defs
    from flen_assets.demo_data import sample_files
    from flen_assets.partitions import add_partitions
    from flen_assets.runs import init_project

    with shared_project(tmp_path_factory, "edit_model") as project:
        instance = init_project(project)
        inbox = project.inbox_for(CHARACTER)
        inbox.mkdir(parents=True)
        for name, data in sample_files().items():
            if name in SAMPLES:
                (inbox / name).write_bytes(data)
        job = defs.resolve_job_def("flywheel_job")
        flow = Flow(project)

        def run(name: str, iteration: str, assets: list[str], ops: dict | None = None):
            key = add_partitions(instance, CHARACTER, iteration)
            flow.results[name] = job.execute_in_process(
                instance=instance, partition_key=str(key), raise_on_error=False,
                asset_selection=[dg.AssetKey(a) for a in assets],
                run_config={"ops": {"enriched_images": {"config": {"recipe": "demo"}}, **(ops or {})}})
            return flow.results[name]

        assert run("v1", "v1", V1).success, _failures(flow.results["v1"])
        assert run("v2_sources", "v2", ["source_images"]).success, _failures(flow.results["v2_sources"])
        run("v2_enrich_no_adapter", "v2", ["enriched_images"])
        run("v1_skipped", "v1", ["edit_triplets", "qwen_adapter"],
            {"qwen_adapter": {"config": {**ADAPTER_CONFIG, "min_triplets": 10_000}}})
        flow.skipped_rows = flow.rows("qwen_adapter", "v1")
        run("v1_adapter", "v1", ["qwen_adapter"], {"qwen_adapter": {"config": ADAPTER_CONFIG}})
        run("v2", "v2", ["enriched_images", "identity_reference", "filtered_images", "edit_triplets"])
        yield flow


# -- edit_triplets v1 -------------------------------------------------------------------------------
def test_triplets_are_the_accepted_enriched_images(flow):
    assert flow.results["v1_skipped"].success, _failures(flow.results["v1_skipped"])
    accepted = {r["image_id"]: r for r in flow.rows("filtered_images", "v1") if r["accepted"]}
    assert len(accepted) >= 4, "enough accepted classic edits to train on"
    rows = flow.rows("edit_triplets", "v1")
    assert sorted(r["after_id"] for r in rows) == sorted(accepted)
    assert {r["origin_iteration"] for r in rows} == {"v1"}
    folder = flow.project.partition_dir("edit_triplets", CHARACTER, "v1")
    sources = {r["image_id"] for r in flow.rows("source_images", "v1") if r["status"] == "accepted"}
    for r in rows:
        assert r["before_id"] == accepted[r["after_id"]]["parent_id"] and r["before_id"] in sources
        for side in ("before", "after"):  # content-addressed copies
            data = (folder / r[f"{side}_path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == r[f"{side}_id"]
    assert (folder / "contact_sheet.png").is_file()


def test_triplet_prompts_describe_the_edit(flow):
    prompts = {r["operation"]: r["prompt"] for r in flow.rows("edit_triplets", "v1")}
    assert prompts.get("mirror") == "Flip the photo horizontally"
    assert all(p and p.strip() for p in prompts.values())
    if "color_temperature" in prompts:
        assert prompts["color_temperature"] == "Change the lighting: warm lighting"


def test_triplets_recorded_as_lineage_members(flow):
    store = LineageStore(flow.project.lineage_dir)
    members = store.rows("SELECT image_id, origin, caption FROM latest_members WHERE asset='edit_triplets' "
                         "AND character=$c AND iteration='v1'", {"c": CHARACTER})
    rows = flow.rows("edit_triplets", "v1")
    assert sorted((m["image_id"], m["caption"]) for m in members) == sorted((r["after_id"], r["prompt"]) for r in rows)
    assert {m["origin"] for m in members} == {"triplet"}
    trace = store.trace(CHARACTER, "v1", asset="edit_triplets")
    assert {t["root_id"] for t in trace if t["depth"] == 1} == {r["after_id"] for r in rows}, "after <- before edges"


# -- qwen_adapter ---------------------------------------------------------------------------------
def test_too_few_triplets_skip_training_without_failing(flow):
    assert flow.results["v1_skipped"].success
    (row,) = flow.skipped_rows
    assert row["status"].startswith("skipped: ") and "< 10000" in row["status"] and row["file"] is None
    meta = _materializations(flow.results["v1_skipped"])["qwen_adapter"]
    assert meta["trained"].value is False


def test_adapter_is_trained_and_loadable(flow):
    result = flow.results["v1_adapter"]
    assert result.success, _failures(result)
    meta = _materializations(result)["qwen_adapter"]
    assert meta["trained"].value is True and meta["steps"].value == 4 and "loss_curve" in meta
    folder = flow.project.partition_dir("qwen_adapter", CHARACTER, "v1")
    rows = {r["key_style"]: r for r in flow.rows("qwen_adapter", "v1")}
    assert rows["diffusers"]["status"] == "trained"
    assert json.loads(rows["diffusers"]["config"])["rank"] == 4
    triplets_md5 = _materializations(flow.results["v1_skipped"])["edit_triplets"]["dvc_md5"].value
    assert rows["diffusers"]["dataset_md5"] == triplets_md5
    assert (folder / "loss_curve.png").is_file()
    for row in rows.values():
        with safe_open(str(folder / row["file"]), framework="pt") as fh:
            assert fh.metadata()["flenwheel.dataset_md5"] == triplets_md5
            assert any("lora" in k for k in fh.keys())
    metrics = LineageStore(flow.project.lineage_dir).rows(
        "SELECT name FROM metrics WHERE asset='qwen_adapter' AND character=$c", {"c": CHARACTER})
    assert {"final_loss", "triplets"} <= {m["name"] for m in metrics}


# -- enrichment v2 uses qwen_adapter v1 -------------------------------------------------------------
def test_enrichment_v2_fails_fast_without_adapter_v1(flow):
    result = flow.results["v2_enrich_no_adapter"]
    assert not result.success
    message = _failures(result)
    assert "qwen_adapter" in message and f"{CHARACTER}|v1" in message, message
    assert "materialize" in message


def test_enrichment_v2_stacks_adapter_v1(flow):
    result = flow.results["v2"]
    assert result.success, _failures(result)
    adapter_md5 = _materializations(flow.results["v1_adapter"])["qwen_adapter"]["dvc_md5"].value
    adapter_sha = hashlib.sha256((flow.project.partition_dir("qwen_adapter", CHARACTER, "v1")
                                  / "qwen_adapter.safetensors").read_bytes()).hexdigest()
    rows = flow.rows("enriched_images", "v2")
    qwen = [r for r in rows if r["operation"] == "qwen_edit"]
    assert qwen, "the demo recipe has a qwen_edit entry"
    for r in qwen:
        stack = {a["name"]: a for a in json.loads(r["adapters"])}
        assert {"angles", "lightning-8step", "qwen-adapter"} <= set(stack)
        assert stack["qwen-adapter"]["sha256"] == adapter_sha
        assert (stack["qwen-adapter"]["iteration"], stack["qwen-adapter"]["dvc_md5"]) == ("v1", adapter_md5)
        assert stack["qwen-adapter"]["weight"] == 1.0
    assert not any("qwen-adapter" in r["adapters"] for r in rows if r["operation"] != "qwen_edit")
    meta = _materializations(result)["enriched_images"]
    inputs = meta["previous_iteration_inputs"].value
    assert {"asset": "qwen_adapter", "iteration": "v1", "dvc_md5": adapter_md5} in inputs
    assert meta["qwen_adapter"].value["used"] is True


def test_edit_triplets_v2_carry_v1(flow):
    v1 = {r["after_id"]: r for r in flow.rows("edit_triplets", "v1")}
    v2 = {r["after_id"]: r for r in flow.rows("edit_triplets", "v2")}
    assert set(v1) <= set(v2)
    assert all(v2[k]["origin_iteration"] == "v1" for k in v1)
    accepted_v2 = {r["image_id"] for r in flow.rows("filtered_images", "v2") if r["accepted"]}
    assert set(v2) == set(v1) | accepted_v2
    folder = flow.project.partition_dir("edit_triplets", CHARACTER, "v2")
    assert all((folder / r["before_path"]).is_file() and (folder / r["after_path"]).is_file() for r in v2.values())
    inputs = _materializations(flow.results["v2"])["edit_triplets"]["previous_iteration_inputs"].value
    assert [i["asset"] for i in inputs] == ["edit_triplets"]
