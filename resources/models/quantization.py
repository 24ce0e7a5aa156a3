"""The quantization setting of base models (auto | none | nf4) and its one rule per device; no torch import,
so the CLI and the Dagster definitions can name it cheaply."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Quantization = Literal["none", "nf4"]
QuantizationSetting = Literal["auto", "none", "nf4"]


def pick_quantization(setting: str, device: torch.device) -> Quantization:
    """`auto`: nf4 on a CUDA GPU (FLUX and Qwen-Image-Edit fit a 24 GB card only in 4 bit), none on the CPU."""
    if setting == "auto":
        return "nf4" if device.type == "cuda" else "none"
    if setting not in ("none", "nf4"):
        raise ValueError(f"quantization {setting!r} is not one of auto, none, nf4 (FLEN_QUANTIZATION or --quantization)")
    return setting  # type: ignore[return-value]
