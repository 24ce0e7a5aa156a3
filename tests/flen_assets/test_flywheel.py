"""The flywheel across iterations: order checks, v2 lineage, export layout, DVC plot data."""

from __future__ import annotations

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import run_flen

from flen_assets.assets.common import PartitionRun
from flen_resources.lineage import LineageStore


def test_reading_a_missing_previous_iteration_fails_fast(project):
    run = PartitionRun(context=None, project=project, lineage=LineageStore(project.lineage_dir),
                       asset="training_set", character="alice", iteration="v2")
    with pytest.raises(dg.Failure, match=r"materialize synthetic_batch for partition alice\|v1 first"):
        run.previous("synthetic_batch")
    assert PartitionRun(None, project, run.lineage, "training_set", "alice", "v1").previous("synthetic_batch") is None


@pytest.mark.slow
def test_demo_runs_two_iterations(demo_project):
    for asset in ("flux_lora", "lora_eval", "synthetic_batch", "edit_triplets", "qwen_adapter"):
        for iteration in ("v1", "v2"):
            assert (demo_project.partition_dir(asset, "astronaut", iteration) / "manifest.parquet").is_file(), (asset, iteration)
    lora = demo_project.partition_dir("flux_lora", "astronaut", "v2")
    assert (lora / "lora.safetensors").is_file() and (lora / "lora_comfyui.safetensors").is_file()
    history = (demo_project.data_dir / "reports" / "eval_history-astronaut.csv").read_text().splitlines()
    assert history[0].startswith("iteration,identity_consistency") and [h.split(",")[0] for h in history[1:]] == ["v1", "v2"]


@pytest.mark.slow
def test_lineage_of_v2_names_its_cross_iteration_inputs(demo_project):
    out = run_flen("lineage", "astronaut", "v2", project=demo_project.root).stdout
    assert "flux_lora" in out and "trained on training_set" in out
    assert "reads synthetic_batch v1" in out, "training set v2 records the accepted synthetic of v1"
    assert "reads qwen_adapter v1" in out, "enrichment v2 records the qwen adapter of v1"
    assert "source file '" in out


@pytest.mark.slow
def test_export_layout(demo_project, tmp_path):
    dest = tmp_path / "export"
    run_flen("export", "astronaut", "v2", "--to", str(dest), project=demo_project.root)
    images = sorted((dest / "dataset").glob("*.png"))
    manifest = pq.read_table(demo_project.partition_dir("training_set", "astronaut", "v2") / "manifest.parquet")
    assert len(images) == manifest.num_rows
    assert all(img.with_suffix(".txt").read_text().strip() for img in images), "same-name caption per image"
    assert (dest / "astronaut_v2_lora.safetensors").is_file() and (dest / "astronaut_v2_lora_comfyui.safetensors").is_file()
    again = run_flen("export", "astronaut", "v2", "--to", str(dest), project=demo_project.root, check=False)
    assert again.returncode == 1 and "not empty" in again.stderr
    assert not list(tmp_path.glob(".export.*")), "no staging folder left behind"


@pytest.mark.slow
def test_export_writes_cards_that_huggingface_hub_loads_and_a_lora_diffusers_loads(demo_project, tmp_path):
    import json

    from diffusers import FluxPipeline
    from huggingface_hub import DatasetCard, ModelCard

    from flen_resources.models.sources import resolve_model

    dest = tmp_path / "export"
    run_flen("export", "astronaut", "v2", "--to", str(dest), project=demo_project.root)
    training = pq.read_table(demo_project.partition_dir("training_set", "astronaut", "v2") / "manifest.parquet")
    origins = training.column("origin").to_pylist()
    lora = pq.read_table(demo_project.partition_dir("flux_lora", "astronaut", "v2") / "manifest.parquet").to_pylist()[0]
    metrics = json.loads((demo_project.partition_dir("lora_eval", "astronaut", "v2") / "metrics.json").read_text())

    card = ModelCard.load(dest / "README.md")
    data = card.data.to_dict()
    assert data["base_model_ref"] == lora["base_model"] and "base_model" not in data, "the tiny pack is no Hub model"
    assert data["instance_prompt"] == "astronaut_flen" and data["library_name"] == "diffusers"
    assert data["training_set_md5"] == lora["dataset_md5"]
    assert data["training_settings"]["max_steps"] == lora["steps"] and data["checkpoint"]["step"] == lora["steps"]
    assert data["evaluation"]["identity_consistency"] == metrics["identity_consistency"]
    assert data["evaluation"]["mean_distance"] is None, "NaN (no face) is written as null"
    assert data["lineage"] == {"character": "astronaut", "iteration": "v2", "source": origins.count("source"),
                               "enriched": origins.count("enriched"), "synthetic": origins.count("synthetic")}
    assert 'weight_name="astronaut_v2_lora.safetensors"' in card.text

    dataset = DatasetCard.load(dest / "dataset" / "README.md").data.to_dict()
    assert dataset["training_set_md5"] == lora["dataset_md5"] and dataset["trigger_word"] == "astronaut_flen"
    assert sum(dataset["origins"].values()) == training.num_rows == len(list((dest / "dataset").glob("*.png")))

    pipe = FluxPipeline.from_pretrained(str(resolve_model("flux.1-dev", "tiny").path), use_safetensors=True)
    pipe.load_lora_weights(str(dest), weight_name="astronaut_v2_lora.safetensors", adapter_name="astronaut")
    assert "astronaut" in pipe.get_active_adapters()


@pytest.mark.slow
def test_rematerializing_a_whole_iteration_reuses_its_content(demo_project, tmp_path):
    """Every v1 asset, LoRAs and generated images included, comes back with the same DVC md5 and
    adds no blob to the DVC cache, even after v2 exists."""
    import json

    from flen_assets.runs import DEMO_RUN_CONFIG

    def state() -> tuple[dict[str, str], int]:
        rows = LineageStore(demo_project.lineage_dir).rows(
            "SELECT asset, dvc_md5 FROM latest_artifacts WHERE character='astronaut' AND iteration='v1'")
        blobs = sum(1 for p in (demo_project.root / ".dvc" / "cache").rglob("*") if p.is_file())
        return {r["asset"]: r["dvc_md5"] for r in rows}, blobs

    before, blobs = state()
    assert {"flux_lora", "lora_eval", "synthetic_batch", "qwen_adapter"} <= set(before)
    config = tmp_path / "demo.json"
    config.write_text(json.dumps(DEMO_RUN_CONFIG))  # the settings `flen demo` ran v1 with
    run_flen("materialize", "astronaut", "v1", "--all", "--config", str(config), project=demo_project.root)
    after, blobs_after = state()
    assert after == before, {a: (before.get(a), after.get(a)) for a in after if before.get(a) != after.get(a)}
    assert blobs_after == blobs, "no duplicate blobs"
