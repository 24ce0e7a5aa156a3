"""FLUX.1-dev LoRA trainer (QLoRA): cached latents and text embeddings, encoders freed, then an
explicit flow-matching loop on the nf4 (or bf16) transformer, readable top to bottom.

    trainer = FluxLoraTrainer(model="tiny", work_dir=Path("runs/alice-v1"))
    result = trainer.train(items, LoraTrainConfig(max_steps=1500), name="alice_v1")
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

from flen_resources.models.pipelines import pick_dtype
from flen_resources.models.sources import ResolvedModel, resolve_model
from flen_resources.trainers.cache import FeatureCache, content_key
from flen_resources.trainers.common import (TRAINER_VERSION, LoraTrainConfig, TrainingError, buckets, epoch_order,
                                            latest_checkpoint, load_checkpoint, logit_normal_sigmas, make_lr_scheduler,
                                            make_optimizer, nearest_bucket, pick_device, save_checkpoint,
                                            save_loss_curve, save_lora_file, step_generator)

MODEL_KEY = "flux.1-dev"


@dataclass
class TrainItem:
    """One training image and its caption (None: the default caption)."""

    image: Path
    caption: str | None = None


@dataclass
class TrainResult:
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


def _load_image(path: Path, size: tuple[int, int]) -> Image.Image:
    """RGB, resized to cover the bucket and centre-cropped to it."""
    with Image.open(path) as img:
        return ImageOps.fit(img.convert("RGB"), size, Image.LANCZOS)


class FluxLoraTrainer:
    """Trains a character LoRA on FLUX.1-dev; one instance per run folder."""

    def __init__(self, model: str = "tiny", work_dir: Path = Path("runs/flux"), cache_dir: Path | None = None,
                 log: Callable[[str], None] = print):
        self.model_source = model
        self.work_dir = Path(work_dir)
        self.cache = FeatureCache(cache_dir or self.work_dir / "cache")
        self.log = log

    # -- phase 1: encode everything once, then free the encoders ------------------------------
    def _encode(self, resolved: ResolvedModel, items: list[TrainItem], config: LoraTrainConfig,
                default_caption: str, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
        from diffusers import FluxPipeline

        options = buckets(config.resolution)
        pipe = None

        def encoders():
            nonlocal pipe
            if pipe is None:  # loaded only on a cache miss
                pipe = FluxPipeline.from_pretrained(str(resolved.path), transformer=None, dtype=dtype,
                                                    use_safetensors=True).to(device)
            return pipe

        def text(prompt: str) -> dict[str, torch.Tensor]:
            def compute():
                embeds, pooled, _ = encoders().encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                             max_sequence_length=512)
                return {"prompt_embeds": embeds[0], "pooled": pooled[0]}
            return self.cache.get("text", content_key(resolved.ref, "flux-text", prompt), compute)

        examples = []
        for item in tqdm(items, desc="cache latents + text", unit="img", leave=False):
            with Image.open(item.image) as img:
                bucket = nearest_bucket(img.width, img.height, options)

            def latents(item=item, bucket=bucket):
                p = encoders()
                x = p.image_processor.preprocess(_load_image(item.image, bucket), bucket[1], bucket[0])
                with torch.no_grad():
                    lat = p.vae.encode(x.to(device, dtype)).latent_dist.mode()
                lat = (lat - p.vae.config.shift_factor) * p.vae.config.scaling_factor
                return {"latents": lat[0]}

            lat = self.cache.get("latents", content_key(resolved.ref, "flux-vae", item.image, bucket), latents)
            caption = item.caption or default_caption
            examples.append({"latents": lat["latents"], **text(caption), "bucket": bucket, "caption": caption})
        samples = [{"prompt": p, **text(p)} for p in config.sample_prompts]
        del pipe
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return examples, samples

    # -- phase 2: the transformer with a LoRA ---------------------------------------------------
    def _transformer(self, resolved: ResolvedModel, config: LoraTrainConfig, device: torch.device, dtype: torch.dtype):
        from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
        from peft import LoraConfig

        kwargs = {"dtype": dtype, "use_safetensors": True}
        if config.quantization == "nf4":
            if device.type != "cuda":
                raise TrainingError("nf4 (QLoRA) needs a CUDA GPU; use quantization 'none' on the CPU")
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                               bnb_4bit_compute_dtype=torch.bfloat16)
            kwargs["device_map"] = {"": str(device)}  # quantized straight onto the GPU
        transformer = FluxTransformer2DModel.from_pretrained(str(resolved.path / "transformer"), **kwargs)
        if config.quantization != "nf4":
            transformer.to(device)
        transformer.requires_grad_(False)
        torch.manual_seed(config.seed)  # the LoRA's initial weights
        transformer.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.alpha, init_lora_weights="gaussian",
                                           target_modules=config.target_modules))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # LoRA weights train in fp32 whatever the base dtype
        if config.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if config.compile and device.type == "cuda":
            for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
                block.compile()
        transformer.train()
        return transformer

    # -- one step of the loss -------------------------------------------------------------------
    @staticmethod
    def _loss(transformer, batch: list[dict], generator: torch.Generator, config: LoraTrainConfig,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        from diffusers import FluxPipeline

        latents = torch.stack([b["latents"] for b in batch]).to(device, dtype)
        bsz, channels, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        sigmas = logit_normal_sigmas(bsz, generator, config.logit_mean, config.logit_std).to(device)
        s = sigmas.view(bsz, 1, 1, 1).to(dtype)
        noisy = (1.0 - s) * latents + s * noise
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, dtype)
        embeds = torch.stack([b["prompt_embeds"] for b in batch]).to(device, dtype)
        pooled = torch.stack([b["pooled"] for b in batch]).to(device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = torch.full((bsz,), config.guidance, device=device, dtype=dtype) \
            if transformer.config.guidance_embeds else None
        pred = transformer(hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance,
                           pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                           img_ids=img_ids, return_dict=False)[0]
        target = FluxPipeline._pack_latents(noise - latents, bsz, channels, height, width)  # velocity
        return F.mse_loss(pred.float(), target.float())

    @staticmethod
    def _batches(examples: list[dict], config: LoraTrainConfig, epoch: int) -> list[list[int]]:
        """The batches of one epoch: shuffled, then grouped by bucket (same size within a batch)."""
        pending: dict[tuple[int, int], list[int]] = {}
        out = []
        for idx in epoch_order(len(examples), config.seed, epoch):
            group = pending.setdefault(examples[idx]["bucket"], [])
            group.append(idx)
            if len(group) == config.batch_size:
                out.append(group[:])
                group.clear()
        return out

    def _batch_at(self, examples: list[dict], config: LoraTrainConfig, micro_step: int) -> list[dict]:
        epoch, index = 0, micro_step
        while True:
            batches = self._batches(examples, config, epoch)
            if not batches:
                raise TrainingError(f"no bucket holds {config.batch_size} images; lower batch_size")
            if index < len(batches):
                return [examples[i] for i in batches[index]]
            index -= len(batches)
            epoch += 1

    def _eval_loss(self, transformer, examples: list[dict], config: LoraTrainConfig, device: torch.device,
                   dtype: torch.dtype) -> float:
        """Mean loss over the first few images with fixed noise and timesteps (no gradient)."""
        transformer.eval()
        losses = []
        with torch.no_grad():
            for i, example in enumerate(examples[:8]):
                losses.append(self._loss(transformer, [example], step_generator(config.seed, i, "eval"), config,
                                         device, dtype).item())
        transformer.train()
        return sum(losses) / len(losses)

    # -- previews -------------------------------------------------------------------------------
    def _samples(self, resolved: ResolvedModel, transformer, samples: list[dict], config: LoraTrainConfig,
                 step: int, device: torch.device, dtype: torch.dtype) -> list[Path]:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline

        if not samples:
            return []
        vae = AutoencoderKL.from_pretrained(str(resolved.path / "vae"), dtype=dtype, use_safetensors=True).to(device)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(resolved.path / "scheduler"))
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        transformer.eval()
        paths = []
        with torch.no_grad():
            for i, sample in enumerate(samples):
                for seed in config.sample_seeds:
                    image = pipe(prompt_embeds=sample["prompt_embeds"][None].to(device, dtype),
                                 pooled_prompt_embeds=sample["pooled"][None].to(device, dtype),
                                 width=config.sample_size, height=config.sample_size,
                                 num_inference_steps=config.sample_steps, guidance_scale=3.5,
                                 generator=torch.Generator("cpu").manual_seed(seed)).images[0]
                    path = self.work_dir / "samples" / f"step-{step:06d}-p{i}-s{seed}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    paths.append(path)
        transformer.train()
        del pipe, vae
        return paths

    # -- the run --------------------------------------------------------------------------------
    def train(self, items: list[TrainItem], config: LoraTrainConfig, name: str = "lora", default_caption: str = "",
              dataset_md5: str = "") -> TrainResult:
        """Train (or resume) to config.max_steps; returns the LoRA files, loss curve and samples."""
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        if len(items) < config.min_images:
            raise TrainingError(f"the training set has {len(items)} image(s); at least {config.min_images} are needed")
        missing = [str(i.image) for i in items if not Path(i.image).is_file()]
        if missing:
            raise TrainingError(f"training images missing: {', '.join(missing[:5])}")
        if not default_caption and any(not i.caption for i in items):
            raise TrainingError("some images have no caption and no default caption was given")
        started = time.time()
        device = pick_device(config.device)
        dtype = pick_dtype(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        resolved = resolve_model(MODEL_KEY, self.model_source)
        self.work_dir.mkdir(parents=True, exist_ok=True)

        examples, sample_embeds = self._encode(resolved, items, config, default_caption, device, dtype)
        self.log(f"cached {len(examples)} latents + captions ({self.cache.hits} hits, {self.cache.misses} computed); "
                 f"encoders freed")
        transformer = self._transformer(resolved, config, device, dtype)
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, config, device)
        lr_scheduler = make_lr_scheduler(optimizer, config)

        start, losses = 0, []
        checkpoint = latest_checkpoint(self.work_dir / "checkpoints")
        if checkpoint is not None:
            start, lora_state, state = load_checkpoint(checkpoint, optimizer, lr_scheduler, device)
            set_peft_model_state_dict(transformer, lora_state)
            losses = [tuple(x) for x in state.get("losses", [])]
            if state.get("config") != json.loads(config.to_json()):
                self.log("warning: resuming with a different config than the checkpoint's")
            self.log(f"resumed from {checkpoint.name}")

        eval_start = self._eval_loss(transformer, examples, config, device, dtype) if start == 0 else float("nan")
        samples: list[Path] = []
        bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, desc=f"train {name}",
                   unit="step")
        for step in bar:
            generator = step_generator(config.seed, step)
            total = 0.0
            for accum in range(config.gradient_accumulation):
                batch = self._batch_at(examples, config, step * config.gradient_accumulation + accum)
                loss = self._loss(transformer, batch, generator, config, device, dtype) / config.gradient_accumulation
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append((step + 1, total))
            bar.set_postfix(loss=f"{total:.4f}")
            done = step + 1
            if done % 10 == 0 or done == config.max_steps:
                self.log(f"step {done}/{config.max_steps} loss {total:.4f} lr {lr_scheduler.get_last_lr()[0]:.2e}")
            if config.sample_every and done % config.sample_every == 0:
                samples += self._samples(resolved, transformer, sample_embeds, config, done, device, dtype)
            if done % config.checkpoint_every == 0 or done == config.max_steps:
                save_checkpoint(self.work_dir / "checkpoints", done, get_peft_model_state_dict(transformer),
                                optimizer, lr_scheduler, {"losses": losses, "config": json.loads(config.to_json())},
                                config.keep_checkpoints)

        eval_end = self._eval_loss(transformer, examples, config, device, dtype)
        self.log(f"fixed-batch loss {eval_start:.4f} -> {eval_end:.4f}")
        state = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(transformer).items()}
        metadata = {
            "format": "pt",
            # diffusers reads the LoRA's config (rank, alpha, targets) from here, keys prefixed by component.
            "lora_adapter_metadata": json.dumps({f"transformer.{k}": (sorted(v) if isinstance(v, set) else v)
                                                 for k, v in transformer.peft_config["default"].to_dict().items()},
                                                default=str, sort_keys=True),
            "flenwheel.base_model": resolved.ref,
            "flenwheel.dataset_md5": dataset_md5,
            "flenwheel.config": config.to_json(),
            "flenwheel.step": str(config.max_steps),
            "flenwheel.trainer_version": TRAINER_VERSION,
            "flenwheel.key_style": "diffusers",
        }
        out = self.work_dir / "output"
        lora_path = save_lora_file(out / f"{name}.safetensors", state, metadata)
        from flen_resources.trainers.comfy import export_flux_comfyui

        comfy_meta = {k: v for k, v in metadata.items() if k != "lora_adapter_metadata"}
        comfy_path = export_flux_comfyui(state, transformer.config, config.alpha, out / f"{name}_comfyui.safetensors",
                                         {**comfy_meta, "flenwheel.key_style": "comfyui"})
        curve = save_loss_curve(losses, out / "loss_curve.png", f"{name}: FLUX LoRA r{config.rank}")
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
        return TrainResult(lora_path=lora_path, comfyui_path=comfy_path, loss_curve=curve, samples=samples,
                           losses=losses, steps=config.max_steps, resumed_from=start, seconds=time.time() - started,
                           peak_gib=peak, cache_hits=self.cache.hits, cache_misses=self.cache.misses,
                           eval_loss_start=eval_start, eval_loss_end=eval_end, metadata=metadata)
