"""The training loop both trainers run: optimizer, LR schedule, gradient accumulation and clipping,
checkpoints and resume, previews, and the fixed-batch eval loss.

A trainer hands in its LoRA transformer, its encoded examples and its loss for one batch
(`LossFn`); everything else happens here, identically for FLUX and Qwen-Image-Edit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flen_resources.trainers.attention import training_attention
from flen_resources.trainers.batching import batch_at, step_generator
from flen_resources.trainers.checkpoints import (
    checkpoint_config,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from flen_resources.trainers.config import LoraTrainConfig

# loss(batch, generator) -> scalar: the model's flow-matching loss on one batch, drawing from `generator`
LossFn = Callable[[list[dict], torch.Generator], torch.Tensor]
LOG_EVERY = 10  # steps between progress lines in the log (benchmarks/rehearsal_gpu.py paces a run by them)


# -- the optimizer and LR schedule: every option in this one block ---------------------------------
# From the config: optimizer, learning_rate, weight_decay, lr_scheduler, lr_warmup_steps, max_steps;
# the loop adds gradient_accumulation micro-batches and clipping to max_grad_norm per step.
# Adam's moments and epsilon are torch's and bitsandbytes' defaults, spelled out so nothing is implicit.
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def make_optimizer(params: list[torch.nn.Parameter], config: LoraTrainConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    """8-bit AdamW (bitsandbytes) on a GPU when config.optimizer asks for it, torch AdamW otherwise (fused on a GPU)."""
    options = dict(lr=config.learning_rate, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=config.weight_decay)
    if config.optimizer == "adamw8bit" and device.type == "cuda":  # bitsandbytes' 8-bit states need CUDA
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **options)
    # fused: one kernel for every LoRA tensor, where a loop over ~500 small tensors is bound by launches
    return torch.optim.AdamW(params, **options, fused=device.type == "cuda")


def make_lr_scheduler(optimizer: torch.optim.Optimizer, config: LoraTrainConfig) -> Any:
    """diffusers' named schedule (config.lr_scheduler) with config.lr_warmup_steps over config.max_steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                         num_training_steps=config.max_steps)


# -- the loop -------------------------------------------------------------------------------------
@dataclass
class LoopResult:
    """What the loop gives back: the resumed-from step, every step's loss, the eval losses, previews."""

    resumed_from: int
    losses: list[tuple[int, float]]
    eval_loss_start: float
    eval_loss_end: float
    samples: list[Path]


def run_training_loop(transformer: Any, examples: list[dict], config: LoraTrainConfig, work_dir: Path, name: str,
                      device: torch.device, loss: LossFn, log: Callable[[str], None], group_key: str = "bucket",
                      previews: Callable[[int], list[Path]] | None = None,
                      snapshot: Callable[[int], None] | None = None) -> LoopResult:
    """Train (or resume from work_dir/checkpoints) to config.max_steps with training's attention kernel and the
    compiled blocks' activation budget (see `_training_loop`)."""
    with training_attention(config.attention, device), compiled_activation_budget(config.activation_budget):
        return _training_loop(transformer, examples, config, work_dir, name, device, loss, log, group_key, previews,
                              snapshot)


