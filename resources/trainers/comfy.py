"""Export a diffusers-format FLUX LoRA with ComfyUI/kohya keys (BFL module names, fused qkv).

ComfyUI (and kohya's sd-scripts) name FLUX modules as Black Forest Labs does: one fused `qkv`
projection per attention, `linear1` = q, k, v and the MLP input of a single block. A fused LoRA
has the components' down matrices stacked and their up matrices block-diagonal; modules the
LoRA does not target get zero blocks, so diffusers' kohya converter splits it back exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flen_resources.trainers.lora_files import save_lora_file

# BFL module -> the diffusers modules it fuses, in order.
DOUBLE = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"],
    "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"],
    "img_mlp_2": ["ff.net.2"],
    "txt_mlp_0": ["ff_context.net.0.proj"],
    "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"],
    "txt_mod_lin": ["norm1_context.linear"],
}
SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation_lin": ["norm.linear"],
}


def _out_dims(config: Any, bfl: str) -> list[int]:
    """Output sizes of the diffusers modules a BFL module fuses (their up matrices' rows)."""
    inner = config.num_attention_heads * config.attention_head_dim
    if bfl == "linear1":
        return [inner, inner, inner, inner * 4]
    return [inner] * len(SINGLE.get(bfl, DOUBLE.get(bfl, [])))


def export_flux_comfyui(state: dict[str, torch.Tensor], config: Any, alpha: float, path: Path,
                        metadata: dict[str, str]) -> Path:
    """Write `state` (keys `transformer.<module>.lora_A/B.weight`) as a kohya/ComfyUI LoRA; `config`: the transformer's."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        modules.setdefault(module, {})[kind.split(".")[0]] = value.detach().cpu()  # zero blocks are made on the CPU
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for prefix, table, count in (("transformer_blocks", DOUBLE, config.num_layers),
                                 ("single_transformer_blocks", SINGLE, config.num_single_layers)):
        kohya_prefix = "double_blocks" if prefix == "transformer_blocks" else "single_blocks"
        for i in range(count):
            for bfl, parts in table.items():
                names = [f"{prefix}.{i}.{p}" for p in parts]
                present = [n for n in names if n in modules]
                if not present:
                    continue
                used.update(present)
                rank = modules[present[0]]["A"].shape[0]
                in_features = modules[present[0]]["A"].shape[1]
                dims = _out_dims(config, bfl) if len(parts) > 1 else [modules[present[0]]["B"].shape[0]]
                downs, ups = [], []
                for name, dim in zip(names, dims):
                    if name in modules:
                        downs.append(modules[name]["A"].float())
                        ups.append(modules[name]["B"].float())
                    else:  # not targeted: a zero block keeps the fused layout splittable
                        downs.append(torch.zeros(rank, in_features))
                        ups.append(torch.zeros(dim, rank))
                key = f"lora_unet_{kohya_prefix}_{i}_{bfl}"
                out[f"{key}.lora_down.weight"] = torch.cat(downs, dim=0).to(torch.bfloat16)
                out[f"{key}.lora_up.weight"] = torch.block_diag(*ups).to(torch.bfloat16)
                # kohya scales by alpha / fused rank: keep each part's alpha / rank.
                out[f"{key}.alpha"] = torch.tensor(float(alpha) * len(parts))
    unmapped = sorted(set(modules) - used)
    if unmapped:
        raise ValueError(f"cannot export to ComfyUI keys: no BFL name for {unmapped[:3]}")
    return save_lora_file(path, out, metadata)


def export_qwen_comfyui(state: dict[str, torch.Tensor], alpha: float, path: Path, metadata: dict[str, str]) -> Path:
    """Write a diffusers-format Qwen-Image(-Edit) LoRA with ComfyUI keys.

    ComfyUI's Qwen-Image model keeps diffusers' module names, so only the prefix changes
    (`transformer.` -> `diffusion_model.`); each module gets an `.alpha` so the strength matches
    diffusers' alpha / rank scaling whatever the rank.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.removeprefix("transformer.").rpartition(".lora_")
        out[f"diffusion_model.{module}.lora_{kind}"] = value.to(torch.bfloat16)
        if kind.startswith("A"):
            out[f"diffusion_model.{module}.alpha"] = torch.tensor(float(alpha))
    return save_lora_file(path, out, metadata)
