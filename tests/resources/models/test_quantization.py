"""The quantization rules (models/quantization.py): how many fp8 blocks swap, and when `auto` picks fp8."""

from __future__ import annotations

import torch

from flen_resources.models.quantization import (
    GIB,
    IN_FLIGHT_BLOCKS,
    NF4_BYTES_PER_PARAM,
    blocks_to_fit,
    fp8_fits_host,
    fp8_fits_swapping,
    host_memory_gib,
    pick_quantization_with_fp8,
    swapped_block_count,
)
from flen_resources.models.registry import MODELS

QWEN, FLUX = MODELS["qwen-image-edit-2509"], MODELS["flux.1-dev"]
CUDA = torch.device("cuda")


def _card_gib(spec, swapped: int) -> float:
    """The card memory a run takes by the rule's arithmetic: resident and in-flight blocks, and the reserve."""
    per_block = spec.transformer_params / GIB / spec.transformer_blocks
    return (spec.transformer_blocks - swapped + IN_FLIGHT_BLOCKS) * per_block + spec.fp8_training_reserve_gib


def test_nf4_takes_a_little_over_half_a_byte_a_weight():
    assert 0.515 < NF4_BYTES_PER_PARAM < 0.516


def test_a_base_that_fits_swaps_nothing():
    assert swapped_block_count(FLUX.transformer_params, FLUX.transformer_blocks, 20, FLUX.fp8_training_reserve_gib) == 0
    assert swapped_block_count(QWEN.transformer_params, 60, 40, QWEN.fp8_training_reserve_gib) == 0, "a 48 GB card"


def test_a_base_that_must_swap_keeps_the_card_at_the_nf4_weights():
    # Qwen-Image-Edit in fp8 (19.0 GiB) with its 6.5 GiB reserve on a 20 GiB budget needs 18 + 2 swapped; holding
    # no more block weight than nf4 (9.8 GiB) takes 30 + 2: the second wins, as measured on an H200 (32: 15.78 GiB)
    count = swapped_block_count(QWEN.transformer_params, 60, 20, QWEN.fp8_training_reserve_gib)
    assert count == 30 + IN_FLIGHT_BLOCKS
    on_card = (60 - count + IN_FLIGHT_BLOCKS) * QWEN.transformer_params / GIB / 60  # the slots too
    assert on_card <= QWEN.transformer_params * NF4_BYTES_PER_PARAM / GIB
    assert _card_gib(QWEN, count) <= 20


def test_a_tight_budget_swaps_more_than_the_nf4_floor_and_still_fits():
    for budget in (8, 10, 12, 14):
        count = swapped_block_count(QWEN.transformer_params, 60, budget, QWEN.fp8_training_reserve_gib)
        assert count > 32 and _card_gib(QWEN, count) <= budget, budget


def test_auto_picks_fp8_when_the_blocks_can_swap_into_the_budget():
    qwen = QWEN.transformer_params
    assert pick_quantization_with_fp8("auto", CUDA, qwen, 20, True, QWEN.fp8_training_reserve_gib, 60) == "fp8"
    assert pick_quantization_with_fp8("auto", CUDA, qwen, 20, True, QWEN.fp8_training_reserve_gib) == "nf4", \
        "nothing swaps (the generator): nf4"
    assert pick_quantization_with_fp8("auto", CUDA, qwen, 7, True, QWEN.fp8_training_reserve_gib, 60) == "nf4", \
        "7 GiB: not even 59 swapped blocks fit"
    assert pick_quantization_with_fp8("auto", CUDA, qwen, 20, False, QWEN.fp8_training_reserve_gib, 60) == "nf4", \
        "no fp8 matmuls (Ampere)"
    assert pick_quantization_with_fp8("auto", torch.device("cpu"), qwen, 20, True, 6.5, 60) == "none"


def test_fits_swapping_needs_a_block_that_never_swaps():
    assert fp8_fits_swapping(QWEN.transformer_params, 60, 20, 6.5)
    assert not fp8_fits_swapping(QWEN.transformer_params, 0, 20, 6.5), "no blocks to swap"
    assert not fp8_fits_swapping(QWEN.transformer_params, 60, 7, 6.5)


def test_the_host_must_hold_the_bf16_transformer_while_it_quantizes():
    assert fp8_fits_host(FLUX.transformer_params, 31), "FLUX.1-dev's 22 GiB on a 32 GB desktop"
    assert not fp8_fits_host(QWEN.transformer_params, 31), "Qwen-Image-Edit's 38 GiB"
    assert fp8_fits_host(QWEN.transformer_params, 62), "a 64 GB desktop"
    qwen = QWEN.transformer_params
    assert pick_quantization_with_fp8("auto", CUDA, qwen, 20, True, 6.5, 60, host_gib=31) == "nf4"
    assert pick_quantization_with_fp8("auto", CUDA, qwen, 20, True, 6.5, 60, host_gib=62) == "fp8"
    assert pick_quantization_with_fp8("fp8", CUDA, qwen, 20, True, 6.5, 60, host_gib=31) == "fp8", "asked for"


def test_a_containers_memory_limit_is_the_hosts_memory(tmp_path, monkeypatch):
    import flen_resources.models.quantization as quantization

    machine = host_memory_gib()
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(quantization, "CGROUP_MEMORY_LIMITS", (str(v2), str(v1)))
    assert host_memory_gib() == machine, "no cgroup files: the machine's"
    v2.write_text("max\n")
    v1.write_text(f"{2**63 - 4096}\n")  # v1's "no limit"
    assert host_memory_gib() == machine
    v2.write_text(f"{16 * 2**30}\n")
    assert host_memory_gib() == min(machine, 16.0), "a 16 GiB container"


def test_the_fewest_blocks_to_fit_are_below_the_nf4_floor_at_the_default_budget():
    # 19.03 + 6.5 - 20 = 5.53 GiB over at 0.317 GiB a block: 18, plus the two in flight
    assert blocks_to_fit(QWEN.transformer_params, 60, 20, QWEN.fp8_training_reserve_gib) == 18 + IN_FLIGHT_BLOCKS
    assert blocks_to_fit(FLUX.transformer_params, FLUX.transformer_blocks, 20, 5) == 0
    need = blocks_to_fit(QWEN.transformer_params, 60, 20, QWEN.fp8_training_reserve_gib)
    assert _card_gib(QWEN, need) <= 20 < _card_gib(QWEN, need - 1)


def test_the_nf4_floor_never_swaps_the_first_block():
    # a transformer of 4 blocks just over its budget: the floor (2 + 2 in flight) would take them all
    params = 4 * GIB
    assert blocks_to_fit(params, 4, 4 + 5 - 0.5, 5) == 1 + IN_FLIGHT_BLOCKS
    assert swapped_block_count(params, 4, 4 + 5 - 0.5, 5) == 3
    assert fp8_fits_swapping(params, 4, 4 + 5 - 0.5, 5)
