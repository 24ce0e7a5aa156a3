"""The quantization setting of base models (auto | none | nf4, and fp8 for the LoRA trainers) and its one rule
per device; no torch import, so the CLI and the Dagster definitions can name it cheaply."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Quantization = Literal["none", "nf4"]
QuantizationSetting = Literal["auto", "none", "nf4"]
# The LoRA trainers also take fp8: frozen base weights in e4m3 with fp8 matmuls (trainers/fp8_linear.py).
TrainingQuantization = Literal["none", "nf4", "fp8"]
TrainingQuantizationSetting = Literal["auto", "none", "nf4", "fp8"]
# Card memory an fp8 LoRA run takes beyond its fp8 block weights: the bf16 embedders, the LoRA with its
# 8-bit AdamW state, checkpointed activations at 1024x1024 and the allocator's slack. A bound to refine with
# benchmarks/train_gpu.py's ours-fp8 peak (FLUX's nf4 run peaks 2.2 GiB above its nf4 weights).
FP8_TRAINING_RESERVE_GIB = 5.0
GIB = 2**30


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
        raise QuantizationError("quantization 'fp8' is for the LoRA trainers; the editor and the generator load "
                                "auto, none or nf4: set FLEN_QUANTIZATION=auto (the trainers then pick fp8 where the "
                                "card and the memory budget allow)")
    if setting not in ("none", "nf4"):
        raise QuantizationError(f"quantization {setting!r} is not one of auto, none, nf4: set FLEN_QUANTIZATION "
                                "(or --quantization) to one of them")
    return setting  # type: ignore[return-value]


def fp8_fits(base_params: float, budget_gib: float) -> bool:
    """Whether a transformer of `base_params` parameters trains in fp8 (1 byte each) within `budget_gib`."""
    return base_params / GIB + FP8_TRAINING_RESERVE_GIB <= budget_gib


def pick_training_quantization(setting: str, device: torch.device, base_params: float, budget_gib: float,
                               fp8_matmuls: bool) -> TrainingQuantization:
    """`auto` for a LoRA run: fp8 on a card with fp8 matmuls when the fp8 weights fit the memory budget (FLUX.1-dev's
    11.9B parameters within 20 GiB), else nf4 on a CUDA GPU (Qwen-Image-Edit's 20.4B), none on the CPU."""
    if setting == "fp8":
        if not fp8_matmuls:
            raise QuantizationError(f"fp8 quantization needs fp8 matmuls (a CUDA GPU of compute capability 8.9 or "
                                    f"newer: Ada, Hopper) and {device} has none: set FLEN_QUANTIZATION=auto (or "
                                    "`flen train --quantization auto`), which picks nf4 there")
        return "fp8"
    if setting == "auto" and device.type == "cuda" and fp8_matmuls and fp8_fits(base_params, budget_gib):
        return "fp8"
    if setting not in ("auto", "none", "nf4"):
        raise QuantizationError(f"quantization {setting!r} is not one of auto, none, nf4, fp8: set FLEN_QUANTIZATION "
                                "(or --quantization) to one of them")
    return pick_quantization(setting, device)
