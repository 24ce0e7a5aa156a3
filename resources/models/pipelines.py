"""Loading diffusers pipelines from resolved model folders: dtype, nf4, device placement."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch

from flen_resources.models.fp8_linear import fp8_matmuls, transformer_to_fp8
from flen_resources.models.quantization import (
    QuantizationError,
    QuantizationSettingWithFp8,
    nf4_needs_cuda,
    pick_quantization,
    pick_quantization_with_fp8,
)
from flen_resources.models.sources import ResolvedModel
from flen_resources.run_settings import Machine

log = logging.getLogger(__name__)

# The large components of each pipeline: what nf4 quantizes.
QUANTIZABLE = {"QwenImageEditPlusPipeline": ["transformer", "text_encoder"],
               "FluxPipeline": ["transformer", "text_encoder_2"]}


def pick_device(device: str = "auto") -> torch.device:
    """`auto`: the current CUDA GPU (the step's leased card) when there is one, else the CPU."""
    if device == "auto":
        # Indexed, not bare "cuda": offload hooks of diffusers take a bare "cuda" for card 0.
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """`auto`: bfloat16 on a GPU, float32 on the CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
            "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]


def nf4_config(pipeline: str, components: list[str] | None = None) -> Any:
    """A diffusers PipelineQuantizationConfig that loads the big components in bitsandbytes nf4."""
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(quant_backend="bitsandbytes_4bit", quant_kwargs=nf4_kwargs(),
                                      components_to_quantize=components or QUANTIZABLE[pipeline])


def nf4_kwargs(double_quant: bool = False) -> dict[str, Any]:
    """The one nf4 setting (bitsandbytes 4-bit NormalFloat, bf16 compute); double_quant: its absmax in 8 bits."""
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16,
            "bnb_4bit_use_double_quant": double_quant}


def load_nf4_components(model: ResolvedModel, pipeline: str, dtype: torch.dtype) -> dict[str, Any]:
    """Quantize the big components one at a time, each parked on the CPU before the next loads.

    bitsandbytes quantizes on the GPU; loading the whole pipeline at once would hold the nf4
    transformer and the nf4 text encoder on the card together (16.7 GiB for Qwen-Image-Edit),
    where the edit itself needs one of them at a time (12 GiB).
    """
    import json

    import diffusers
    import transformers

    index = json.loads((model.path / "model_index.json").read_text())
    components: dict[str, Any] = {}
    for name in QUANTIZABLE[pipeline]:
        library, class_name = index[name]
        if library == "diffusers":
            cls, config = getattr(diffusers, class_name), diffusers.BitsAndBytesConfig(**nf4_kwargs())
        else:
            cls, config = getattr(transformers, class_name), transformers.BitsAndBytesConfig(**nf4_kwargs())
        component = cls.from_pretrained(str(model.path / name), quantization_config=config, dtype=dtype,
                                        use_safetensors=True)
        component.to("cpu")
        torch.cuda.empty_cache()
        components[name] = component
    return components


def load_pipeline(model: ResolvedModel, pipeline: str, *, quantization: QuantizationSettingWithFp8 = "auto",
                  device: str = "auto",
                  dtype: str = "auto",
                  offload: Literal["auto", "none", "model", "sequential", "manual"] = "auto") -> Any:
    """`<pipeline>.from_pretrained` on a checked folder: safetensors only, no remote code.

    On a GPU, `offload=auto` keeps one large component on the card at a time (diffusers' model CPU
    offload: text encoder, then transformer, then VAE), which is what lets a 24 GB card run
    a 20B transformer next to a 7B text encoder. `manual` leaves every component on the CPU for the
    caller to place (models.residency). `fp8` (FluxPipeline, decided by the caller): the transformer's blocks in
    e4m3 with fp8 matmuls (models.fp8_linear), loaded in bf16 on the CPU and quantized on the device.
    """
    target = pick_device(device)
    if quantization == "fp8":  # refused where the device has no fp8 matmuls
        quantization = pick_quantization_with_fp8("fp8", target, 0, 0, fp8_matmuls(target))
    else:
        quantization = pick_quantization(quantization, target)
    if quantization == "nf4" and target.type != "cuda":  # said before diffusers is even imported
        raise QuantizationError(nf4_needs_cuda(target))
    import diffusers

    if pipeline == "QwenImageEditPlusPipeline":
        from flen_resources.models.architectures import patch_qwen2vl_processor_without_torchvision

        patch_qwen2vl_processor_without_torchvision()
    torch_dtype = pick_dtype(target, dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True}
    mode = ("model" if target.type == "cuda" else "none") if offload == "auto" else offload
    if quantization == "nf4":
        if mode == "none":
            kwargs["quantization_config"] = nf4_config(pipeline)
        else:  # offloading anyway: never hold two quantized components on the GPU, not even while loading
            kwargs.update(load_nf4_components(model, pipeline, torch_dtype))
    cls = getattr(diffusers, pipeline)
    pipe = cls.from_pretrained(str(model.path), **kwargs)
    if quantization == "fp8":  # one block at a time on the device, so it never holds the bf16 transformer
        transformer_to_fp8(pipe.transformer, target, torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    if mode == "model":
        pipe.enable_model_cpu_offload(device=target)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=target)
    elif mode == "manual":
        pass  # from_pretrained and load_nf4_components leave everything on the CPU
    else:
        pipe.to(target)
    log.info("loaded %s from %s (%s, %s, %s, offload=%s)", pipeline, model.ref, target, torch_dtype, quantization, mode)
    return pipe


def probe_machine(device: str, models: Sequence[str]) -> Machine:
    """The device `device` resolves to (its name and memory when a CUDA GPU), and whether all `models` are tiny."""
    dev = pick_device(device)
    tiny = all(model == "tiny" for model in models)
    if dev.type != "cuda":
        return Machine("cpu", tiny_models=tiny)
    props = torch.cuda.get_device_properties(dev)
    return Machine("cuda", props.total_memory / 2**30, props.name, tiny)
