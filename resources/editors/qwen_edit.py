"""The `qwen_edit` editor: QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 or -2511) with a LoRA stack.

A request's params choose steps, true_cfg, the negative prompt and the LoRA stack, e.g.
`{"loras": {"angles": 1.0, "lightning-8step": 1.0}}`. With a Lightning LoRA in the stack the
scheduler switches to Lightning's settings, true_cfg to 1 and steps to 4 or 8, as it was distilled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from flen_resources.editors.base import EditRequest, EditResult
from flen_resources.imaging import sha256_file
from flen_resources.models.loras import LoraFile, resolve_lora
from flen_resources.models.pipelines import load_pipeline, pick_device
from flen_resources.models.quantization import QuantizationSetting, pick_quantization
from flen_resources.models.registry import DEFAULT_EDIT_MODEL, QWEN_EDIT_MODELS, lightning_steps
from flen_resources.models.sources import ResolvedModel, resolve_model

MIN_SIDE = 64
MAX_PIXELS = 40_000_000

# Qwen-Image-Lightning's scheduler (ModelTC/Qwen-Image-Lightning, generate_with_diffusers.py).
LIGHTNING_SCHEDULER = dict(base_image_seq_len=256, base_shift=math.log(3), invert_sigmas=False, max_image_seq_len=8192,
                           max_shift=math.log(3), num_train_timesteps=1000, shift=1.0, shift_terminal=None,
                           stochastic_sampling=False, time_shift_type="exponential", use_beta_sigmas=False,
                           use_dynamic_shifting=True, use_exponential_sigmas=False, use_karras_sigmas=False)

DEFAULT_LORAS = {name: f"tiny:{name}" for name in ("angles", "lightning-8step", "lightning-4step",
                                                   "lightning-8step-2511", "lightning-4step-2511")}


class EditInputError(ValueError):
    """Input images the editor cannot take; the message says which and why."""


def check_inputs(images: Sequence[Image.Image]) -> list[Image.Image]:
    """1 to 3 images, each at least 64 px a side and at most 40 MP; converted to RGB."""
    if not images:
        raise EditInputError("qwen_edit needs 1 to 3 input images, got none")
    if len(images) > 3:
        raise EditInputError(f"qwen_edit takes at most 3 input images (Qwen-Image-Edit), got {len(images)}")
    out = []
    for i, img in enumerate(images, start=1):
        if min(img.size) < MIN_SIDE:
            raise EditInputError(f"input image {i} is {img.width}x{img.height} px; the editor needs at least "
                                 f"{MIN_SIDE} px a side")
        if img.width * img.height > MAX_PIXELS:
            raise EditInputError(f"input image {i} is {img.width}x{img.height} px, over the {MAX_PIXELS // 1_000_000} MP "
                                 "limit; downscale it first")
        out.append(img if img.mode == "RGB" else img.convert("RGB"))
    return out


def output_size(image: Image.Image, area: int) -> tuple[int, int]:
    """Width and height with the image's aspect ratio, about `area` pixels, multiples of 32."""
    ratio = image.width / image.height
    width = math.sqrt(area * ratio)
    height = width / ratio
    return max(32, round(width / 32) * 32), max(32, round(height / 32) * 32)


