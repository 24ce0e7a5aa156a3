"""FLUX.1-dev LoRA trainer (QLoRA): cached latents and text embeddings, encoders freed, then an
explicit flow-matching loop on the nf4 (or bf16) transformer, readable top to bottom.

    trainer = FluxLoraTrainer(model="tiny", work_dir=Path("runs/alice-v1"))
    result = trainer.train(items, LoraTrainConfig(max_steps=1500), name="alice_v1")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from flen_resources.models.pipelines import pick_device, pick_dtype
from flen_resources.models.sources import ResolvedModel, resolve_model
from flen_resources.trainers.cache import FeatureCache, content_key
from flen_resources.trainers.common import (
    LoraTrainConfig,
    TrainingError,
    TrainResult,
    buckets,
    check_training_set,
    fit_image,
    free_memory,
    logit_normal_sigmas,
    lora_transformer,
    nearest_bucket,
    run_training_loop,
    write_outputs,
)

__all__ = ["MODEL_KEY", "FluxLoraTrainer", "LoraTrainConfig", "TrainItem", "TrainResult", "TrainingError"]

MODEL_KEY = "flux.1-dev"


@dataclass
class TrainItem:
    """One training image and its caption (None: the default caption)."""

    image: Path
    caption: str | None = None


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
                x = p.image_processor.preprocess(fit_image(item.image, bucket), bucket[1], bucket[0])
                with torch.no_grad():
                    lat = p.vae.encode(x.to(device, dtype)).latent_dist.mode()
                lat = (lat - p.vae.config.shift_factor) * p.vae.config.scaling_factor
                return {"latents": lat[0]}

            lat = self.cache.get("latents", content_key(resolved.ref, "flux-vae", item.image, bucket), latents)
            caption = item.caption or default_caption
            examples.append({"latents": lat["latents"], **text(caption), "bucket": bucket, "caption": caption})
        samples = [{"prompt": p, **text(p)} for p in config.sample_prompts]
        del pipe
        free_memory(device)
        return examples, samples

    # -- phase 2: the transformer with a LoRA ---------------------------------------------------
    def _transformer(self, resolved: ResolvedModel, config: LoraTrainConfig, device: torch.device, dtype: torch.dtype):
        from diffusers import FluxTransformer2DModel

        return lora_transformer(FluxTransformer2DModel, resolved.path / "transformer", config, device, dtype)

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
        check_training_set(len(items), [i.image for i in items], config)
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
        run = run_training_loop(
            transformer, examples, config, self.work_dir, name, device,
            loss=lambda batch, generator: self._loss(transformer, batch, generator, config, device, dtype),
            log=self.log,
            previews=lambda step: self._samples(resolved, transformer, sample_embeds, config, step, device, dtype))

        from flen_resources.trainers.comfy import export_flux_comfyui

        return write_outputs(transformer, run, resolved.ref, config, dataset_md5, self.work_dir / "output", name,
                             "FLUX LoRA", lambda state, path, meta: export_flux_comfyui(
                                 state, transformer.config, config.alpha, path, meta),
                             started, device, self.cache)
