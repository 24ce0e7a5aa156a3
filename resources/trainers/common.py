"""What both LoRA trainers share: config, buckets, timesteps, optimizer, checkpoints, plots.

Exact resume rests on one rule: every random draw of step N (noise, timesteps) comes from a
generator seeded by (seed, N), and the data order of epoch E from (seed, E). A checkpoint then
only needs the LoRA weights, the optimizer and LR-scheduler states and the step; all of it is
stored as safetensors + JSON (no pickles), written to a temp folder and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

TRAINER_VERSION = "1"


class TrainingError(ValueError):
    """Training cannot start or go on; the message says why."""


@dataclass
class LoraTrainConfig:
    """Every knob of a LoRA run. Defaults suit a character LoRA on a 24 GB card."""

    rank: int = 16
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                               "add_k_proj", "add_v_proj", "to_add_out"])
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 50
    max_steps: int = 1500
    batch_size: int = 1
    gradient_accumulation: int = 1
    resolution: int = 1024  # bucket area = resolution^2
    seed: int = 0
    quantization: Literal["none", "nf4"] = "nf4"
    gradient_checkpointing: bool = True
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"  # adamw8bit needs CUDA (bitsandbytes)
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    logit_mean: float = 0.0  # logit-normal timestep sampling
    logit_std: float = 1.0
    guidance: float = 1.0  # FLUX.1-dev's distilled guidance embedding during training
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    sample_every: int = 250  # 0: no previews
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=lambda: [1, 2])
    sample_steps: int = 20
    sample_size: int = 512
    min_images: int = 4
    device: str = "auto"
    compile: bool = False  # torch.compile the transformer blocks (GPU)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def step_generator(seed: int, step: int, salt: str = "") -> torch.Generator:
    """The generator for the random draws of one step: a pure function of (seed, step)."""
    digest = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=step_generator(seed, epoch, "order")).tolist()


def logit_normal_sigmas(batch: int, generator: torch.Generator, mean: float, std: float) -> torch.Tensor:
    """Flow-matching noise levels in (0, 1) from the logit-normal density (SD3, FLUX trainers)."""
    return torch.sigmoid(torch.normal(mean=mean, std=std, size=(batch,), generator=generator))


def buckets(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution^2 pixels at common aspect ratios, multiples of `step`."""
    out = set()
    for ratio in (1.0, 4 / 5, 5 / 4, 3 / 4, 4 / 3, 2 / 3, 3 / 2, 9 / 16, 16 / 9):
        w = max(step, round(resolution * math.sqrt(ratio) / step) * step)
        h = max(step, round(resolution / math.sqrt(ratio) / step) * step)
        out.add((w, h))
    return sorted(out)


def nearest_bucket(width: int, height: int, options: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's."""
    ratio = math.log(width / height)
    return min(options, key=lambda wh: abs(math.log(wh[0] / wh[1]) - ratio))


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_optimizer(params: list[torch.nn.Parameter], config: LoraTrainConfig, device: torch.device):
    """8-bit AdamW (bitsandbytes) on a GPU, torch AdamW otherwise."""
    if config.optimizer == "adamw8bit" and device.type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def make_lr_scheduler(optimizer, config: LoraTrainConfig):
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_steps)


# -- checkpoints ------------------------------------------------------------------------------
def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors for safetensors, the rest as JSON-able data)."""
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for idx, entries in state["state"].items():
        meta["state"][str(idx)] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
                meta["state"][str(idx)][key] = {"tensor": f"{idx}.{key}", "device_scalar": value.dim() == 0}
            else:
                meta["state"][str(idx)][key] = {"value": value}
    return tensors, meta


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, entries in meta["state"].items():
        state[int(idx)] = {k: (tensors[v["tensor"]] if "tensor" in v else v["value"]) for k, v in entries.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, step: int, lora_state: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    extra: dict[str, Any], keep: int) -> Path:
    """checkpoints/step-NNNNNN/ written atomically; older ones beyond `keep` are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-{step:06d}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in lora_state.items()}, str(tmp / "lora.safetensors"))
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({
        "step": step, "optimizer": opt_meta, "lr_scheduler": lr_scheduler.state_dict(), **extra,
    }, default=str))
    for file in tmp.iterdir():
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint (half-written ones are temp folders, never matched)."""
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, optimizer, lr_scheduler, device: torch.device) -> tuple[int, dict[str, torch.Tensor], dict]:
    """Restore optimizer and scheduler; returns (step, LoRA state dict, the state.json content)."""
    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "optimizer.safetensors"))
    opt_state = _join_optimizer_state(tensors, state["optimizer"])
    optimizer.load_state_dict(opt_state)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    lora = load_file(str(path / "lora.safetensors"), device=str(device))
    return int(state["step"]), lora, state


def save_loss_curve(losses: list[tuple[int, float]], path: Path, title: str) -> Path:
    """A PNG of the loss per step with a moving average."""
    import matplotlib

    matplotlib.use("Agg")
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


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_lora_file(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """The final LoRA file: safetensors with metadata, written to a temp name and renamed."""
    from safetensors.torch import save as save_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, save_bytes({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata))
    return path
