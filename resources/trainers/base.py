"""LoraTrainer: one LoRA run, the same for every model; a subclass holds only what its model needs.

`train()` runs, top to bottom:

1. check the inputs (`_check`);
2. encode every example once through the feature cache, loading the model's encoders only on a
   cache miss and freeing them before the transformer loads (`_load_encoders`, `_encode`);
3. load the frozen transformer (fp8 blocks with fp8 matmuls when the card has them and the budget allows, else
   nf4 on a CUDA card, with fp8 GEMMs only when `fp8_matmuls` is true; or plain; an fp8 base asked for beyond the
   budget swaps `swapped_blocks` blocks from host memory, models/block_swap.py) and add a fresh fp32 peft LoRA,
   its matmuls in bf16 on a GPU (`_transformer_class`, lora_precision.py);
4. the training loop with checkpoints and resume (loop.py), the model giving its loss for one
   batch (`_loss`) and, every config.sample_every steps, previews (`_preview_pipeline`, `_preview`);
5. write the LoRA, its ComfyUI-key twin (`_export_comfyui`) and the loss curve (lora_files.py).

The hooks in parentheses are what FluxLoraTrainer and QwenEditLoraTrainer implement.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import torch
import torch.utils.checkpoint
from PIL import Image

from flen_resources.models.block_swap import BlockSwap, swapped_indices
from flen_resources.models.fp8_linear import (
    compile_blocks,
    compiles_blocks,
    compute_blocks,
    nf4_blocks_to_fp8_matmuls,
    transformer_to_fp8,
)
from flen_resources.models.pipelines import nf4_kwargs, pick_device, pick_dtype
from flen_resources.models.quantization import nf4_needs_cuda
from flen_resources.models.sources import ResolvedModel, resolve_model
from flen_resources.trainers.attention import use_attention
from flen_resources.trainers.cache import FeatureCache
from flen_resources.trainers.config import LoraTrainConfig, TrainingError, TrainResult
from flen_resources.trainers.loop import free_memory, grow_segments_in_place, peak_gib, run_training_loop
from flen_resources.trainers.lora_files import list_snapshots, snapshot_stem, write_lora_pair, write_outputs
from flen_resources.trainers.lora_precision import lora_matmuls_in

Input = TypeVar("Input")  # one training example as the caller gives it (TrainItem, Triplet)


def distilled_guidance(transformer: Any, config: LoraTrainConfig, batch: int, device: torch.device,
                       dtype: torch.dtype) -> torch.Tensor | None:
    """config.guidance per example for a guidance-distilled transformer (FLUX.1-dev), None for others."""
    if not transformer.config.guidance_embeds:
        return None
    return torch.full((batch,), config.guidance, device=device, dtype=dtype)


def recompute_except(kept: Sequence[torch.nn.Module]) -> Callable[..., Any]:
    """diffusers' gradient-checkpointing function: every block is recomputed in backward except `kept`, which
    keep their activations (less recomputation for more memory)."""
    kept_ids = {id(block) for block in kept}

    def run(block: torch.nn.Module, *args: Any) -> Any:
        if id(block) in kept_ids:
            return block(*args)
        return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)

    return run


class LoraTrainer(Generic[Input]):
    """Trains a LoRA on one model; one instance per run folder (cache, checkpoints, output, samples)."""

    model_key: str  # the models/sources.py key of the base model (QwenEditLoraTrainer: one per instance)
    default_work_dir: ClassVar[Path]
    default_name: ClassVar[str]  # the LoRA's file name when train() gets none
    title: ClassVar[str]  # in the loss curve's title
    encoded: ClassVar[str]  # what the log says was cached, after the count
    group_key: ClassVar[str] = "bucket"  # the example field a batch must share (tensor shapes)
    # Keep the LoRA of every checkpoint (output/checkpoints/step-NNNNNN*.safetensors) for checkpoint selection.
    keeps_snapshots: ClassVar[bool] = False

    def __init__(self, model: str = "tiny", work_dir: Path | None = None, cache_dir: Path | None = None,
                 log: Callable[[str], None] = print, memory_budget_gib: float | None = None):
        self.model_source = model
        self.memory_budget_gib = memory_budget_gib  # card memory the run may take (None: the default budget)
        self.work_dir = Path(work_dir if work_dir is not None else self.default_work_dir)
        self.cache = FeatureCache(cache_dir or self.work_dir / "cache")
        self.log = log

    # -- the run --------------------------------------------------------------------------------
    def train(self, inputs: Sequence[Input], config: LoraTrainConfig, name: str | None = None,
              dataset_md5: str = "") -> TrainResult:
        """Train (or resume) to config.max_steps; returns the LoRA files, loss curve and samples."""
        name = self.default_name if name is None else name
        config = self.settle(config)  # `auto` settings decided before anything loads
        self._check(inputs, config)  # before anything is loaded or written
        started = time.time()
        device = pick_device(config.device)
        dtype = pick_dtype(device)
        grow_segments_in_place(device)  # a GPU only
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        resolved = resolve_model(self.model_key, self.model_source)
        self.work_dir.mkdir(parents=True, exist_ok=True)

        examples, samples = self._encode_once(resolved, inputs, config, device, dtype)
        self.log(f"cached {len(examples)} {self.encoded} ({self.cache.hits} hits, {self.cache.misses} computed); "
                 f"encoders freed")
        transformer = self._transformer(resolved, config, device, dtype)
        self.log(f"transformer ready on {device.type}: {config.quantization} base"
                 + (", fp8 GEMMs" if config.fp8_matmuls is True else "")
                 + (", blocks compile on their first forward" if compiles_blocks(config.compile, device) else ""))
        snapshots = self.work_dir / "output" / "checkpoints"

        def snapshot(step: int) -> None:
            write_lora_pair(transformer, resolved.ref, config, dataset_md5, snapshot_stem(snapshots, step),
                            lambda state, path, metadata: self._export_comfyui(state, transformer, config, path,
                                                                               metadata), step)

        run = run_training_loop(
            transformer, examples, config, self.work_dir, name, device,
            loss=lambda batch, generator: self._loss(transformer, batch, generator, config, device, dtype),
            log=self.log, group_key=self.group_key,
            previews=lambda step: self._samples(resolved, transformer, samples, config, step, device, dtype),
            snapshot=snapshot if self.keeps_snapshots else None)

        files = write_outputs(transformer, run.losses, resolved.ref, config, dataset_md5, self.work_dir / "output",
                              name, self.title, lambda state, path, metadata: self._export_comfyui(
                                  state, transformer, config, path, metadata))
        return TrainResult(lora_path=files.lora, comfyui_path=files.comfyui, loss_curve=files.loss_curve,
                           samples=run.samples, losses=run.losses, steps=config.max_steps,
                           resumed_from=run.resumed_from, seconds=time.time() - started, peak_gib=peak_gib(device),
                           cache_hits=self.cache.hits, cache_misses=self.cache.misses,
                           eval_loss_start=run.eval_loss_start, eval_loss_end=run.eval_loss_end,
                           metadata=files.metadata,
                           checkpoints=list_snapshots(snapshots, config.max_steps) if self.keeps_snapshots else [])

    def settle(self, config: LoraTrainConfig) -> LoraTrainConfig:
        """`config` with its `auto` settings decided for the device, this model and the memory budget."""
        return config.resolved(self.model_key, self.memory_budget_gib)

    # -- phase 1: encode everything once, then free the encoders --------------------------------
    def _encode_once(self, resolved: ResolvedModel, inputs: Sequence[Input], config: LoraTrainConfig,
                     device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
        """(training examples, preview inputs) from `_encode`, with the encoders loaded on first use only."""
        pipe = None

        def encoders() -> Any:
            nonlocal pipe
            if pipe is None:  # a warm cache never loads them
                pipe = self._load_encoders(resolved, config, device, dtype)
            return pipe

        examples, samples = self._encode(encoders, resolved, inputs, config, device, dtype)
        pipe = None  # the encoders go before the transformer comes
        free_memory(device)
        return examples, samples

    # -- phase 2: the transformer with a LoRA ---------------------------------------------------
    def _transformer(self, resolved: ResolvedModel, config: LoraTrainConfig, device: torch.device,
                     dtype: torch.dtype) -> Any:
        """The frozen transformer (nf4 on CUDA, or plain) with a fresh peft LoRA in fp32, ready to train."""
        from diffusers import BitsAndBytesConfig
        from peft import LoraConfig

        kwargs: dict[str, Any] = {"dtype": dtype, "use_safetensors": True}
        if config.quantization == "nf4":
            if device.type != "cuda":
                raise TrainingError(nf4_needs_cuda(device))
            # double quantization: the absmax in 8 bits, ~1 GiB off Qwen-Image's 20B transformer at the same
            # step time (train_gpu-qwen-edit-dq-nvidia-h200.json): the adapter's card peak under 16 GiB
            kwargs["quantization_config"] = BitsAndBytesConfig(**nf4_kwargs(double_quant=True))
            kwargs["device_map"] = {"": str(device)}  # quantized straight onto the GPU
        transformer = self._transformer_class().from_pretrained(str(resolved.path / "transformer"), **kwargs)
        swapped = swapped_indices(len(compute_blocks(transformer)), config.swapped_blocks)
        if config.quantization == "fp8":  # loaded on the CPU, quantized one block at a time on its way to the card
            transformer_to_fp8(transformer, device, dtype, host_blocks=swapped)
        elif config.quantization != "nf4":
            transformer.to(device)
        elif config.fp8_matmuls is True:  # the nf4 bytes stay; each use dequantizes to e4m3 for an fp8 GEMM
            nf4_blocks_to_fp8_matmuls(compute_blocks(transformer))
        transformer.requires_grad_(False)
        torch.manual_seed(config.seed)  # the LoRA's initial weights: the one draw from the global RNG
        transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                           target_modules=config.target_modules))
        for p in transformer.parameters():
            if p.requires_grad:  # LoRA weights train in fp32 whatever the base dtype, on the card (a swapped
                p.data = p.data.to(device, torch.float32)  # block's LoRA too: peft made it beside its base)
        if device.type == "cuda":  # their matmuls run in the base's dtype (lora_precision.py); a CPU keeps fp32
            lora_matmuls_in(transformer, dtype)
        use_attention(transformer, config.attention, device)
        blocks = compute_blocks(transformer)
        if config.gradient_checkpointing:
            count = len(blocks) if config.kept_activations == "all" else min(config.kept_activations, len(blocks))
            kept = [block for i, block in enumerate(blocks) if i >= len(blocks) - count and i not in swapped]
            transformer.enable_gradient_checkpointing(recompute_except(kept))
        swap = BlockSwap(transformer, blocks, swapped, device) if swapped else None
        if swap is not None:
            self.log(f"{len(swapped)} of {len(blocks)} blocks swap from host memory ({swap.host_gib():.1f} GiB)")
        if compiles_blocks(config.compile, device):
            compile_blocks(transformer, eager_hooks=[blocks[i] for i in swapped])
        transformer.train()
        return transformer

    # -- previews -------------------------------------------------------------------------------
    def _samples(self, resolved: ResolvedModel, transformer: Any, samples: list[dict], config: LoraTrainConfig,
                 step: int, device: torch.device, dtype: torch.dtype) -> list[Path]:
        """Previews with the LoRA as trained so far: samples/step-NNNNNN-p<prompt>-s<seed>.png per sample and seed."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if not samples:
            return []
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(resolved.path / "scheduler"))
        pipe = self._preview_pipeline(resolved, transformer, scheduler, device, dtype)
        pipe.set_progress_bar_config(disable=True)
        transformer.eval()
        paths = []
        with torch.no_grad():
            for i, sample in enumerate(samples):
                for seed in config.sample_seeds:
                    image = self._preview(pipe, sample, seed, config, device, dtype)
                    path = self.work_dir / "samples" / f"step-{step:06d}-p{i}-s{seed}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    paths.append(path)
        transformer.train()
        return paths

    # -- what a model implements ----------------------------------------------------------------
    def _check(self, inputs: Sequence[Input], config: LoraTrainConfig) -> None:
        """Raise TrainingError for inputs this model cannot train on."""
        raise NotImplementedError

    def _load_encoders(self, resolved: ResolvedModel, config: LoraTrainConfig, device: torch.device,
                       dtype: torch.dtype) -> Any:
        """The model's pipeline without its transformer: VAE and text encoder(s)."""
        raise NotImplementedError

    def _encode(self, encoders: Callable[[], Any], resolved: ResolvedModel, inputs: Sequence[Input],
                config: LoraTrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
        """(one dict of cached tensors per example, one per preview prompt); `encoders()` loads them on a miss."""
        raise NotImplementedError

    def _transformer_class(self) -> Any:
        """The diffusers transformer class of the model."""
        raise NotImplementedError

    @staticmethod
    def _loss(transformer: Any, batch: list[dict], generator: torch.Generator, config: LoraTrainConfig,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The flow-matching loss of one batch; every random draw from `generator` (exact resume)."""
        raise NotImplementedError

    def _preview_pipeline(self, resolved: ResolvedModel, transformer: Any, scheduler: Any, device: torch.device,
                          dtype: torch.dtype) -> Any:
        """A pipeline around the training transformer that renders from cached prompt embeddings."""
        raise NotImplementedError

    def _preview(self, pipe: Any, sample: dict, seed: int, config: LoraTrainConfig, device: torch.device,
                 dtype: torch.dtype) -> Image.Image:
        """One preview image of `sample` (from `_encode`) at `seed`."""
        raise NotImplementedError

    def _export_comfyui(self, state: dict[str, torch.Tensor], transformer: Any, config: LoraTrainConfig, path: Path,
                        metadata: dict[str, str]) -> Path:
        """Write the LoRA `state` (diffusers keys) with ComfyUI's keys to `path` (trainers/comfy.py)."""
        raise NotImplementedError
