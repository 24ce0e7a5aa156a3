"""What a LoRA run is asked for and what it gives back: the config, the result, the error, and the
checkpoint cadence. Shared by both trainers.

The config's JSON goes into every LoRA file's metadata (`flenwheel.config`), so a field added or
renamed here changes the bytes (and DVC md5) of every LoRA trained after it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:  # pipelines imports torch: the Dagster definitions import this module without it
    from flen_resources.models.quantization import QuantizationSettingWithFp8

# In every LoRA file's metadata: bump it when the same config and data would train a different LoRA.
TRAINER_VERSION = "5"  # 2: on a GPU, fused AdamW with an fp8 base; 3: on a GPU, the LoRA's matmuls in bf16;
# 4: an fp8 base keeps every block (the compiler's activation budget recomputes), nf4 with double quantization;
# 5: Qwen-Image-Edit on an Ada/Hopper card trains on an fp8 base with blocks swapped, not nf4

# auto: 8-bit AdamW on a CUDA GPU with an nf4 base (its states take a quarter of the memory), torch's fused
# AdamW with an fp8 base (the budget has room: bitsandbytes launches kernels per tensor, 33 ms of a 0.49 s
# FLUX step on an H200 for 532 LoRA tensors) and on the CPU.
Optimizer = Literal["auto", "adamw8bit", "adamw"]
OPTIMIZERS: tuple[str, ...] = get_args(Optimizer)
Attention = Literal["auto", "cudnn", "flash"]
ATTENTION_KERNELS: tuple[str, ...] = get_args(Attention)

DEFAULT_CHECKPOINT_EVERY = 250
# kept_activations "auto" with an fp8 base: no block is wrapped in a whole-block checkpoint ("all" kept) and
# torch.compile's partitioner recomputes inside each compiled block what its activation memory budget leaves out
# (COMPILED_ACTIVATION_BUDGET: the share of the block's activations saved; attention and matmul outputs first).
# Measured on one H200, FLUX 1024², r16, interleaved with the naive loop (train_gpu-flux-memory-budget-*.json):
# last 8 blocks kept and the rest checkpointed 0.488 s at 15.76 GiB; all kept, budget 0.2: 0.370 s at 16.64 GiB;
# budget 0.35: 0.370 s at 18.53 GiB. Every block is kept only when it fits the card's memory budget: the fp8
# weights plus ALL_KEPT_ACTIVATIONS_GIB (16.64 - 11.08 GiB of weights at 1024², batch 1; activations grow with the
# pixels and the batch) plus ALL_KEPT_SLACK_GIB (CUDA context and allocator). Without compile (the CPU, or compile
# off) the budget cannot act, and on a tighter budget or a larger picture an fp8 base keeps FP8_KEPT_ACTIVATIONS
# blocks and checkpoints the rest. An nf4 base (a small card) keeps none.
COMPILED_ACTIVATION_BUDGET = 0.2
ALL_KEPT_ACTIVATIONS_GIB = 5.6
ALL_KEPT_SLACK_GIB = 1.5
FP8_KEPT_ACTIVATIONS = 8
KeptActivations = int | Literal["auto", "all"]


class TrainingError(ValueError):
    """Training cannot start or go on; the message says why."""


def checkpoint_interval(steps: int, every: int | None = None) -> int:
    """Steps between checkpoints: `every`, else 250 or a quarter of a shorter run, so a killed run always resumes."""
    chosen = every if every else min(DEFAULT_CHECKPOINT_EVERY, max(1, steps // 4))
    return max(1, min(chosen, steps))


def auto_optimizer(quantization: str, cuda: bool) -> str:
    """The `auto` optimizer: 8-bit AdamW on a GPU unless the base is fp8 (room to spare), torch AdamW otherwise."""
    return "adamw8bit" if cuda and quantization != "fp8" else "adamw"


def all_kept_reserve_gib(resolution: int, batch_size: int) -> float:
    """Card memory beyond the fp8 weights that every kept block needs, compiled at COMPILED_ACTIVATION_BUDGET."""
    return ALL_KEPT_ACTIVATIONS_GIB * (resolution / 1024) ** 2 * batch_size + ALL_KEPT_SLACK_GIB


def auto_kept_activations(quantization: str, fits_budget: bool, all_fit: bool) -> int | Literal["all"]:
    """The `auto` kept activations with an fp8 base: every block when `all_fit` (compiled, and within the budget
    with all_kept_reserve_gib), else FP8_KEPT_ACTIVATIONS when the base fits the budget; none otherwise."""
    if quantization != "fp8" or not fits_budget:
        return 0
    return "all" if all_fit else FP8_KEPT_ACTIVATIONS


def auto_activation_budget(kept_activations: KeptActivations, compiled: bool) -> float:
    """The `auto` activation memory budget of the compiled blocks: COMPILED_ACTIVATION_BUDGET when no block is
    checkpointed as a whole, else 1.0 (torch's default: save what the block needs, checkpoints recompute)."""
    return COMPILED_ACTIVATION_BUDGET if kept_activations == "all" and compiled else 1.0


@dataclass
class LoraTrainConfig:
    """Every knob of a LoRA run. Defaults suit a character LoRA on a 24 GB card."""

    rank: int = 16
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                                               "add_k_proj", "add_v_proj", "to_add_out"])
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"  # a diffusers.optimization.get_scheduler name
    lr_warmup_steps: int = 50
    max_steps: int = 1500
    batch_size: int = 1
    gradient_accumulation: int = 1
    resolution: int = 1024  # bucket area = resolution^2
    seed: int = 0
    # auto: fp8 on a card with fp8 matmuls when the model fits the memory budget in fp8, with blocks swapped when
    # needed (Qwen-Image-Edit's 20B), else nf4 on a CUDA GPU, none on the CPU
    # (models/quantization.pick_quantization_with_fp8)
    quantization: QuantizationSettingWithFp8 = "auto"
    # The frozen base's GEMMs in fp8 (e4m3, models/fp8_linear.py): an fp8 base always; an nf4 base, when true,
    # dequantizes each weight and quantizes it to e4m3 at each use (slower on an H200, so auto leaves it off:
    # models/quantization.pick_fp8_matmuls).
    fp8_matmuls: bool | Literal["auto"] = "auto"
    gradient_checkpointing: bool = True
    # With checkpointing: this many blocks (the last ones) keep their activations on the card instead of
    # recomputing them in backward; a card with memory to spare trades it for speed. 0: recompute every block;
    # "all": no block checkpointed (a number at or above the block count keeps them all too, but its activation
    # budget stays 1.0 under auto); auto: auto_kept_activations (every block with a compiled fp8 base that fits).
    kept_activations: KeptActivations = "auto"
    # torch.compile's activation memory budget for the compiled blocks (0-1]: the share of a block's activations
    # saved for backward, the rest recomputed; auto: auto_activation_budget (COMPILED_ACTIVATION_BUDGET with
    # every block kept, else 1.0).
    activation_budget: float | Literal["auto"] = "auto"
    # An fp8 base that does not fit the memory budget: this many blocks keep their frozen weights in the host's
    # pinned memory and are copied onto the card for each use, one block ahead (models/block_swap.py); they are
    # always checkpointed. auto: none when the base fits, else enough to fit the budget and to hold no more block
    # weight on the card than an nf4 base (models/quantization.swapped_block_count).
    swapped_blocks: int | Literal["auto"] = "auto"
    optimizer: Optimizer = "auto"  # see OPTIMIZERS
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    logit_mean: float = 0.0  # logit-normal timestep sampling
    logit_std: float = 1.0
    guidance: float = 1.0  # FLUX.1-dev's distilled guidance embedding during training
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY  # see checkpoint_interval() for the default a short run gets
    keep_checkpoints: int = 2
    sample_every: int = 250  # 0: no previews
    sample_prompts: list[str] = field(default_factory=list)
    sample_seeds: list[int] = field(default_factory=lambda: [1, 2])
    sample_steps: int = 20
    sample_size: int = 512
    min_images: int = 4
    device: str = "auto"
    compile: bool = True  # torch.compile every transformer block (on a GPU where it works; the CPU runs eager)
    # Attention kernel on a GPU: cuDNN's (about 1.7x flash's forward + backward on Hopper, through
    # trainers/attention.py) or torch's flash SDPA; "auto": cuDNN on Hopper and newer, flash before.
    # The CPU runs torch's default either way.
    attention: Attention = "auto"

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise TrainingError(f"attention must be 'auto', 'cudnn' or 'flash', not {self.attention!r}")
        if self.kept_activations not in ("auto", "all") and (isinstance(self.kept_activations, bool)
                                                             or not isinstance(self.kept_activations, int)
                                                             or self.kept_activations < 0):
            raise TrainingError(f"kept_activations must be 'auto', 'all' or 0 or more (blocks that skip "
                                f"checkpointing), not {self.kept_activations!r}")
        if self.activation_budget != "auto":
            if isinstance(self.activation_budget, bool) or not isinstance(self.activation_budget, (int, float)) \
                    or not 0 < self.activation_budget <= 1:
                raise TrainingError(f"activation_budget must be 'auto' or a share in (0, 1] (of the compiled "
                                    f"blocks' activations saved for backward), not {self.activation_budget!r}")
            self.activation_budget = float(self.activation_budget)  # 1 and 1.0: the same LoRA metadata
        if self.swapped_blocks != "auto" and (isinstance(self.swapped_blocks, bool)
                                              or not isinstance(self.swapped_blocks, int) or self.swapped_blocks < 0):
            raise TrainingError(f"swapped_blocks must be 'auto' or 0 or more (blocks whose weights wait in host "
                                f"memory), not {self.swapped_blocks!r}")
        if self.fp8_matmuls != "auto" and not isinstance(self.fp8_matmuls, bool):
            raise TrainingError(f"fp8_matmuls must be 'auto', true or false, not {self.fp8_matmuls!r}")
        if self.optimizer not in OPTIMIZERS:
            raise TrainingError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")

    @classmethod
    def from_knobs(cls, *, steps: int, rank: int, learning_rate: float, resolution: int, optimizer: str,
                   checkpoint_every: int | None, **rest: Any) -> LoraTrainConfig:
        """The config from the knobs users tune (`flen train` and the LoRA assets' config), with the same rules for
        both: alpha = rank, warm-up at most a tenth of the run, checkpoints by checkpoint_interval."""
        return cls(max_steps=steps, rank=rank, alpha=float(rank), learning_rate=learning_rate, resolution=resolution,
                   optimizer=optimizer, checkpoint_every=checkpoint_interval(steps, checkpoint_every),
                   lr_warmup_steps=min(cls.lr_warmup_steps, steps // 10), **rest)

    def resolved(self, model_key: str = "flux.1-dev", memory_budget_gib: float | None = None) -> LoraTrainConfig:
        """This config with `auto` quantization, fp8 matmuls, optimizer, swapped blocks, kept activations, activation
        budget and compile decided for its device, the model and the card memory budget (what runs and is recorded)."""
        from flen_resources.models.fp8_linear import compiles_blocks, fp8_matmuls
        from flen_resources.models.pipelines import pick_device
        from flen_resources.models.quantization import (
            QuantizationError,
            blocks_to_fit,
            fp8_fits,
            host_memory_gib,
            nf4_needs_cuda,
            pick_fp8_matmuls,
            pick_quantization_with_fp8,
            swapped_block_count,
        )
        from flen_resources.models.registry import MODELS
        from flen_resources.models.residency import DEFAULT_MEMORY_BUDGET_GIB

        device = pick_device(self.device)
        cuda = device.type == "cuda"
        budget = DEFAULT_MEMORY_BUDGET_GIB if memory_budget_gib is None else memory_budget_gib
        spec = MODELS[model_key]
        params, blocks, reserve = spec.transformer_params, spec.transformer_blocks, spec.fp8_training_reserve_gib
        # auto may swap blocks only where swapping is measured, and only when the other settings let it
        swappable = blocks if spec.auto_swaps and self.gradient_checkpointing and self.swapped_blocks != 0 else 0
        try:
            quantization = pick_quantization_with_fp8(self.quantization, device, params, budget, fp8_matmuls(device),
                                                      reserve, swappable_blocks=swappable, host_gib=host_memory_gib())
            fp8_gemms = pick_fp8_matmuls(self.fp8_matmuls, quantization, fp8_matmuls(device))
        except QuantizationError as exc:
            raise TrainingError(str(exc)) from exc
        if quantization == "nf4" and not cuda:
            raise TrainingError(nf4_needs_cuda(device))
        optimizer = self.optimizer if self.optimizer != "auto" else auto_optimizer(quantization, cuda)
        # fp8 asked for by hand on a card it does not fit with its reserve: no memory to spare for kept blocks
        fits = fp8_fits(params, budget, reserve)
        compiled = compiles_blocks(self.compile, device)  # without Triton or a C compiler: eager
        all_fit = compiled and fp8_fits(params, budget, all_kept_reserve_gib(self.resolution, self.batch_size))
        if self.swapped_blocks not in ("auto", 0) and quantization != "fp8":
            raise TrainingError(f"swapped_blocks {self.swapped_blocks} with quantization {quantization!r}: only an "
                                "fp8 base swaps blocks; set swapped_blocks to auto, or quantization to fp8")
        if self.swapped_blocks != "auto" and self.swapped_blocks >= blocks:
            raise TrainingError(f"swapped_blocks {self.swapped_blocks}: {model_key} has {blocks} blocks and the first "
                                f"never swaps; set swapped_blocks to at most {blocks - 1}, or auto")
        # the budget is the card's: the CPU has none to fit (an explicit count still swaps there, for tests)
        swapped = self.swapped_blocks if self.swapped_blocks != "auto" else 0 if quantization != "fp8" or not cuda \
            else swapped_block_count(params, blocks, budget, reserve)
        need = blocks_to_fit(params, blocks, budget, reserve) if quantization == "fp8" and cuda else 0
        if need < blocks and swapped < need:  # an explicit count the card's budget cannot hold
            raise TrainingError(f"swapped_blocks {swapped}: {model_key} in fp8 fits the {budget:g} GiB memory budget "
                                f"only with {need} or more of its blocks swapped; set swapped_blocks to auto or at "
                                f"least {need}, or raise the memory budget")
        if swapped >= blocks:
            raise TrainingError(f"quantization fp8: {model_key} does not fit a {budget:g} GiB budget even with all but "
                                "its first block swapped from host memory; raise the memory budget, or set "
                                "quantization to auto (nf4)")
        if swapped and not self.gradient_checkpointing:
            raise TrainingError("swapped_blocks needs gradient_checkpointing (a swapped block is recomputed in "
                                "backward): set gradient_checkpointing to true, or swapped_blocks to 0")
        kept = self.kept_activations if self.kept_activations != "auto" \
            else auto_kept_activations(quantization, fits, all_fit)
        activation_budget = self.activation_budget if self.activation_budget != "auto" \
            else auto_activation_budget(kept, compiled)
        return replace(self, quantization=quantization, fp8_matmuls=fp8_gemms, optimizer=optimizer,
                       swapped_blocks=swapped, kept_activations=kept, activation_budget=activation_budget,
                       compile=compiled)

    def to_json(self) -> str:
        """The config as sorted JSON: what LoRA metadata and checkpoints record."""
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
    # (step, diffusers LoRA file) of every checkpoint kept for evaluation, the final step included; its
    # ComfyUI twin sits beside it (<stem>_comfyui.safetensors).
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