def _training_loop(transformer: Any, examples: list[dict], config: LoraTrainConfig, work_dir: Path, name: str,
                   device: torch.device, loss: LossFn, log: Callable[[str], None], group_key: str = "bucket",
                   previews: Callable[[int], list[Path]] | None = None,
                   snapshot: Callable[[int], None] | None = None) -> LoopResult:
    """Train (or resume from work_dir/checkpoints) to config.max_steps.

    Per step: config.gradient_accumulation micro-batches from `batch_at`, gradients clipped to
    config.max_grad_norm, one optimizer and LR-scheduler step; checkpoints every
    config.checkpoint_every steps and at the end, each with `snapshot(step)` (the LoRA as it stands, kept for
    evaluation) written first; `previews(step)` every config.sample_every steps.
    The fixed-batch eval loss is measured before the first step (fresh runs only) and after the last.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    params = [p for p in transformer.parameters() if p.requires_grad]
    checkpoint = latest_checkpoint(work_dir / "checkpoints")
    saved_optimizer = checkpoint_config(checkpoint).get("optimizer") if checkpoint is not None else None
    if saved_optimizer in ("adamw8bit", "adamw") and saved_optimizer != config.optimizer:
        # Its states only load into the optimizer that saved them (8-bit blocks vs torch's moments); what
        # `auto` picks may have changed since the run began.
        log(f"resuming with the checkpoint's optimizer {saved_optimizer}, not {config.optimizer}")
        config = replace(config, optimizer=saved_optimizer)
    optimizer = make_optimizer(params, config, device)
    lr_scheduler = make_lr_scheduler(optimizer, config)

    start, losses, eval_start = 0, [], float("nan")
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
        log(f"fixed-batch loss at the start {eval_start:.4f}")
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
        if done % LOG_EVERY == 0 or done == config.max_steps:
            log(f"step {done}/{config.max_steps} loss {total:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
        if previews is not None and config.sample_every and done % config.sample_every == 0:
            samples += previews(done)
        if done % config.checkpoint_every == 0 or done == config.max_steps:
            if snapshot is not None:  # before the checkpoint: a resume past this step never lacks its snapshot
                snapshot(done)
            save_checkpoint(work_dir / "checkpoints", done, get_peft_model_state_dict(transformer),
                            optimizer, lr_scheduler, {"losses": losses, "config": json.loads(config.to_json()),
                                                      "eval_loss_start": eval_start},
                            config.keep_checkpoints)

    eval_end = eval_loss()
    log(f"fixed-batch loss {eval_start:.4f} -> {eval_end:.4f}")
    return LoopResult(resumed_from=start, losses=losses, eval_loss_start=eval_start, eval_loss_end=eval_end,
                      samples=samples)


def fixed_batch_loss(transformer: Any, examples: list[dict], config: LoraTrainConfig, loss: LossFn) -> float:
    """Mean loss over the first few examples with fixed noise and timesteps (forward only)."""
    # In the training step's own mode (train(), gradients on, no backward): under no_grad or eval() the compiled
    # blocks would compile a second graph, 48 s of flux_lora's 167 s fixed time on an H200 (session 15's slice log).
    # The graph each forward records is freed with its loss, before the next example.
    losses = [loss([example], step_generator(config.seed, i, "eval")).item() for i, example in enumerate(examples[:8])]
    return sum(losses) / len(losses)


# -- memory -----------------------------------------------------------------------------------------
def free_memory(device: torch.device) -> None:
    """Collect what was just dropped (the encoders) and hand CUDA's cached blocks back."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_partitioned_with: dict[str, float] = {}  # the activation budget this process's compiled blocks were split under


@contextlib.contextmanager
def compiled_activation_budget(budget: float) -> Iterator[None]:
    """torch.compile's activation memory budget (the share of activations its partitioner saves) while inside."""
    import torch._functorch.config as functorch_config

    # dynamo hands a block class's compiled graph to every later instance without looking at this setting, so a
    # run under another budget than the process's last would inherit that run's partition: compile afresh
    if _partitioned_with.get("budget", budget) != budget:
        torch.compiler.reset()
    _partitioned_with["budget"] = budget
    # the partitioner reads it when a block compiles: inside the loop, at the first forward with gradients
    with functorch_config.patch(activation_memory_budget=float(budget)):
        yield


ALLOCATOR_SETTING = "expandable_segments:True"


def grow_segments_in_place(device: torch.device) -> bool:
    """Let CUDA's caching allocator grow its segments in place, for the rest of the process; True when set."""
    # The Qwen-Edit adapter on one H200: card peak 16.01 GiB with the default allocator, 15.34 with this
    # (iteration_gpu-nvidia-h200.json). A PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF the user set wins.
    if device.type != "cuda" or os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"):
        return False
    set_allocator(ALLOCATOR_SETTING)
    return True


def set_allocator(setting: str) -> None:
    """Change the CUDA caching allocator's settings now, e.g. "expandable_segments:True"."""
    # torch has no public setter after start-up (the env var is read once, at this process's first CUDA call);
    # torch 2.10+ names it _accelerator_setAllocatorSettings, older ones torch.cuda.memory._set_allocator_settings
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) or torch.cuda.memory._set_allocator_settings
    setter(setting)


def peak_gib(device: torch.device) -> float | None:
    """The run's peak allocated CUDA memory in GiB; None on the CPU."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
