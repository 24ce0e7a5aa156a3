"""FLUX.1-dev generation with a character LoRA (diffusers or ComfyUI/kohya keys) at a weight.

A grid of prompts x seeds runs phase by phase: the text encoders over every prompt not encoded before
(their embeddings are kept, so evaluating six checkpoints on the same prompts encodes them once), then
the transformer and the VAE over every image. Components stay on the card while the memory budget
allows (models/residency.py) instead of diffusers' model CPU offload, which moved the 9 GiB T5 and
the transformer on and off the card for every image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from flen_resources.models.fp8_linear import compile_blocks, compiles_blocks, fp8_matmuls
from flen_resources.models.loras import LoraError, LoraFile, resolve_lora
from flen_resources.models.pipelines import load_pipeline, pick_device
from flen_resources.models.quantization import (
    FP8_GENERATION_RESERVE_GIB,
    QuantizationSettingWithFp8,
    host_memory_gib,
    pick_quantization_with_fp8,
)
from flen_resources.models.registry import MODELS
from flen_resources.models.residency import DEFAULT_MEMORY_BUDGET_GIB, Residency
from flen_resources.models.sources import ResolvedModel, resolve_model

MODEL_KEY = "flux.1-dev"
ADAPTER = "character"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # CLIP (pooled) and T5 (per token)
# The pipeline's other components, in bf16 on the CPU beside the transformer while it quantizes to fp8 (the
# trainers free their encoders first): T5-XXL 8.9 GiB, CLIP 0.2, the VAE 0.2.
HOST_OTHER_COMPONENTS_GIB = 9.5


@dataclass
class Generated:
    """One generated image with what lineage records about it."""

    image: Image.Image
    prompt: str
    seed: int
    params: dict[str, Any]
    model: str
    adapters: list[dict[str, Any]] = field(default_factory=list)


class FluxGenerator:
    """FluxPipeline loaded once; the character LoRA is swapped in when it changes."""

    def __init__(self, model: str = "tiny", quantization: QuantizationSettingWithFp8 = "auto", device: str = "auto",
                 dtype: str = "auto", memory_budget_gib: float = DEFAULT_MEMORY_BUDGET_GIB, compile: bool = True):
        self.model_source = model
        # Decided here, not at load: the params every output records name what actually ran. `auto`: fp8 on a
        # card with fp8 matmuls when FLUX fits the budget in fp8 (faster than nf4's dequantizing matmuls).
        target = pick_device(device)
        self.quantization = pick_quantization_with_fp8(quantization, target, MODELS[MODEL_KEY].transformer_params,
                                                       memory_budget_gib, fp8_matmuls(target),
                                                       FP8_GENERATION_RESERVE_GIB,
                                                       host_gib=host_memory_gib() - HOST_OTHER_COMPONENTS_GIB)
        self.device = device
        self.dtype = dtype
        self.memory_budget_gib = memory_budget_gib
        # torch.compile each transformer block on a GPU (the CPU runs eager): an fp8 base's activation
        # quantization then fuses into the op before it instead of running as kernels of its own.
        self.compile = compile
        self._resolved: ResolvedModel | None = None
        self._pipe: Any = None
        self._residency: Residency | None = None
        self._lora: LoraFile | None = None
        self._lora_weight = 0.0
        # (prompt, max_sequence_length, the LoRA when it reaches a text encoder) -> (T5 embeddings, CLIP pooled)
        self._texts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def resolved(self) -> ResolvedModel:
        if self._resolved is None:
            self._resolved = resolve_model(MODEL_KEY, self.model_source)
        return self._resolved

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            # on the CPU (an fp8 transformer on the card already): the residency places each component
            self._pipe = load_pipeline(self.resolved, "FluxPipeline", quantization=self.quantization,
                                       device=self.device, dtype=self.dtype, offload="manual")
            components = {n: getattr(self._pipe, n) for n in (*TEXT_ENCODERS, "transformer", "vae")}
            self._residency = Residency(components, pick_device(self.device), self.memory_budget_gib)
            if self.compiles:
                compile_blocks(self._pipe.transformer)
        return self._pipe

    @property
    def compiles(self) -> bool:
        """Whether the transformer's blocks run compiled: asked for, on a GPU, where torch.compile works."""
        return compiles_blocks(self.compile, pick_device(self.device))

    @property
    def residency(self) -> Residency:
        """Where the pipeline's components are (loads the pipeline on first use)."""
        _ = self.pipe
        return self._residency

    def model_id(self) -> str:
        return self.resolved.ref

    def _use_lora(self, lora: str | Path | None, weight: float) -> list[dict]:
        """Load (or swap) the character LoRA and set its weight; None runs the base model."""
        pipe = self.pipe
        if lora is None:
            if self._lora is not None:
                pipe.unload_lora_weights()
                self._lora = None
            return []
        info = resolve_lora(ADAPTER, str(lora), MODEL_KEY)
        if self._lora is None or self._lora.sha256 != info.sha256:
            if self._lora is not None:
                pipe.unload_lora_weights()
                self._lora = None
            try:
                pipe.load_lora_weights(str(info.path), adapter_name=ADAPTER)
            except Exception as exc:  # diffusers raises several types for keys that do not fit
                raise LoraError(f"LoRA {info.path.name} does not fit FLUX.1-dev: {exc}") from exc
            if not any(ADAPTER in names for names in pipe.get_list_adapters().values()):
                # diffusers only warns when no key matches; the adapter is then simply absent
                raise LoraError(f"LoRA {info.path.name} does not fit FLUX.1-dev: none of its {info.n_tensors} "
                                "tensors match the model's modules (a LoRA for another model?)")
            self._lora = info
        pipe.set_adapters([ADAPTER], adapter_weights=[float(weight)])
        self._lora_weight = float(weight)
        return [info.record(float(weight))]

    def _encoded(self, prompt: str, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5 embeddings, CLIP pooled) of `prompt`, as the pipeline encodes it; computed once per prompt and LoRA."""
        pipe = self.pipe
        # Our LoRAs touch only the transformer; one that reaches a text encoder (a kohya file can) changes the
        # embeddings, so they are kept per LoRA file and weight.
        text_lora = self._lora is not None and any(
            ADAPTER in names for component, names in pipe.get_list_adapters().items() if component in TEXT_ENCODERS)
        key = (prompt, max_sequence_length, (self._lora.sha256, self._lora_weight) if text_lora else None)
        if key not in self._texts:
            self.residency.use(*TEXT_ENCODERS)
            with torch.no_grad():
                embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=self.residency.device,
                                                       max_sequence_length=max_sequence_length)
            self._texts[key] = embeds, pooled
        return self._texts[key]

    def generate(self, prompt: str, seeds: list[int], *, lora: str | Path | None = None, lora_weight: float = 1.0,
                 width: int = 1024, height: int = 1024, steps: int = 28, guidance: float = 3.5,
                 max_sequence_length: int = 512) -> list[Generated]:
        """One image per seed for `prompt`, with the LoRA at `lora_weight`."""
        return self.generate_grid([prompt], seeds, lora=lora, lora_weight=lora_weight, width=width, height=height,
                                  steps=steps, guidance=guidance, max_sequence_length=max_sequence_length)

    def generate_grid(self, prompts: list[str], seeds: list[int], *, lora: str | Path | None = None,
                      lora_weight: float = 1.0, width: int = 1024, height: int = 1024, steps: int = 28,
                      guidance: float = 3.5, max_sequence_length: int = 512) -> list[Generated]:
        """One image per prompt and seed (prompt by prompt), the text encoders first, then the transformer."""
        if not prompts or not all(prompts):
            raise ValueError("a prompt is required")
        if width % 16 or height % 16:
            raise ValueError(f"width and height must be multiples of 16, got {width}x{height}")
        adapters = self._use_lora(lora, lora_weight)
        params = {"width": width, "height": height, "steps": steps, "guidance": guidance,
                  "quantization": self.quantization}
        texts = [self._encoded(prompt, max_sequence_length) for prompt in prompts]
        # The VAE decodes inside the call; without offload hooks the pipeline runs on the device of its first
        # module that is not on the CPU (diffusers' DiffusionPipeline.device): the card, once these are there.
        self.residency.use("transformer", "vae")
        out = []
        for prompt, (embeds, pooled) in zip(prompts, texts, strict=True):
            for seed in seeds:
                generator = torch.Generator("cpu").manual_seed(int(seed))
                image = self.pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, width=width, height=height,
                                  num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                                  max_sequence_length=max_sequence_length).images[0]
                out.append(Generated(image, prompt, int(seed), params, self.model_id(), adapters))
        return out
