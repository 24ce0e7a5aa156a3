"""The models and LoRAs FLENwheel knows by name, with where to get the real weights."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flen_resources.models.quantization import FP8_TRAINING_RESERVE_GIB

# Qwen-Image-Edit's LoRA run on an fp8 base takes more of the card beside its block weights than FLUX's: 15.78 GiB
# in use (NVML) with 30 of its 60 blocks' 0.317 GiB on the card (28 resident, 2 in flight), so 6.27 GiB
# (iteration_gpu-adapter-fp8-swap32-nvidia-h200.json; 21.14 GiB with 47, 6.25): 6.5 with slack.
QWEN_FP8_TRAINING_RESERVE_GIB = 6.5


@dataclass(frozen=True)
class ModelSpec:
    """A diffusers pipeline FLENwheel loads."""

    key: str
    hub_id: str
    pipeline: str  # diffusers pipeline class name
    size_gb: float  # download size of the safetensors weights, for the missing-model message
    setting: str  # the variable that chooses its source (the `models` resource's field, `flen train --model`)
    transformer_params: float  # parameters of its transformer at full size: whether an fp8 LoRA run fits the budget
    transformer_blocks: int  # its transformer's blocks at full size: how many swap when fp8 does not fit
    # card memory its fp8 LoRA run takes beyond the block weights (models/quantization.FP8_TRAINING_RESERVE_GIB)
    fp8_training_reserve_gib: float = FP8_TRAINING_RESERVE_GIB
    # whether `auto` may train it on an fp8 base with blocks swapped from host memory where fp8 alone does not fit
    # (measured on a card: Qwen-Image-Edit; FLUX.1-dev's swapped step is not, so a tight budget gives it nf4)
    auto_swaps: bool = False
    gated: bool = False
    # Its transformer's config flags that set it apart from the other releases of the same pipeline
    # (flags not named here are off): 2511's zero_cond_t modulates the control images' tokens with
    # timestep 0 and adds no parameter (diffusers 0.42's QwenImageTransformer2DModel).
    transformer_flags: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraSpec:
    """A published LoRA for one of the models."""

    key: str
    model: str  # the MODELS key it was made for
    hub_id: str
    filename: str
    note: str = ""
    family: str = ""  # what the LoRA does, the same for each model's own file ("" : its key)

    @property
    def kind(self) -> str:
        """The family, or the key when it has none."""
        return self.family or self.key


MODELS: dict[str, ModelSpec] = {
    "qwen-image-edit-2509": ModelSpec("qwen-image-edit-2509", "Qwen/Qwen-Image-Edit-2509",
                                      "QwenImageEditPlusPipeline", 57.7, "FLEN_QWEN_EDIT_MODEL", 20.43e9, 60,
                                      fp8_training_reserve_gib=QWEN_FP8_TRAINING_RESERVE_GIB, auto_swaps=True),
    "qwen-image-edit-2511": ModelSpec("qwen-image-edit-2511", "Qwen/Qwen-Image-Edit-2511",
                                      "QwenImageEditPlusPipeline", 57.7, "FLEN_QWEN_EDIT_2511_MODEL", 20.43e9, 60,
                                      fp8_training_reserve_gib=QWEN_FP8_TRAINING_RESERVE_GIB, auto_swaps=True,
                                      transformer_flags={"zero_cond_t": True}),
    "flux.1-dev": ModelSpec("flux.1-dev", "black-forest-labs/FLUX.1-dev", "FluxPipeline", 33.7, "FLEN_FLUX_MODEL", 11.9e9,
                            57, gated=True),
}

# The editor models a recipe can choose (`edit_model`), and the one it gets when it names none.
QWEN_EDIT_MODELS = ("qwen-image-edit-2509", "qwen-image-edit-2511")
DEFAULT_EDIT_MODEL = "qwen-image-edit-2509"

LORAS: dict[str, LoraSpec] = {
    "angles": LoraSpec("angles", "qwen-image-edit-2509", "dx8152/Qwen-Edit-2509-Multiple-angles",
                       "镜头转换.safetensors", "camera commands; its author runs it with Lightning"),
    "lightning-8step": LoraSpec("lightning-8step", "qwen-image-edit-2509", "lightx2v/Qwen-Image-Lightning",
                                "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-8steps-V1.0-bf16.safetensors",
                                "8 steps, true_cfg 1, its own scheduler settings"),
    "lightning-4step": LoraSpec("lightning-4step", "qwen-image-edit-2509", "lightx2v/Qwen-Image-Lightning",
                                "Qwen-Image-Edit-2509/Qwen-Image-Edit-2509-Lightning-4steps-V1.0-bf16.safetensors",
                                "4 steps, true_cfg 1, its own scheduler settings"),
    # 2511 takes no Multiple-angles LoRA here: it has novel-view editing built in (its model card), and
    # the 2511 angles LoRAs in the wild use other prompts than ANGLE_PRESETS' commands.
    "lightning-8step-2511": LoraSpec("lightning-8step-2511", "qwen-image-edit-2511",
                                     "lightx2v/Qwen-Image-Edit-2511-Lightning",
                                     "Qwen-Image-Edit-2511-Lightning-8steps-V1.0-bf16.safetensors",
                                     "8 steps, true_cfg 1, its own scheduler settings", family="lightning-8step"),
    "lightning-4step-2511": LoraSpec("lightning-4step-2511", "qwen-image-edit-2511",
                                     "lightx2v/Qwen-Image-Edit-2511-Lightning",
                                     "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors",
                                     "4 steps, true_cfg 1, its own scheduler settings", family="lightning-4step"),
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


def release_flags(key: str) -> dict[str, Any]:
    """Every release flag of the model's pipeline, with this model's values (the others' flags off)."""
    spec = MODELS[key]
    names = {flag for other in MODELS.values() if other.pipeline == spec.pipeline for flag in other.transformer_flags}
    return {flag: spec.transformer_flags.get(flag, False) for flag in sorted(names)}


def lora_for(name: str, model: str) -> str | None:
    """The registered LoRA that does what `name` does, made for `model` (None: that model has none)."""
    kind = LORAS[name].kind if name in LORAS else name
    return next((spec.key for spec in LORAS.values() if spec.kind == kind and spec.model == model), None)


def lora_mismatch(name: str, model: str) -> str | None:
    """Why the registered LoRA `name` does not go on `model`, with the one that does; None when it does
    (or when `name` is not registered: a file of the user's, checked only by its architecture)."""
    spec = LORAS.get(name)
    if spec is None or spec.model == model:
        return None
    other = lora_for(name, model)
    return (f"LoRA {name!r} was made for {spec.model}, not {model}; "
            + (f"use {other!r} instead" if other else f"{model} has no {spec.kind} LoRA: leave it out"))


def lightning_steps(lora_names: list[str]) -> int | None:
    """4 or 8 when a Lightning LoRA is in the stack, else None."""
    for name in lora_names:
        if name.startswith("lightning-"):
            return int(name.split("-")[1].removesuffix("step"))
    return None
