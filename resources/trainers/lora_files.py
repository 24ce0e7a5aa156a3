"""A finished run's files: the LoRA with diffusers keys, its ComfyUI-key twin, the loss curve.

Every LoRA file goes through `save_lora_file`, the canonical writer: the same LoRA always gives the
same bytes, so a rerun of an unchanged partition keeps its DVC md5. Change its output and every
published LoRA's hash changes with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from flen_resources.atomic import write_bytes_atomic
from flen_resources.trainers.config import TRAINER_VERSION, LoraTrainConfig

# export_comfyui(state, path, metadata) -> path: the model's own ComfyUI key mapping (trainers/comfy.py)
ComfyExport = Callable[[dict[str, torch.Tensor], Path, dict[str, str]], Path]


@dataclass
class LoraFiles:
    """The paths write_outputs wrote, and the diffusers file's metadata."""

    lora: Path
    comfyui: Path
    loss_curve: Path
    metadata: dict[str, str]


def write_outputs(transformer: Any, losses: list[tuple[int, float]], base_ref: str, config: LoraTrainConfig,
                  dataset_md5: str, out: Path, name: str, title: str, export_comfyui: ComfyExport) -> LoraFiles:
    """out/<name>.safetensors (diffusers keys), out/<name>_comfyui.safetensors and out/loss_curve.png."""
    lora_path, comfy_path, metadata = write_lora_pair(transformer, base_ref, config, dataset_md5, out / name,
                                                      export_comfyui)
    curve = save_loss_curve(losses, out / "loss_curve.png", f"{name}: {title} r{config.rank}")
    return LoraFiles(lora=lora_path, comfyui=comfy_path, loss_curve=curve, metadata=metadata)


def write_lora_pair(transformer: Any, base_ref: str, config: LoraTrainConfig, dataset_md5: str, stem: Path,
                    export_comfyui: ComfyExport, step: int | None = None) -> tuple[Path, Path, dict[str, str]]:
    """<stem>.safetensors (diffusers keys) and <stem>_comfyui.safetensors of the LoRA as it stands (after `step`)."""
    extra = {"flenwheel.step": str(step)} if step is not None else None
    state, metadata = final_lora(transformer, base_ref, config, dataset_md5, extra)
    lora_path = save_lora_file(stem.with_name(f"{stem.name}.safetensors"), state, metadata)
    # ComfyUI reads no adapter config: its file carries alphas instead (comfy.py)
    comfy_meta = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
    comfy_path = export_comfyui(state, stem.with_name(f"{stem.name}_comfyui.safetensors"),
                                {**comfy_meta, "flenwheel.key_style": "comfyui"})
    return lora_path, comfy_path, metadata


def snapshot_stem(folder: Path, step: int) -> Path:
    """Where the LoRA snapshot of `step` goes: folder/step-NNNNNN(.safetensors, _comfyui.safetensors)."""
    return folder / f"step-{step:06d}"


def list_snapshots(folder: Path, max_steps: int) -> list[tuple[int, Path]]:
    """(step, diffusers file) of the snapshots in `folder` up to max_steps, by step."""
    found = []
    for path in folder.glob("step-*.safetensors"):
        digits = path.name.removeprefix("step-").removesuffix(".safetensors")
        if digits.isdigit() and int(digits) <= max_steps:
            found.append((int(digits), path))
    return sorted(found)


def final_lora(transformer: Any, base_ref: str, config: LoraTrainConfig, dataset_md5: str,
               extra: dict[str, str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The trained LoRA as diffusers keys (`transformer.<module>.lora_A/B.weight`) and its file metadata."""
    from peft.utils import get_peft_model_state_dict

    state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}
    metadata = {
        "format": "pt",
        # diffusers reads the LoRA's config (rank, alpha, targets) from here, keys prefixed by component.
        "lora_adapter_metadata": json.dumps({f"transformer.{k}": (sorted(v) if isinstance(v, set) else v)
                                             for k, v in transformer.peft_config["default"].to_dict().items()},
                                            default=str, sort_keys=True),
        "flenwheel.base_model": base_ref,
        "flenwheel.dataset_md5": dataset_md5,
        "flenwheel.config": config.to_json(),
        "flenwheel.step": str(config.max_steps),
        "flenwheel.trainer_version": TRAINER_VERSION,
        "flenwheel.key_style": "diffusers",
        **(extra or {}),
    }
    return state, metadata


def save_lora_file(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """The canonical LoRA writer: safetensors with metadata, header sorted, written atomically."""
    data = safetensors.torch.save({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)
    return write_bytes_atomic(path, canonical_safetensors(data))


def canonical_safetensors(data: bytes) -> bytes:
    """The same file with its JSON header's keys sorted.

    safetensors writes the header from a hash map, so its key order (metadata and tensor entries)
    changes from one process to the next; sorted, the same LoRA gives the same bytes, and a rerun
    of an unchanged partition the same DVC md5. Offsets are untouched: only the header's order
    changes, and it keeps its length (padded with spaces, as safetensors pads it).
    """
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # cannot happen for a header safetensors wrote compactly; keep the original then
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size:]


def save_loss_curve(losses: list[tuple[int, float]], path: Path, title: str) -> Path:
    """A PNG of the loss per step with a moving average."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker: render to a file only
    import matplotlib.pyplot as plt

    steps = [s for s, _ in losses]
    values = [v for _, v in losses]
    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
              for i in range(len(values))]
    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=110)
    ax.plot(steps, values, color="#9bb7d4", linewidth=0.8, label="loss")
    ax.plot(steps, smooth, color="#1f4e79", linewidth=1.8, label=f"moving average ({window})")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching MSE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