class QwenEditEditor:
    """Edits with one Qwen-Image-Edit release (`model_key`); the pipeline loads once, LoRAs load once each."""

    name = "qwen_edit"

    def __init__(self, model: str = "tiny", quantization: QuantizationSetting = "auto", device: str = "auto",
                 dtype: str = "auto", loras: Mapping[str, str] | None = None, output_area: int = 1024 * 1024,
                 default_steps: int = 40, default_true_cfg: float = 4.0, negative_prompt: str = " ",
                 model_key: str = DEFAULT_EDIT_MODEL):
        if model_key not in QWEN_EDIT_MODELS:
            raise EditInputError(f"unknown editor model {model_key!r}; known: {', '.join(QWEN_EDIT_MODELS)}")
        self.model_key = model_key  # which release; `model` is where its weights come from
        self.model_source = model
        # Decided here, not at load: the params every output records name what actually ran.
        self.quantization = pick_quantization(quantization, pick_device(device))
        self.device = device
        self.dtype = dtype
        self.lora_sources = dict(DEFAULT_LORAS if loras is None else loras)
        self.output_area = output_area
        self.default_steps = default_steps
        self.default_true_cfg = default_true_cfg
        self.negative_prompt = negative_prompt
        self._resolved: ResolvedModel | None = None
        self._pipe: Any = None
        self._base_scheduler: dict | None = None
        self._loaded: dict[str, LoraFile] = {}

    # -- loading ------------------------------------------------------------------------------
    @property
    def resolved(self) -> ResolvedModel:
        if self._resolved is None:
            self._resolved = resolve_model(self.model_key, self.model_source)
        return self._resolved

    def model_id(self) -> str:
        return self.resolved.ref

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            self._pipe = load_pipeline(self.resolved, "QwenImageEditPlusPipeline", quantization=self.quantization,
                                       device=self.device, dtype=self.dtype)
            self._base_scheduler = dict(self._pipe.scheduler.config)
        return self._pipe

    def set_lora_source(self, name: str, source: str) -> None:
        """Register (or re-point) the LoRA `name` at `source` (a path, `tiny:<name>` or a hub file).

        A LoRA already loaded under `name` from another source, or from a file whose bytes have
        changed since (a re-materialized partition at the same path), is deleted from the pipeline
        so the next edit that stacks `name` loads the new file.
        """
        loaded = self._loaded.get(name)
        if loaded is not None:
            stale = self.lora_sources.get(name) != source
            if not stale:
                path = Path(source).expanduser()
                stale = path.is_file() and sha256_file(path) != loaded.sha256
            if stale:
                self.unload_lora(name)
        self.lora_sources[name] = source

    def unload_lora(self, name: str) -> None:
        """Delete the adapter `name` from the pipeline (no-op when it is not loaded)."""
        if self._loaded.pop(name, None) is not None and self._pipe is not None:
            self._pipe.delete_adapters([name])

    def _lora(self, name: str) -> LoraFile:
        if name not in self._loaded:
            if name not in self.lora_sources:
                raise EditInputError(f"unknown LoRA {name!r}; configured: {', '.join(sorted(self.lora_sources)) or 'none'}")
            info = resolve_lora(name, self.lora_sources[name], self.model_key)
            try:
                self.pipe.load_lora_weights(str(info.path), adapter_name=name)
            except Exception as exc:  # diffusers/peft raise several types for a LoRA that does not fit
                raise EditInputError(f"LoRA {info.path.name} does not fit {self.resolved.model_id}: {exc}") from exc
            if not any(name in names for names in self.pipe.get_list_adapters().values()):
                # diffusers only warns when no key matches; the adapter is then simply absent
                raise EditInputError(f"LoRA {info.path.name} does not fit {self.resolved.model_id}: none of its "
                                     f"{info.n_tensors} tensors match the model's modules (a LoRA for another model?)")
            self._loaded[name] = info
        return self._loaded[name]

    def _apply_stack(self, stack: Mapping[str, float]) -> list[dict]:
        """Activate exactly the LoRAs of `stack` with their weights; returns their lineage records."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe = self.pipe  # loads the pipeline (and records its own scheduler) on first use
        infos = [self._lora(name) for name in stack]
        if stack:
            pipe.set_adapters(list(stack), adapter_weights=[float(w) for w in stack.values()])
        elif self._loaded:
            pipe.disable_lora()
        lightning = lightning_steps(list(stack))
        config = {**self._base_scheduler, **LIGHTNING_SCHEDULER} if lightning else self._base_scheduler
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
        return [info.record(float(stack[info.name])) for info in infos]

    # -- editing ------------------------------------------------------------------------------
    def edit(self, images: Sequence[Image.Image], request: EditRequest,
             face_box: tuple[int, int, int, int] | None = None) -> EditResult:
        """Run one edit: `request.prompt` on 1-3 images, seeded, with the request's LoRA stack."""
        inputs = check_inputs(images)
        if not request.prompt:
            raise EditInputError(f"recipe entry {request.recipe_id!r}: qwen_edit needs a prompt")
        params = dict(request.params)
        stack = {str(k): float(v) for k, v in dict(params.get("loras", {})).items()}
        adapters = self._apply_stack(stack)
        lightning = lightning_steps(list(stack))
        steps = lightning or int(params.get("steps", self.default_steps))
        true_cfg = 1.0 if lightning else float(params.get("true_cfg", self.default_true_cfg))
        negative = params.get("negative_prompt", self.negative_prompt)
        width, height = output_size(inputs[0], int(params.get("output_area", self.output_area)))
        generator = torch.Generator("cpu").manual_seed(int(request.seed))
        image = self.pipe(image=inputs if len(inputs) > 1 else inputs[0], prompt=request.prompt,
                          negative_prompt=negative if true_cfg > 1 else None, true_cfg_scale=true_cfg,
                          num_inference_steps=steps, width=width, height=height, generator=generator).images[0]
        if stack == {} and self._loaded:
            self.pipe.enable_lora()
        return EditResult(image=image, operation="qwen_edit", model=self.model_id(), prompt=request.prompt,
                          seed=request.seed, adapters=adapters,
                          params={"steps": steps, "true_cfg": true_cfg, "negative_prompt": negative,
                                  "width": width, "height": height, "n_inputs": len(inputs),
                                  "scheduler": "lightning" if lightning else "default",
                                  "quantization": self.quantization, "model_key": self.model_key})
