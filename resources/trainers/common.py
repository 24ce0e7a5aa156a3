"""What both LoRA trainers share: config, result, buckets, batches, timesteps, the LoRA transformer,
optimizer, the training loop with checkpoints and resume, the fixed-batch eval loss, LoRA files, plots.

A trainer only encodes its examples (phase 1) and writes its loss for one batch; the loop here
does the rest identically for FLUX and Qwen-Image-Edit.

Exact resume rests on one rule: every random draw of step N (noise, timesteps) comes from a
generator seeded by (seed, N), and the data order of epoch E from (seed, E). A checkpoint then
only needs the LoRA weights, the optimizer and LR-scheduler states and the step; all of it is
stored as safetensors + JSON (no pickles), written to a temp folder and renamed into place.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from flen_resources.models.pipelines import nf4_kwargs
from flen_resources.trainers.attention import training_attention, use_attention

TRAINER_VERSION = "1"


class TrainingError(ValueError):
    """Training cannot start or go on; the message says why."""


DEFAULT_CHECKPOINT_EVERY = 250


def checkpoint_interval(steps: int, every: int | None = None) -> int:
    """Steps between checkpoints: `every`, else 250 or a quarter of a shorter run, so a killed run always resumes."""
    chosen = every if every else min(DEFAULT_CHECKPOINT_EVERY, max(1, steps // 4))
    return max(1, min(chosen, steps))


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
    checkpoint_every: int = 250  # see checkpoint_interval() for the default a short run gets
    keep_checkpoints: int = 2
    sample_every: int = 250  # 0: no previews
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=lambda: [1, 2])
    sample_steps: int = 20
    sample_size: int = 512
    min_images: int = 4
    device: str = "auto"
    compile: bool = True  # torch.compile every transformer block (on a GPU only; the CPU runs eager)
    # Attention kernel on a GPU: cuDNN's (about 1.7x flash's forward + backward on Hopper, through
    # trainers/attention.py) or torch's flash SDPA; "auto": cuDNN on Hopper and newer, flash before.
    # The CPU runs torch's default either way.
    attention: Literal["auto", "cudnn", "flash"] = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ("auto", "cudnn", "flash"):
            raise TrainingError(f"attention must be 'auto', 'cudnn' or 'flash', not {self.attention!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass
class TrainResult:
    """What a finished run gives back (either trainer)."""

    lora_path: Path
    comfyui_path: Path
    loss_curve: Path
    samples: list[Path]
    losses: list[tuple[int, float]]
    steps: int
    resumed_from: int
    seconds: float
    peak_gib: float | None
    cache_hits: int
    cache_misses: int
    eval_loss_start: float = float("nan")  # loss on a fixed batch, noise and timesteps: comparable across steps
    eval_loss_end: float = float("nan")
    metadata: dict[str, str] = field(default_factory=dict)


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


def fit_image(path: Path, size: tuple[int, int]) -> Image.Image:
    """RGB, resized to cover the bucket (width, height) and centre-cropped to it."""
    with Image.open(path) as img:
        return ImageOps.fit(img.convert("RGB"), size, Image.LANCZOS)


def check_training_set(n_examples: int, files: list[Path], config: LoraTrainConfig, what: str = "image") -> None:
    """At least config.min_images examples, and every file present."""
    if n_examples < config.min_images:
        raise TrainingError(f"the training set has {n_examples} {what}(s); at least {config.min_images} are needed")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise TrainingError(f"training images missing: {', '.join(missing[:5])}")


def epoch_batches(groups: list[Hashable], config: LoraTrainConfig, epoch: int) -> list[list[int]]:
    """The batches of one epoch: shuffled, then grouped by `groups[i]` (same shapes within a batch).

    An incomplete group at the end of an epoch is dropped (it comes back in another epoch's order).
    """
    pending: dict[Hashable, list[int]] = {}
    out = []
    for idx in epoch_order(len(groups), config.seed, epoch):
        group = pending.setdefault(groups[idx], [])
        group.append(idx)
        if len(group) == config.batch_size:
            out.append(group[:])
            group.clear()
    return out


def batch_at(examples: list[dict], config: LoraTrainConfig, micro_step: int, group_key: str = "bucket") -> list[dict]:
    """The batch of one micro-step: a pure function of (seed, micro_step), so a resumed run sees the same data."""
    groups = [e[group_key] for e in examples]
    epoch, index = 0, micro_step
    while True:
        batches = epoch_batches(groups, config, epoch)
        if not batches:
            raise TrainingError(f"no bucket holds {config.batch_size} images; lower batch_size")
        if index < len(batches):
            return [examples[i] for i in batches[index]]
        index -= len(batches)
        epoch += 1


LossFn = Callable[[list[dict], torch.Generator], torch.Tensor]


def fixed_batch_loss(transformer, examples: list[dict], config: LoraTrainConfig, loss: LossFn) -> float:
    """Mean loss over the first few examples with fixed noise and timesteps (no gradient)."""
    transformer.eval()
    losses = []
    with torch.no_grad():
        for i, example in enumerate(examples[:8]):
            losses.append(loss([example], step_generator(config.seed, i, "eval")).item())
    transformer.train()
    return sum(losses) / len(losses)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def lora_transformer(model_cls, folder: Path, config: LoraTrainConfig, device: torch.device, dtype: torch.dtype):
    """The frozen transformer (nf4 on CUDA, or plain) with a fresh peft LoRA in fp32, ready to train."""
    from diffusers import BitsAndBytesConfig
    from peft import LoraConfig

    kwargs = {"dtype": dtype, "use_safetensors": True}
    if config.quantization == "nf4":
        if device.type != "cuda":
            raise TrainingError("nf4 (QLoRA) needs a CUDA GPU; use quantization 'none' on the CPU")
        kwargs["quantization_config"] = BitsAndBytesConfig(**nf4_kwargs())
        kwargs["device_map"] = {"": str(device)}  # quantized straight onto the GPU
    transformer = model_cls.from_pretrained(str(folder), **kwargs)
    if config.quantization != "nf4":
        transformer.to(device)
    transformer.requires_grad_(False)
    torch.manual_seed(config.seed)  # the LoRA's initial weights
    transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                       target_modules=config.target_modules))
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # LoRA weights train in fp32 whatever the base dtype
    use_attention(transformer, config.attention, device)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if config.compile and device.type == "cuda":
        for block in [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]:
            block.compile()
    transformer.train()
    return transformer


@dataclass
class LoopResult:
    resumed_from: int
    losses: list[tuple[int, float]]
    eval_loss_start: float
    eval_loss_end: float
    samples: list[Path]


def run_training_loop(transformer, examples: list[dict], config: LoraTrainConfig, work_dir: Path, name: str,
                      device: torch.device, loss: LossFn, log: Callable[[str], None], group_key: str = "bucket",
                      previews: Callable[[int], list[Path]] | None = None) -> LoopResult:
    """Train (or resume from work_dir/checkpoints) to config.max_steps, with training's attention
    kernel (see `_training_loop`)."""
    with training_attention(config.attention, device):
        return _training_loop(transformer, examples, config, work_dir, name, device, loss, log, group_key, previews)


def _training_loop(transformer, examples: list[dict], config: LoraTrainConfig, work_dir: Path, name: str,
                   device: torch.device, loss: LossFn, log: Callable[[str], None], group_key: str = "bucket",
                   previews: Callable[[int], list[Path]] | None = None) -> LoopResult:
    """Train (or resume from work_dir/checkpoints) to config.max_steps.

    Per step: config.gradient_accumulation micro-batches from `batch_at`, gradients clipped to
    config.max_grad_norm, one optimizer and LR-scheduler step; checkpoints every
    config.checkpoint_every steps and at the end; `previews(step)` every config.sample_every steps.
    The fixed-batch eval loss is measured before the first step (fresh runs only) and after the last.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, config, device)
    lr_scheduler = make_lr_scheduler(optimizer, config)

    start, losses, eval_start = 0, [], float("nan")
    checkpoint = latest_checkpoint(work_dir / "checkpoints")
    if checkpoint is not None:
        start, lora_state, state = load_checkpoint(checkpoint, optimizer, lr_scheduler, device)
        set_peft_model_state_dict(transformer, lora_state)
        losses = [tuple(x) for x in state.get("losses", [])]
        eval_start = float(state.get("eval_loss_start", "nan"))  # a resumed run reports the fresh run's figure
        if state.get("config") != json.loads(config.to_json()):
            log("warning: resuming with a different config than the checkpoint's")
        log(f"resumed from {checkpoint.name}")

    def eval_loss() -> float:
        return fixed_batch_loss(transformer, examples, config, loss)

    if start == 0:
        eval_start = eval_loss()
    samples: list[Path] = []
    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, desc=f"train {name}",
               unit="step")
    for step in bar:
        generator = step_generator(config.seed, step)
        total = 0.0
        for accum in range(config.gradient_accumulation):
            batch = batch_at(examples, config, step * config.gradient_accumulation + accum, group_key)
            value = loss(batch, generator) / config.gradient_accumulation
            value.backward()
            total += value.item()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append((step + 1, total))
        bar.set_postfix(loss=f"{total:.4f}")
        done = step + 1
        if done % 10 == 0 or done == config.max_steps:
            log(f"step {done}/{config.max_steps} loss {total:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
        if previews is not None and config.sample_every and done % config.sample_every == 0:
            samples += previews(done)
        if done % config.checkpoint_every == 0 or done == config.max_steps:
            save_checkpoint(work_dir / "checkpoints", done, get_peft_model_state_dict(transformer),
                            optimizer, lr_scheduler, {"losses": losses, "config": json.loads(config.to_json()),
                                                      "eval_loss_start": eval_start},
                            config.keep_checkpoints)

    eval_end = eval_loss()
    log(f"fixed-batch loss {eval_start:.4f} -> {eval_end:.4f}")
    return LoopResult(resumed_from=start, losses=losses, eval_loss_start=eval_start, eval_loss_end=eval_end,
                      samples=samples)


def final_lora(transformer, base_ref: str, config: LoraTrainConfig, dataset_md5: str,
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


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


# -- checkpoints ------------------------------------------------------------------------------
def _split_value(name: str, value: Any, tensors: dict[str, torch.Tensor]) -> dict:
    """One optimizer-state value -> its JSON entry; tensors go to `tensors` under `name`.

    Nested dicts are kept (bitsandbytes' 8-bit optimizers wrap their quantization state in one).
    """
    if torch.is_tensor(value):
        tensors[name] = value.detach().contiguous().cpu()
        return {"tensor": name, "device_scalar": value.dim() == 0}
    if isinstance(value, dict):
        return {"dict": {str(k): _split_value(f"{name}.{k}", v, tensors) for k, v in value.items()}}
    json.dumps(value)  # anything else must survive JSON as it is (raises TypeError otherwise)
    return {"value": value}


def _join_value(entry: dict, tensors: dict[str, torch.Tensor]) -> Any:
    if "tensor" in entry:
        return tensors[entry["tensor"]]
    if "dict" in entry:
        return {k: _join_value(v, tensors) for k, v in entry["dict"].items()}
    return entry["value"]


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors for safetensors, the rest as JSON-able data)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = {"param_groups": state["param_groups"], "state": {}}
    for idx, entries in state["state"].items():
        meta["state"][str(idx)] = {key: _split_value(f"{idx}.{key}", value, tensors) for key, value in entries.items()}
    return tensors, meta


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {int(idx): {k: _join_value(v, tensors) for k, v in entries.items()}
             for idx, entries in meta["state"].items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(folder: Path, step: int, lora_state: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    extra: dict[str, Any], keep: int) -> Path:
    """checkpoints/step-NNNNNN/ written atomically; older ones beyond `keep` are removed."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # half-written by a run that was killed: never a checkpoint
        shutil.rmtree(stale, ignore_errors=True)
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


def write_outputs(transformer, run: LoopResult, base_ref: str, config: LoraTrainConfig, dataset_md5: str,
                  out: Path, name: str, title: str, export_comfyui: Callable[[dict, Path, dict], Path],
                  started: float, device: torch.device, cache) -> TrainResult:
    """A finished run's files, the same for both trainers: the diffusers-key LoRA, its ComfyUI-key
    export (`export_comfyui(state, path, metadata)`, the model's own key mapping), the loss curve."""
    state, metadata = final_lora(transformer, base_ref, config, dataset_md5)
    lora_path = save_lora_file(out / f"{name}.safetensors", state, metadata)
    comfy_meta = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
    comfy_path = export_comfyui(state, out / f"{name}_comfyui.safetensors",
                                {**comfy_meta, "flenwheel.key_style": "comfyui"})
    curve = save_loss_curve(run.losses, out / "loss_curve.png", f"{name}: {title} r{config.rank}")
    return TrainResult(lora_path=lora_path, comfyui_path=comfy_path, loss_curve=curve, samples=run.samples,
                       losses=run.losses, steps=config.max_steps, resumed_from=run.resumed_from,
                       seconds=time.time() - started, peak_gib=peak_gib(device), cache_hits=cache.hits,
                       cache_misses=cache.misses, eval_loss_start=run.eval_loss_start,
                       eval_loss_end=run.eval_loss_end, metadata=metadata)


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
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write leaves neither a partial file nor a stray temp
        raise


def save_lora_file(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """The final LoRA file: safetensors with metadata, written to a temp name and renamed."""
    from safetensors.torch import save as save_bytes

    path.parent.mkdir(parents=True, exist_ok=True)
    data = save_bytes({k: v.detach().contiguous().cpu() for k, v in state.items()}, metadata=metadata)
    write_atomic(path, canonical_safetensors(data))
    return path


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
