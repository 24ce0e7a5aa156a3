"""The code location loads, and every asset, check, job, sensor and resource in it resolves."""

from __future__ import annotations

import dagster as dg

from flen_assets.definitions import defs

ASSETS = {"source_images", "identity_reference", "enriched_images", "filtered_images", "training_set", "flux_lora",
          "lora_eval", "synthetic_batch", "edit_triplets", "qwen_adapter"}
GPU_POOL = {"enriched_images", "flux_lora", "lora_eval", "synthetic_batch", "qwen_adapter"}


def test_defs_validate_and_resolve_everything():
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == ASSETS
    for job in ("training_set_job", "flywheel_job"):
        assert defs.resolve_job_def(job).name == job
    for sensor in ("inbox_sensor", "next_iteration_sensor", "dead_runs_sensor"):
        assert defs.resolve_sensor_def(sensor).name == sensor
    checks = {k.name for k in graph.asset_check_keys}
    assert {"review_complete", "synthetic_review_complete", "sources_review_complete", "all_inbox_files_usable",
            "enough_sources"} <= checks
    required = set()
    for key in graph.get_all_asset_keys():
        required |= graph.get(key).assets_def.required_resource_keys
    provided = set(defs.resources) | {"io_manager"}  # Dagster supplies the default io_manager
    assert required <= provided, f"assets need resources the code location lacks: {required - provided}"
    assert "partition_io_manager" in required


def test_gpu_assets_share_the_gpu_pool():
    graph = defs.resolve_asset_graph()
    pools = {k.to_user_string(): graph.get(k).pools for k in graph.get_all_asset_keys()}
    assert {a for a, p in pools.items() if p and "gpu" in p} == GPU_POOL
