"""The `qwen_edit` editor: QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 or -2511) with a LoRA stack.

A request's params choose steps, true_cfg, the negative prompt and the LoRA stack, e.g.
`{"loras": {"angles": 1.0, "lightning-8step": 1.0}}`. With a Lightning LoRA in the stack the
scheduler switches to Lightning's settings, true_cfg to 1 and steps to 4 or 8, as it was distilled.

A batch of edits (`edit_batch`) runs phase by phase (qwen_phases.py): the text encoder over every
edit, then the transformer over every edit, then the VAE over every output, each component moved
onto the card once and kept there while `memory_budget_gib` allows (models/residency.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from flen_resources.editors import qwen_phases
from flen_resources.editors.base import EditJob, EditRequest, EditResult, Progress
from flen_resources.imaging import sha256_file
from flen_resources.models.loras import LoraFile, resolve_lora
from flen_resources.models.pipelines import load_pipeline, pick_device
from flen_resources.models.quantization import QuantizationSetting, pick_quantization
from flen_resources.models.registry import DEFAULT_EDIT_MODEL, QWEN_EDIT_MODELS, lightning_steps
from flen_resources.models.residency import DEFAULT_MEMORY_BUDGET_GIB, Residency
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


@dataclass
class _Plan:
    """One edit's settings, decided from its request before any phase runs."""

    inputs: list[Image.Image]
    request: EditRequest
    stack: dict[str, float]
    steps: int
    true_cfg: float
    negative: str
    width: int
    height: int
    scheduler: str
    reference_area: int | None  # pixels each input image is VAE-encoded at; None: the pipeline's own


class QwenEditEditor:
    """Edits with one Qwen-Image-Edit release (`model_key`); the pipeline loads once, LoRAs load once each."""

    name = "qwen_edit"

    def __init__(self, model: str = "tiny", quantization: QuantizationSetting = "auto", device: str = "auto",
                 dtype: str = "auto", loras: Mapping[str, str] | None = None, output_area: int = 1024 * 1024,
                 default_steps: int = 40, default_true_cfg: float = 4.0, negative_prompt: str = " ",
                 model_key: str = DEFAULT_EDIT_MODEL, memory_budget_gib: float = DEFAULT_MEMORY_BUDGET_GIB,
                 references_at_output_area: bool = False):
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
        # False: input images are VAE-encoded at the pipeline's own 1024x1024, as the releases were trained.
        # The tiny pack sets True (at each edit's output area): random weights only exercise the code path.
        self.references_at_output_area = references_at_output_area
        self.default_steps = default_steps
        self.default_true_cfg = default_true_cfg
        self.negative_prompt = negative_prompt
        self.memory_budget_gib = memory_budget_gib
        self._residency: Residency | None = None
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
            # on the CPU: the residency places each component when a phase needs it
            self._pipe = load_pipeline(self.resolved, "QwenImageEditPlusPipeline", quantization=self.quantization,
                                       device=self.device, dtype=self.dtype, offload="manual")
            self._base_scheduler = dict(self._pipe.scheduler.config)
            components = {n: getattr(self._pipe, n) for n in ("text_encoder", "transformer", "vae")}
            self._residency = Residency(components, pick_device(self.device), self.memory_budget_gib)
        return self._pipe

    @property
    def residency(self) -> Residency:
        """Where the pipeline's components are (loads the pipeline on first use)."""
        _ = self.pipe
        return self._residency

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
        return self.edit_batch([EditJob(images, request, face_box)])[0]

    def _plan(self, job: EditJob) -> _Plan:
        """The settings of one edit (checked before anything runs)."""
        inputs = check_inputs(job.images)
        request = job.request
        if not request.prompt:
            raise EditInputError(f"recipe entry {request.recipe_id!r}: qwen_edit needs a prompt")
        params = dict(request.params)
        stack = {str(k): float(v) for k, v in dict(params.get("loras", {})).items()}
        lightning = lightning_steps(list(stack))
        steps = lightning or int(params.get("steps", self.default_steps))
        true_cfg = 1.0 if lightning else float(params.get("true_cfg", self.default_true_cfg))
        negative = params.get("negative_prompt", self.negative_prompt)
        area = int(params.get("output_area", self.output_area))
        width, height = output_size(inputs[0], area)
        return _Plan(inputs, request, stack, steps, true_cfg, negative, width, height,
                     "lightning" if lightning else "default", area if self.references_at_output_area else None)

    def edit_batch(self, jobs: Sequence[EditJob], progress: Progress | None = None) -> list[EditResult]:
        """Every job's edit, phase by phase: text encoder, transformer (grouped by LoRA stack), VAE.

        Each output is the one `edit` gives for the same request and seed: the phases are the
        pipeline's own steps, run in another order.
        """
        plans = [self._plan(job) for job in jobs]
        if not plans:
            return []
        pipe, place, device = self.pipe, self.residency, self.residency.device
        place.use("text_encoder")
        texts = [qwen_phases.encode_text(pipe, p.inputs, p.request.prompt, device) for p in plans]
        negatives = [qwen_phases.encode_text(pipe, p.inputs, p.negative, device) if p.true_cfg > 1 else None
                     for p in plans]
        place.use("transformer", "vae")  # the VAE encodes the input images inside the denoising call
        latents: list[Any] = [None] * len(plans)
        adapters: list[list[dict]] = [[] for _ in plans]
        groups: dict[tuple, list[int]] = {}  # one LoRA switch per stack, in the order stacks first appear
        for i, p in enumerate(plans):
            groups.setdefault(tuple(p.stack.items()), []).append(i)
        for stack, members in groups.items():
            records = self._apply_stack(dict(stack))
            for i in members:
                p = plans[i]
                generator = torch.Generator("cpu").manual_seed(int(p.request.seed))
                latents[i] = qwen_phases.denoise(pipe, p.inputs, texts[i], negatives[i], p.true_cfg, p.steps,
                                                 p.width, p.height, generator, p.reference_area)
                adapters[i] = [dict(r) for r in records]
                if progress is not None:  # the transformer's denoising is most of an edit's time
                    progress()
            if not stack and self._loaded:
                pipe.enable_lora()
        place.use("vae")
        images = [qwen_phases.decode(pipe, z, p.width, p.height) for z, p in zip(latents, plans, strict=True)]
        return [EditResult(image=image, operation="qwen_edit", model=self.model_id(), prompt=p.request.prompt,
                           seed=p.request.seed, adapters=records,
                           params={"steps": p.steps, "true_cfg": p.true_cfg, "negative_prompt": p.negative,
                                   "width": p.width, "height": p.height, "n_inputs": len(p.inputs),
                                   "scheduler": p.scheduler, "quantization": self.quantization,
                                   "model_key": self.model_key,
                                   **({"reference_area": p.reference_area} if p.reference_area else {})})
                for image, p, records in zip(images, plans, adapters, strict=True)]
