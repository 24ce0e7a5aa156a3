"""The embedded tiny model pack: both pipelines at tiny size plus LoRAs, built offline.

Built deterministically (fixed seeds, tokenizers trained on local text) and saved with
`save_pretrained`, so the demo and the tests load it through exactly the code path real models
take. Weights are random: images come out as noise, which the gates then reject.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file

from flen_resources.models.registry import QWEN_EDIT_MODELS
from flen_resources.models.sources import models_dir

PACK_VERSION = "2"  # 2: Qwen-Image-Edit-2511 and its Lightning LoRAs
# The tiny pack's random Lightning LoRAs, one per registered file (registry.LORAS), by seed.
LIGHTNING_SEEDS = {"lightning-8step": 2, "lightning-4step": 3, "lightning-8step-2511": 12, "lightning-4step-2511": 13}
QWEN_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def tiny_pack_dir() -> Path:
    """Folder of the current pack version."""
    return models_dir() / f"tiny-v{PACK_VERSION}"


def _qwen_lora(transformer: torch.nn.Module, style: str, rank: int, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A random LoRA for the tiny Qwen transformer, in one of the key styles found in the wild."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i, block in enumerate(transformer.transformer_blocks):
        for target in QWEN_LORA_TARGETS:
            linear = block.attn.get_submodule(target)
            down = torch.randn(rank, linear.in_features, generator=gen) * scale
            up = torch.randn(linear.out_features, rank, generator=gen) * scale
            name = f"transformer_blocks.{i}.attn.{target}"
            if style == "comfyui":  # ComfyUI / musubi: diffusion_model.<module>.lora_A/B
                tensors[f"diffusion_model.{name}.lora_A.weight"] = down
                tensors[f"diffusion_model.{name}.lora_B.weight"] = up
            else:  # lightx2v (Lightning): <module>.lora_down/up + alpha
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return {k: v.contiguous().to(torch.bfloat16) for k, v in tensors.items()}


def build_tiny_pack(dest: Path) -> Path:
    """Build every pipeline and LoRA of the pack into `dest` (which must not exist)."""
    from diffusers import FluxPipeline, QwenImageEditPlusPipeline

    from flen_resources.models.architectures import build_flux_components, build_qwen_edit_components

    dest.mkdir(parents=True)
    loras = dest / "loras"
    loras.mkdir()
    meta = {"format": "pt", "flenwheel": "tiny pack"}
    for model in QWEN_EDIT_MODELS:  # the same seeds: the releases differ in their config flags only
        qwen = build_qwen_edit_components("tiny", model=model)
        QwenImageEditPlusPipeline(**qwen).save_pretrained(dest / model, safe_serialization=True)
    save_file(_qwen_lora(qwen["transformer"], "comfyui", 4, 0.5, seed=1), loras / "angles.safetensors", metadata=meta)
    for name, seed in LIGHTNING_SEEDS.items():
        save_file(_qwen_lora(qwen["transformer"], "lightx2v", 4, 0.3, seed=seed), loras / f"{name}.safetensors",
                  metadata=meta)
    FluxPipeline(**build_flux_components("tiny")).save_pretrained(dest / "flux.1-dev", safe_serialization=True)
    (dest / "PACK_VERSION").write_text(PACK_VERSION + "\n")
    return dest


def ensure_tiny_pack(force: bool = False) -> Path:
    """The tiny pack's folder, built on first use (safe when several processes ask at once)."""
    target = tiny_pack_dir()
    if (target / "PACK_VERSION").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / ".tiny-pack.lock"), timeout=900):
        if (target / "PACK_VERSION").is_file() and not force:
            return target
        tmp = target.parent / f".tiny-build-{uuid.uuid4().hex[:8]}"
        try:
            build_tiny_pack(tmp)
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
