"""The quantization setting of base models (auto | none | nf4) and its one rule per device; no torch import,
so the CLI and the Dagster definitions can name it cheaply."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Quantization = Literal["none", "nf4"]
QuantizationSetting = Literal["auto", "none", "nf4"]


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
    if setting not in ("none", "nf4"):
        raise QuantizationError(f"quantization {setting!r} is not one of auto, none, nf4: set FLEN_QUANTIZATION "
                                "(or --quantization) to one of them")
    return setting  # type: ignore[return-value]
