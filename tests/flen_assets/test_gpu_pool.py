"""The `gpu` pool's limit follows the host's cards (or FLEN_GPU_POOL_LIMIT), and every GPU asset runs on a leased card."""

from __future__ import annotations

import pytest

from flen_assets.definitions import defs
from flen_assets.runs import init_project
from flen_resources.gpu_lease import GPU_POOL

GPU_ASSETS = {"enriched_images", "flux_lora", "lora_eval", "synthetic_batch", "qwen_adapter"}


def _limit(project) -> int:
    instance = init_project(project)
    try:
        return instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count
    finally:
        instance.dispose()


def test_the_gpu_pool_limit_is_the_number_of_cards(project, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEN_GPU_POOL_LIMIT", raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert _limit(project) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _limit(project) == 1  # no card: the GPU steps still run, one at a time
    monkeypatch.setenv("FLEN_GPU_POOL_LIMIT", "4")  # a cluster: the cards of every host
    assert _limit(project) == 4


def test_exactly_the_gpu_assets_lease_a_card() -> None:
    graph = defs.resolve_asset_graph()
    pooled = {key.to_user_string() for key in graph.get_all_asset_keys() if GPU_POOL in (graph.get(key).pools or ())}
    assert pooled == GPU_ASSETS
    for key in graph.get_all_asset_keys():
        body = defs.get_assets_def(key).op.compute_fn.decorated_fn
        assert hasattr(body, "__wrapped__") == (key.to_user_string() in GPU_ASSETS), key.to_user_string()
