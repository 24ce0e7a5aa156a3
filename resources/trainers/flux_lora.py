"""FLUX.1-dev LoRA trainer (QLoRA): what is FLUX's own in a run of LoraTrainer (base.py): captioned
images in, cached VAE latents and T5 + CLIP text embeddings, FLUX's packed flow-matching loss.

    trainer = FluxLoraTrainer(model="tiny", work_dir=Path("runs/alice-v1"))
    result = trainer.train(items, LoraTrainConfig(max_steps=1500), name="alice_v1")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from flen_resources.models.sources import ResolvedModel
from flen_resources.trainers.base import LoraTrainer, distilled_guidance
from flen_resources.trainers.batching import buckets, check_training_set, fit_image, flow_matching_draws, image_bucket
from flen_resources.trainers.cache import content_key
from flen_resources.trainers.comfy import export_flux_comfyui
from flen_resources.trainers.config import LoraTrainConfig, TrainingError, TrainResult

__all__ = ["MODEL_KEY", "FluxLoraTrainer", "LoraTrainConfig", "TrainItem", "TrainResult", "TrainingError"]

MODEL_KEY = "flux.1-dev"


@dataclass
class TrainItem:
    """One training image and its caption (None: the default caption)."""

    image: Path
    caption: str | None = None


class FluxLoraTrainer(LoraTrainer[TrainItem]):
    """Trains a character LoRA on FLUX.1-dev; one instance per run folder."""

    model_key: str = MODEL_KEY
    default_work_dir: ClassVar[Path] = Path("runs/flux")
    default_name: ClassVar[str] = "lora"
    title: ClassVar[str] = "FLUX LoRA"
    encoded: ClassVar[str] = "latents + captions"
    keeps_snapshots: ClassVar[bool] = True

    def train(self, items: Sequence[TrainItem], config: LoraTrainConfig, name: str | None = None,
              default_caption: str = "", dataset_md5: str = "") -> TrainResult:
        """Train (or resume) to config.max_steps; images without a caption get `default_caption`."""
        captioned = [TrainItem(i.image, i.caption or default_caption) for i in items]
        return super().train(captioned, config, name, dataset_md5)

    # -- inputs ---------------------------------------------------------------------------------
    def _check(self, items: Sequence[TrainItem], config: LoraTrainConfig) -> None:
        check_training_set(len(items), [i.image for i in items], config)
        if any(not i.caption for i in items):
            raise TrainingError("some images have no caption and no default caption was given")

    # -- encoding: latents per image and bucket, embeddings per caption ------------------------
    def _load_encoders(self, resolved: ResolvedModel, config: LoraTrainConfig, device: torch.device,
                       dtype: torch.dtype) -> Any:
        from diffusers import FluxPipeline

        return FluxPipeline.from_pretrained(str(resolved.path), transformer=None, dtype=dtype,
                                            use_safetensors=True).to(device)

    def _encode(self, encoders: Callable[[], Any], resolved: ResolvedModel, items: Sequence[TrainItem],
                config: LoraTrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
        options = buckets(config.resolution)

        def text(prompt: str) -> dict[str, torch.Tensor]:
            def compute() -> dict[str, torch.Tensor]:
                embeds, pooled, _ = encoders().encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                             max_sequence_length=512)
                return {"prompt_embeds": embeds[0], "pooled": pooled[0]}
            return self.cache.get("text", content_key(resolved.ref, "flux-text", prompt), compute)

        def latents(image: Path, bucket: tuple[int, int]) -> torch.Tensor:
            def compute() -> dict[str, torch.Tensor]:
                p = encoders()
                x = p.image_processor.preprocess(fit_image(image, bucket), bucket[1], bucket[0])
                with torch.no_grad():
                    lat = p.vae.encode(x.to(device, dtype)).latent_dist.mode()
                lat = (lat - p.vae.config.shift_factor) * p.vae.config.scaling_factor
                return {"latents": lat[0]}
            return self.cache.get("latents", content_key(resolved.ref, "flux-vae", image, bucket), compute)["latents"]

        examples = []
        for item in tqdm(items, desc="cache latents + text", unit="img", leave=False):
            bucket = image_bucket(item.image, options)
            examples.append({"latents": latents(item.image, bucket), **text(item.caption), "bucket": bucket,
                             "caption": item.caption})
        samples = [{"prompt": p, **text(p)} for p in config.sample_prompts]
        return examples, samples

    # -- the model and its loss -----------------------------------------------------------------
    def _transformer_class(self) -> Any:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    @staticmethod
    def _loss(transformer: Any, batch: list[dict], generator: torch.Generator, config: LoraTrainConfig,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """FLUX's velocity MSE on 2x2-packed latent tokens, with T5 + CLIP embeddings and the guidance input."""
        from diffusers import FluxPipeline

        latents = torch.stack([b["latents"] for b in batch]).to(device, dtype)
        bsz, channels, height, width = latents.shape
        noise, sigmas, noisy = flow_matching_draws(latents, generator, config)
        packed = FluxPipeline._pack_latents(noisy, bsz, channels, height, width)
        img_ids = FluxPipeline._prepare_latent_image_ids(bsz, height // 2, width // 2, device, dtype)
        embeds = torch.stack([b["prompt_embeds"] for b in batch]).to(device, dtype)
        pooled = torch.stack([b["pooled"] for b in batch]).to(device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        pred = transformer(hidden_states=packed, timestep=sigmas.to(dtype),
                           guidance=distilled_guidance(transformer, config, bsz, device, dtype),
                           pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids,
                           img_ids=img_ids, return_dict=False)[0]
        target = FluxPipeline._pack_latents(noise - latents, bsz, channels, height, width)  # velocity
        return F.mse_loss(pred.float(), target.float())

    # -- previews and the ComfyUI file ----------------------------------------------------------
    def _preview_pipeline(self, resolved: ResolvedModel, transformer: Any, scheduler: Any, device: torch.device,
                          dtype: torch.dtype) -> Any:
        from diffusers import AutoencoderKL, FluxPipeline

        vae = AutoencoderKL.from_pretrained(str(resolved.path / "vae"), dtype=dtype, use_safetensors=True).to(device)
        return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, text_encoder_2=None,
                            tokenizer_2=None, transformer=transformer)

    def _preview(self, pipe: Any, sample: dict, seed: int, config: LoraTrainConfig, device: torch.device,
                 dtype: torch.dtype) -> Image.Image:
        return pipe(prompt_embeds=sample["prompt_embeds"][None].to(device, dtype),
                    pooled_prompt_embeds=sample["pooled"][None].to(device, dtype),
                    width=config.sample_size, height=config.sample_size,
                    num_inference_steps=config.sample_steps, guidance_scale=3.5,
                    generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    def _export_comfyui(self, state: dict[str, torch.Tensor], transformer: Any, config: LoraTrainConfig, path: Path,
                        metadata: dict[str, str]) -> Path:
        return export_flux_comfyui(state, transformer.config, config.alpha, path, metadata)
