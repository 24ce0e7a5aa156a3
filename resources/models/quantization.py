"""The quantization setting of base models (auto | none | nf4, and fp8 for FLUX's trainer and generator) and its
one rule per device; no torch import, so the CLI and the Dagster definitions can name it cheaply."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Quantization = Literal["none", "nf4"]
QuantizationSetting = Literal["auto", "none", "nf4"]
# The LoRA trainers and the FLUX generator also take fp8: base weights in e4m3 with fp8 matmuls
# (models/fp8_linear.py); the editor's 20B transformer does not fit a 24 GB card in fp8.
QuantizationWithFp8 = Literal["none", "nf4", "fp8"]
QuantizationSettingWithFp8 = Literal["auto", "none", "nf4", "fp8"]
# Card memory an fp8 LoRA run takes beyond its fp8 block weights: the bf16 embedders, the LoRA with its
# 8-bit AdamW state, checkpointed activations at 1024x1024 and the allocator's slack. FLUX.1-dev on an H200
# (benchmarks/results/train_gpu-flux-fp8-nvidia-h200.json): 11.26 GiB of weights, peak 13.64 GiB allocated,
# 15.2 GiB of the card in use (NVML, CUDA context included: iteration_gpu's flux_lora), so 5 GiB holds.
# A model whose run takes more says so in its registry entry (ModelSpec.fp8_training_reserve_gib).
FP8_TRAINING_RESERVE_GIB = 5.0
# The same for generation (no gradients, no optimizer; the text encoders and the VAE take their turn on the
# card under model offload, T5-XXL's 9 GiB in bf16 the largest): an estimate, not yet measured.
FP8_GENERATION_RESERVE_GIB = 4.0
GIB = 2**30
# Swapped blocks on the card at once (models/block_swap.py's slots): the one computing and the next on its way in.
IN_FLIGHT_BLOCKS = 2
# An fp8 base loads in bf16 on the CPU and is quantized one block at a time on its way to the card
# (fp8_linear.transformer_to_fp8), so the host holds the whole bf16 transformer once (FLUX.1-dev 22 GiB,
# Qwen-Image-Edit 38), beside the process itself (Python, torch, the pipeline's other components): 8 GiB.
# nf4 quantizes as it loads onto the card.
FP8_HOST_MARGIN_GIB = 8.0
# A container's memory limit (cgroup v2, v1): what the kernel kills the process at, lower than the machine's RAM.
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
# bitsandbytes nf4 with double quantization: 4 bits a weight, an 8-bit absmax per 64 weights and an fp32 one
# per 256 absmaxes: 4.127 bits.
NF4_BYTES_PER_PARAM = (4 + 8 / 64 + 32 / (64 * 256)) / 8


class QuantizationError(ValueError):
    """A quantization setting that cannot run here; the message names the setting and the fix."""


def nf4_needs_cuda(device: object) -> str:
    """Why nf4 cannot run on `device`, and the fix: one line (what `flen` prints for a failed step)."""
    return (f"nf4 quantization needs a CUDA GPU and this runs on {device}: set FLEN_QUANTIZATION=none (or auto: "
            "nf4 on a GPU, none on the CPU; `flen train`: --quantization none), or run on a CUDA GPU")


def pick_quantization(setting: str, device: torch.device) -> Quantization:
    """`auto`: nf4 on a CUDA GPU (FLUX and Qwen-Image-Edit fit a 24 GB card only in 4 bit), none on the CPU."""
    if setting == "auto":
        return "nf4" if device.type == "cuda" else "none"
    if setting == "fp8":
        raise QuantizationError("quantization 'fp8' is for the LoRA trainers and the FLUX generator; the editor "
                                "loads auto, none or nf4: set FLEN_QUANTIZATION=auto (the others then pick fp8 "
                                "where the card and the memory budget allow)")
    if setting not in ("none", "nf4"):
        raise QuantizationError(f"quantization {setting!r} is not one of auto, none, nf4: set FLEN_QUANTIZATION "
                                "(or --quantization) to one of them")
    return setting  # type: ignore[return-value]


def fp8_overshoot_gib(base_params: float, budget_gib: float, reserve_gib: float = FP8_TRAINING_RESERVE_GIB) -> float:
    """How far a transformer of `base_params` parameters in fp8 (1 byte each) plus `reserve_gib` goes over
    `budget_gib` (0 or less: it fits)."""
    return base_params / GIB + reserve_gib - budget_gib


def fp8_fits(base_params: float, budget_gib: float, reserve_gib: float = FP8_TRAINING_RESERVE_GIB) -> bool:
    """Whether a transformer of `base_params` parameters runs in fp8 plus `reserve_gib` within `budget_gib`."""
    return fp8_overshoot_gib(base_params, budget_gib, reserve_gib) <= 0


def blocks_to_fit(base_params: float, blocks: int, budget_gib: float, reserve_gib: float) -> int:
    """The fewest of `blocks` equal blocks of a `base_params` fp8 transformer that must live in host memory for the
    rest, the IN_FLIGHT_BLOCKS slots and `reserve_gib` to fit `budget_gib`; 0 when it all fits."""
    over = fp8_overshoot_gib(base_params, budget_gib, reserve_gib)
    return 0 if over <= 0 else math.ceil(over / (base_params / GIB / blocks)) + IN_FLIGHT_BLOCKS


def swapped_block_count(base_params: float, blocks: int, budget_gib: float, reserve_gib: float) -> int:
    """How many of `blocks` equal blocks of a `base_params` fp8 transformer live in host memory: 0 when it fits
    `budget_gib` with `reserve_gib`, else enough to fit and to hold no more weight on the card than nf4 would."""
    need = blocks_to_fit(base_params, blocks, budget_gib, reserve_gib)
    if need == 0:
        return 0
    # Once any block swaps, more cost nothing measurable: Qwen-Image-Edit's adapter step on an H200 took 1.175 s
    # with 15 of 60 swapped, 1.170 s with 32 (iteration_gpu-adapter-fp8-swap{15,32}-nvidia-h200.json), the copies
    # hidden behind the compute. So an fp8 base that must swap keeps the card at the nf4 base's weight memory
    # (the naive nf4 loop's peak, issue 15) and leaves the rest of the budget to the other work on the card.
    nf4_parity = math.ceil((1 - NF4_BYTES_PER_PARAM) * blocks) + IN_FLIGHT_BLOCKS  # equal blocks: a share of them
    return max(need, min(nf4_parity, blocks - 1))  # the first block never swaps


def host_memory_gib() -> float:
    """The memory (RAM) this process may use, in GiB: the machine's, or a container's limit when lower."""
    import psutil

    total = psutil.virtual_memory().total
    for limit_file in CGROUP_MEMORY_LIMITS:
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) or a huge number (v1): no limit
            total = min(total, int(text))
    return total / GIB


def fp8_fits_host(base_params: float, host_gib: float) -> bool:
    """Whether a host of `host_gib` holds a transformer of `base_params` parameters in bf16 while it quantizes."""
    return base_params * 2 / GIB + FP8_HOST_MARGIN_GIB <= host_gib


def fp8_fits_swapping(base_params: float, blocks: int, budget_gib: float, reserve_gib: float) -> bool:
    """Whether an fp8 transformer of `blocks` blocks fits `budget_gib` with some of them swapped (the first never)."""
    return blocks > 0 and blocks_to_fit(base_params, blocks, budget_gib, reserve_gib) < blocks


def pick_quantization_with_fp8(setting: str, device: torch.device, base_params: float, budget_gib: float,
                               fp8_matmuls: bool, reserve_gib: float = FP8_TRAINING_RESERVE_GIB,
                               swappable_blocks: int = 0, host_gib: float | None = None) -> QuantizationWithFp8:
    """`auto` for a LoRA run (or, with its reserve, FLUX generation): fp8 on a card with fp8 matmuls when the fp8
    weights fit the memory budget (FLUX.1-dev's 11.9B parameters within 20 GiB), or fit it with blocks swapped
    from host memory (a trainer's `swappable_blocks`: Qwen-Image-Edit's 20.4B), and the host (`host_gib`, None:
    not checked) holds the bf16 transformer while it quantizes; else nf4 on a CUDA GPU, none on the CPU."""
    if setting == "fp8":
        if not fp8_matmuls:
            raise QuantizationError(f"fp8 quantization needs fp8 matmuls (a CUDA GPU of compute capability 8.9 or "
                                    f"newer: Ada, Hopper) and {device} has none: set FLEN_QUANTIZATION=auto (or "
                                    "`flen train --quantization auto`), which picks nf4 there")
        return "fp8"
    if setting == "auto" and device.type == "cuda" and fp8_matmuls \
            and (host_gib is None or fp8_fits_host(base_params, host_gib)) \
            and (fp8_fits(base_params, budget_gib, reserve_gib)
                 or fp8_fits_swapping(base_params, swappable_blocks, budget_gib, reserve_gib)):
        return "fp8"
    if setting not in ("auto", "none", "nf4"):
        raise QuantizationError(f"quantization {setting!r} is not one of auto, none, nf4, fp8: set FLEN_QUANTIZATION "
                                "(or --quantization) to one of them")
    return pick_quantization(setting, device)


def pick_fp8_matmuls(setting: bool | str, quantization: str, fp8_matmuls: bool) -> bool:
    """Whether a LoRA run's frozen base runs fp8 GEMMs: always on an fp8 base, never on a plain one; on an nf4 base
    only when asked (and the card has them): `auto` leaves it off there."""
    # Measured on one H200, compiled blocks (train_gpu-{qwen-edit,flux}-*fp8-gemms-nvidia-h200.json): dequantizing
    # each nf4 weight and quantizing it to e4m3 at every use costs what the fp8 GEMM saves, or more: FLUX 0.846 s
    # against 0.627 s with bf16 GEMMs in one run; Qwen-Image-Edit 1.43 s against 1.26 s in one run, a tie in another
    # (forward + backward 1.196 against 1.207 s; the fp8 GEMMs' 161 ms saved, their quantization's ~210 ms spent).
    if setting == "auto":
        return quantization == "fp8"
    if setting is False and quantization == "fp8":
        raise QuantizationError("fp8_matmuls false with quantization 'fp8': an fp8 base only runs fp8 GEMMs; set "
                                "fp8_matmuls to auto, or quantization to nf4")
    if setting is True and quantization not in ("nf4", "fp8"):
        raise QuantizationError(f"fp8_matmuls true with quantization {quantization!r}: fp8 GEMMs run on an nf4 or "
                                "fp8 base; set quantization to nf4 or fp8 (or fp8_matmuls to auto)")
    if setting is True and not fp8_matmuls:
        raise QuantizationError("fp8_matmuls true on a card without fp8 GEMMs (a CUDA GPU of compute capability "
                                "8.9 or newer: Ada, Hopper): set fp8_matmuls to auto")
    return bool(setting)
