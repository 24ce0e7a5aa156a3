"""The models and LoRAs FLENwheel knows by name, with where to get the real weights."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelSpec:
    """A diffusers pipeline FLENwheel loads."""

    key: str
    hub_id: str
    pipeline: str  # diffusers pipeline class name
    size_gb: float  # download size of the safetensors weights, for the missing-model message
    setting: str  # the variable that chooses its source (the `models` resource's field, `flen train --model`)
    gated: bool = False


@dataclass(frozen=True)
class LoraSpec:
    """A published LoRA for one of the models."""

    key: str
    model: str
    hub_id: str
    filename: str
    note: str = ""


MODELS: dict[str, ModelSpec] = {
    "qwen-image-edit-2509": ModelSpec("qwen-image-edit-2509", "Qwen/Qwen-Image-Edit-2509",
                                      "QwenImageEditPlusPipeline", 57.7, "FLEN_QWEN_EDIT_MODEL"),
    "flux.1-dev": ModelSpec("flux.1-dev", "black-forest-labs/FLUX.1-dev", "FluxPipeline", 33.7, "FLEN_FLUX_MODEL",
                            gated=True),
}

LORAS: dict[str, LoraSpec] = {
    "angles": LoraSpec("angles", "qwen-image-edit-2509", "dx8152/Qwen-Edit-2509-Multiple-angles",
                       "镜头转换.safetensors", "camera commands; its author runs it with Lightning"),
    "lightning-8step": LoraSpec("lightning-8step", "qwen-image-edit-2509", "lightx2v/Qwen-Image-Lightning",
                                "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors",
                                "8 steps, true_cfg 1, its own scheduler settings"),
    "lightning-4step": LoraSpec("lightning-4step", "qwen-image-edit-2509", "lightx2v/Qwen-Image-Lightning",
                                "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors",
                                "4 steps, true_cfg 1, its own scheduler settings"),
}

# Camera commands of dx8152's Multiple-angles LoRA (it was trained on the Chinese wording).
ANGLE_PRESETS: dict[str, str] = {
    "rotate-left-45": "将镜头向左旋转45度",
    "rotate-right-45": "将镜头向右旋转45度",
    "rotate-left-90": "将镜头向左旋转90度",
    "rotate-right-90": "将镜头向右旋转90度",
    "move-forward": "将镜头向前移动",
    "move-left": "将镜头向左移动",
    "move-right": "将镜头向右移动",
    "move-down": "将镜头向下移动",
    "top-down": "将镜头转为俯视",
    "low-angle": "将镜头转为仰视",
    "wide-angle": "将镜头转为广角镜头",
    "close-up": "将镜头转为特写镜头",
}


def lightning_steps(lora_names: list[str]) -> int | None:
    """4 or 8 when a Lightning LoRA is in the stack, else None."""
    for name in lora_names:
        if name.startswith("lightning-"):
            return int(name.split("-")[1].removesuffix("step"))
    return None
