"""Qwen-Image-Edit-2509 LoRA trainer on edit triplets: 1-3 control images, an instruction, the target.

Same structure as the FLUX trainer (flux_lora.py), and the same loop (common.run_training_loop):
phase 1 encodes every triplet once through QwenImageEditPlusPipeline's own encoders and caches
the results by content hash, then frees the encoders; phase 2 trains a peft LoRA on the (nf4 on
CUDA, or plain) transformer with an explicit flow-matching loop, exactly as the pipeline runs it:

- text: `encode_prompt(prompt, image=controls)`, so the Qwen2.5-VL encoder sees the control images
  (at the pipeline's condition size, about 384x384 px); cached as embeddings + mask, keyed by
  (model, prompt, control image contents, bucket);
- latents: the target and each control through `_encode_vae_image`, keyed by (model, image, bucket);
- one step: the noisy target tokens, then the clean tokens of each control, in one sequence;
  `img_shapes` lists the target and every control; the loss is taken on the target tokens only.

Sizes: the target picks the bucket nearest its aspect ratio at `config.resolution`, and every
control of the triplet is fitted (resize to cover + centre-crop) to that same bucket. At inference
the pipeline keeps each control's own aspect ratio at about 1024x1024 px; one shared size keeps
training simple and batches uniform.

Batches: examples are grouped by (bucket, number of controls); prompt embeddings of different
lengths within a batch are zero-padded and masked (the transformer builds the joint attention
mask from `encoder_hidden_states_mask`), so batch_size > 1 works.

    trainer = QwenEditLoraTrainer(model="tiny", work_dir=Path("runs/relight-v1"))
    result = trainer.train(triplets, LoraTrainConfig(max_steps=1500), name="relight_v1")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
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

__all__ = ["MODEL_KEY", "MAX_CONTROLS", "QwenEditLoraTrainer", "LoraTrainConfig", "Triplet", "TrainResult",
           "TrainingError"]

MODEL_KEY = "qwen-image-edit-2509"
MAX_CONTROLS = 3  # Qwen-Image-Edit-2509 takes 1 to 3 input images


@dataclass
class Triplet:
    """One edit example: the input image(s), the instruction, and the wanted result."""

    controls: list[Path]
    prompt: str
    target: Path


def _pipeline_helpers():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    return CONDITION_IMAGE_SIZE, calculate_dimensions


class QwenEditLoraTrainer:
    """Trains an edit LoRA on Qwen-Image-Edit-2509; one instance per run folder."""

    def __init__(self, model: str = "tiny", work_dir: Path = Path("runs/qwen_edit"), cache_dir: Path | None = None,
                 log: Callable[[str], None] = print):
        self.model_source = model
        self.work_dir = Path(work_dir)
        self.cache = FeatureCache(cache_dir or self.work_dir / "cache")
        self.log = log

    # -- input checks ---------------------------------------------------------------------------
    @staticmethod
    def _check(triplets: list[Triplet], config: LoraTrainConfig) -> None:
        for i, t in enumerate(triplets):
            n = len(t.controls)
            if not 1 <= n <= MAX_CONTROLS:
                raise TrainingError(f"triplet {i} ({Path(t.target).name}) has {n} control image(s); "
                                    f"Qwen-Image-Edit-2509 takes 1 to {MAX_CONTROLS}")
            if not t.prompt or not t.prompt.strip():
                raise TrainingError(f"triplet {i} ({Path(t.target).name}) has no prompt (edit instruction)")
        files = [Path(f) for t in triplets for f in (*t.controls, t.target)]
        check_training_set(len(triplets), files, config, what="triplet")

    # -- phase 1: encode everything once, then free the encoders ------------------------------
    def _encode(self, resolved: ResolvedModel, triplets: list[Triplet], config: LoraTrainConfig,
                device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
        from diffusers import QwenImageEditPlusPipeline

        from flen_resources.models.architectures import patch_qwen2vl_processor_without_torchvision

        condition_area, calculate_dimensions = _pipeline_helpers()
        options = buckets(config.resolution)
        pipe = None

        def encoders():
            nonlocal pipe
            if pipe is None:  # loaded only on a cache miss
                patch_qwen2vl_processor_without_torchvision()
                pipe = QwenImageEditPlusPipeline.from_pretrained(str(resolved.path), transformer=None, dtype=dtype,
                                                                 use_safetensors=True).to(device)
            return pipe

        def text(prompt: str, controls: list[Path], bucket: tuple[int, int]) -> dict[str, torch.Tensor]:
            def compute():
                p = encoders()
                # what the pipeline gives the VL encoder: each input image at about 384x384 px
                width, height = calculate_dimensions(condition_area, bucket[0] / bucket[1])
                images = [p.image_processor.resize(fit_image(c, bucket), height, width) for c in controls]
                with torch.no_grad():
                    embeds, mask = p.encode_prompt(prompt=prompt, image=images, device=device)
                mask = torch.ones(embeds.shape[1], dtype=torch.long) if mask is None else mask[0]
                return {"prompt_embeds": embeds[0], "prompt_mask": mask.long()}
            key = content_key(resolved.ref, "qwen-edit-text", prompt, *[Path(c) for c in controls], bucket,
                              condition_area)
            return self.cache.get("text", key, compute)

        def latents(image: Path, bucket: tuple[int, int]) -> torch.Tensor:
            def compute():
                p = encoders()
                x = p.image_processor.preprocess(fit_image(image, bucket), bucket[1], bucket[0]).unsqueeze(2)
                with torch.no_grad():
                    lat = p._encode_vae_image(x.to(device, dtype), generator=None)  # (1, 16, 1, h, w), normalised
                return {"latents": lat[0]}
            return self.cache.get("latents", content_key(resolved.ref, "qwen-edit-vae", Path(image), bucket),
                                  compute)["latents"]

        def target_bucket(t: Triplet) -> tuple[int, int]:
            from PIL import Image

            with Image.open(t.target) as img:
                return nearest_bucket(img.width, img.height, options)

        examples = []
        for t in tqdm(triplets, desc="cache latents + text", unit="triplet", leave=False):
            bucket = target_bucket(t)
            controls = [Path(c) for c in t.controls]
            examples.append({"latents": latents(Path(t.target), bucket),
                             "controls": [latents(c, bucket) for c in controls],
                             **text(t.prompt, controls, bucket), "bucket": bucket,
                             "group": (bucket, len(controls)), "prompt": t.prompt})
        # previews: sample prompt i edits the controls of triplet i (cycling through the triplets)
        samples = []
        for i, prompt in enumerate(config.sample_prompts):
            t = triplets[i % len(triplets)]
            bucket = target_bucket(t)
            samples.append({"prompt": prompt, "controls": [Path(c) for c in t.controls], "bucket": bucket,
                            **text(prompt, [Path(c) for c in t.controls], bucket)})
        del pipe
        free_memory(device)
        return examples, samples

    # -- phase 2: the transformer with a LoRA ---------------------------------------------------
    def _transformer(self, resolved: ResolvedModel, config: LoraTrainConfig, device: torch.device, dtype: torch.dtype):
        from diffusers import QwenImageTransformer2DModel

        return lora_transformer(QwenImageTransformer2DModel, resolved.path / "transformer", config, device, dtype)

    # -- one step of the loss -------------------------------------------------------------------
    @staticmethod
    def _text_batch(batch: list[dict], device: torch.device, dtype: torch.dtype):
        """Prompt embeddings zero-padded to the longest, with the mask (None when nothing is padded)."""
        length = max(b["prompt_embeds"].shape[0] for b in batch)
        embeds = torch.stack([F.pad(b["prompt_embeds"], (0, 0, 0, length - b["prompt_embeds"].shape[0]))
                              for b in batch]).to(device, dtype)
        mask = torch.stack([F.pad(b["prompt_mask"], (0, length - b["prompt_mask"].shape[0])) for b in batch])
        return embeds, (None if bool(mask.all()) else mask.to(device))

    @staticmethod
    def _loss(transformer, batch: list[dict], generator: torch.Generator, config: LoraTrainConfig,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        from diffusers import QwenImageEditPlusPipeline

        pack = QwenImageEditPlusPipeline._pack_latents
        latents = torch.stack([b["latents"] for b in batch]).to(device, dtype)  # (B, 16, 1, h, w)
        bsz, channels, _, height, width = latents.shape
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        sigmas = logit_normal_sigmas(bsz, generator, config.logit_mean, config.logit_std).to(device)
        s = sigmas.view(bsz, 1, 1, 1, 1).to(dtype)
        noisy = pack((1.0 - s) * latents + s * noise, bsz, channels, height, width)
        controls, shapes = [], [(1, height // 2, width // 2)]  # token grids: target, then each control
        for i in range(len(batch[0]["controls"])):  # same count and bucket within a batch (grouped)
            control = torch.stack([b["controls"][i] for b in batch]).to(device, dtype)
            controls.append(pack(control, bsz, channels, control.shape[3], control.shape[4]))
            shapes.append((1, control.shape[3] // 2, control.shape[4] // 2))
        embeds, mask = QwenEditLoraTrainer._text_batch(batch, device, dtype)
        guidance = torch.full((bsz,), config.guidance, device=device, dtype=dtype) \
            if transformer.config.guidance_embeds else None
        pred = transformer(hidden_states=torch.cat([noisy, *controls], dim=1), timestep=sigmas.to(dtype),
                           guidance=guidance, encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                           img_shapes=[shapes] * bsz, return_dict=False)[0][:, :noisy.shape[1]]
        target = pack(noise - latents, bsz, channels, height, width)  # velocity, target tokens only
        return F.mse_loss(pred.float(), target.float())

    # -- previews -------------------------------------------------------------------------------
    def _samples(self, resolved: ResolvedModel, transformer, samples: list[dict], config: LoraTrainConfig,
                 step: int, device: torch.device, dtype: torch.dtype) -> list[Path]:
        """Edits with the LoRA as trained so far (no true CFG: the cached embeddings are the prompt's only)."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline

        if not samples:
            return []
        _, calculate_dimensions = _pipeline_helpers()
        vae = AutoencoderKLQwenImage.from_pretrained(str(resolved.path / "vae"), dtype=dtype,
                                                     use_safetensors=True).to(device)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(resolved.path / "scheduler"))
        pipe = QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                         processor=None, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        transformer.eval()
        paths = []
        with torch.no_grad():
            for i, sample in enumerate(samples):
                bucket = sample["bucket"]
                width, height = calculate_dimensions(config.sample_size ** 2, bucket[0] / bucket[1])
                images = [fit_image(c, bucket) for c in sample["controls"]]
                for seed in config.sample_seeds:
                    image = pipe(image=images, prompt_embeds=sample["prompt_embeds"][None].to(device, dtype),
                                 prompt_embeds_mask=sample["prompt_mask"][None].to(device),
                                 width=width, height=height, num_inference_steps=config.sample_steps,
                                 true_cfg_scale=1.0, generator=torch.Generator("cpu").manual_seed(seed)).images[0]
                    path = self.work_dir / "samples" / f"step-{step:06d}-p{i}-s{seed}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    image.save(path)
                    paths.append(path)
        transformer.train()
        del pipe, vae
        return paths

    # -- the run --------------------------------------------------------------------------------
    def train(self, triplets: list[Triplet], config: LoraTrainConfig, name: str = "qwen_adapter",
              dataset_md5: str = "") -> TrainResult:
        """Train (or resume) to config.max_steps; returns the LoRA files, loss curve and samples."""
        self._check(triplets, config)
        started = time.time()
        device = pick_device(config.device)
        dtype = pick_dtype(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        resolved = resolve_model(MODEL_KEY, self.model_source)
        self.work_dir.mkdir(parents=True, exist_ok=True)

        examples, sample_embeds = self._encode(resolved, triplets, config, device, dtype)
        self.log(f"cached {len(examples)} triplets: latents + prompts with their controls ({self.cache.hits} hits, "
                 f"{self.cache.misses} computed); encoders freed")
        transformer = self._transformer(resolved, config, device, dtype)
        run = run_training_loop(
            transformer, examples, config, self.work_dir, name, device,
            loss=lambda batch, generator: self._loss(transformer, batch, generator, config, device, dtype),
            log=self.log, group_key="group",
            previews=lambda step: self._samples(resolved, transformer, sample_embeds, config, step, device, dtype))

        from flen_resources.trainers.comfy import export_qwen_comfyui

        return write_outputs(transformer, run, resolved.ref, config, dataset_md5, self.work_dir / "output", name,
                             "Qwen-Image-Edit LoRA", lambda state, path, meta: export_qwen_comfyui(
                                 state, config.alpha, path, meta),
                             started, device, self.cache)
