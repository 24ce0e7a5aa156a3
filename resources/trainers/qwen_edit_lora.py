"""Qwen-Image-Edit LoRA trainer (2509 or 2511) on edit triplets: 1-3 control images, an instruction, the target.

What is Qwen-Image-Edit's own in a run of LoraTrainer (base.py), which FLUX's trainer shares:
every triplet is encoded once through QwenImageEditPlusPipeline's own encoders and cached by
content hash, and the loss runs the transformer exactly as the pipeline does:

- text: `encode_prompt(prompt, image=controls)`, so the Qwen2.5-VL encoder sees the control images
  (at the pipeline's condition size, about 384x384 px); cached as embeddings + mask, keyed by
  (model, prompt, control image contents, bucket);
- latents: the target and each control through `_encode_vae_image`, keyed by (model, image, bucket);
- one step: the noisy target tokens, then the clean tokens of each control, in one sequence;
  `img_shapes` lists the target and every control; the loss is taken on the target tokens only.
  2511's transformer (zero_cond_t) reads the same `img_shapes` to modulate the control tokens with
  timestep 0, so the one loss serves both releases: `model_key` chooses which one is trained.

Sizes: the target picks the bucket nearest its aspect ratio at `config.resolution`, and every
control of the triplet is fitted (resize to cover + centre-crop) to that same bucket. At inference
the pipeline keeps each control's own aspect ratio at about 1024x1024 px; one shared size keeps
training simple and batches uniform.

Batches: examples are grouped by (bucket, number of controls); prompt embeddings of different
lengths within a batch are zero-padded and masked (the transformer builds the joint attention
mask from `encoder_hidden_states_mask`), so batch_size > 1 works.

    trainer = QwenEditLoraTrainer(model="tiny", work_dir=Path("runs/relight-v1"), model_key="qwen-image-edit-2511")
    result = trainer.train(triplets, LoraTrainConfig(max_steps=1500), name="relight_v1")
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

from flen_resources.models.registry import DEFAULT_EDIT_MODEL, MODELS, QWEN_EDIT_MODELS
from flen_resources.models.sources import ResolvedModel
from flen_resources.trainers.base import LoraTrainer, distilled_guidance
from flen_resources.trainers.batching import buckets, check_training_set, fit_image, flow_matching_draws, image_bucket
from flen_resources.trainers.cache import content_key
from flen_resources.trainers.comfy import export_qwen_comfyui
from flen_resources.trainers.config import LoraTrainConfig, TrainingError, TrainResult

__all__ = ["MODEL_KEY", "MAX_CONTROLS", "QwenEditLoraTrainer", "LoraTrainConfig", "Triplet", "TrainResult",
           "TrainingError"]

MODEL_KEY = DEFAULT_EDIT_MODEL  # the release trained when none is named
MAX_CONTROLS = 3  # Qwen-Image-Edit (2509 and 2511) takes 1 to 3 input images


@dataclass
class Triplet:
    """One edit example: the input image(s), the instruction, and the wanted result."""

    controls: list[Path]
    prompt: str
    target: Path


def _pipeline_helpers() -> tuple[int, Callable[[int, float], tuple[int, int]]]:
    """The pipeline's condition-image area and its (area, aspect ratio) -> (width, height) rule."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    return CONDITION_IMAGE_SIZE, calculate_dimensions


def _text_encoder_quantization(config: LoraTrainConfig, device: torch.device) -> str:
    """How the text encoder loads: nf4 with an nf4 base, and with an fp8 one on a GPU (as the editor encodes)."""
    return "nf4" if config.quantization == "nf4" or (config.quantization == "fp8" and device.type == "cuda") \
        else "none"


class QwenEditLoraTrainer(LoraTrainer[Triplet]):
    """Trains an edit LoRA on one Qwen-Image-Edit release (`model_key`); one instance per run folder."""

    model_key: str = MODEL_KEY
    default_work_dir: ClassVar[Path] = Path("runs/qwen_edit")
    default_name: ClassVar[str] = "qwen_adapter"
    title: ClassVar[str] = "Qwen-Image-Edit LoRA"
    encoded: ClassVar[str] = "triplets: latents + prompts with their controls"
    group_key: ClassVar[str] = "group"  # (bucket, number of controls): the shapes a batch must share

    def __init__(self, model: str = "tiny", work_dir: Path | None = None, cache_dir: Path | None = None,
                 log: Callable[[str], None] = print, model_key: str = MODEL_KEY,
                 memory_budget_gib: float | None = None):
        if model_key not in QWEN_EDIT_MODELS:
            raise TrainingError(f"unknown Qwen-Image-Edit model {model_key!r}; known: {', '.join(QWEN_EDIT_MODELS)}")
        super().__init__(model, work_dir, cache_dir, log, memory_budget_gib)
        self.model_key = model_key  # the release whose weights `model` holds (resolve_model checks its folder)

    # -- inputs ---------------------------------------------------------------------------------
    def _check(self, triplets: Sequence[Triplet], config: LoraTrainConfig) -> None:
        for i, t in enumerate(triplets):
            n = len(t.controls)
            if not 1 <= n <= MAX_CONTROLS:
                raise TrainingError(f"triplet {i} ({Path(t.target).name}) has {n} control image(s); "
                                    f"{MODELS[self.model_key].hub_id.split('/')[-1]} takes 1 to {MAX_CONTROLS}")
            if not t.prompt or not t.prompt.strip():
                raise TrainingError(f"triplet {i} ({Path(t.target).name}) has no prompt (edit instruction)")
        files = [Path(f) for t in triplets for f in (*t.controls, t.target)]
        check_training_set(len(triplets), files, config, what="triplet")

    # -- encoding: latents per image and bucket, embeddings per prompt with its controls --------
    def _load_encoders(self, resolved: ResolvedModel, config: LoraTrainConfig, device: torch.device,
                       dtype: torch.dtype) -> Any:
        """VAE and Qwen2.5-VL; with nf4 (or fp8 on a GPU) the text encoder loads in nf4, as the editor encodes
        (about 6 GiB on the card instead of the 15.5 GiB of bf16, which would set the asset's card peak)."""
        from diffusers import QwenImageEditPlusPipeline

        from flen_resources.models.architectures import patch_qwen2vl_processor_without_torchvision
        from flen_resources.models.pipelines import nf4_config

        patch_qwen2vl_processor_without_torchvision()
        kwargs = {"quantization_config": nf4_config("QwenImageEditPlusPipeline", ["text_encoder"])} \
            if _text_encoder_quantization(config, device) == "nf4" else {}
        return QwenImageEditPlusPipeline.from_pretrained(str(resolved.path), transformer=None, dtype=dtype,
                                                         use_safetensors=True, **kwargs).to(device)

    def _encode(self, encoders: Callable[[], Any], resolved: ResolvedModel, triplets: Sequence[Triplet],
                config: LoraTrainConfig, device: torch.device, dtype: torch.dtype) -> tuple[list[dict], list[dict]]:
        condition_area, calculate_dimensions = _pipeline_helpers()
        options = buckets(config.resolution)

        def text(prompt: str, controls: list[Path], bucket: tuple[int, int]) -> dict[str, torch.Tensor]:
            def compute() -> dict[str, torch.Tensor]:
                p = encoders()
                # what the pipeline gives the VL encoder: each input image at about 384x384 px
                width, height = calculate_dimensions(condition_area, bucket[0] / bucket[1])
                images = [p.image_processor.resize(fit_image(c, bucket), height, width) for c in controls]
                with torch.no_grad():
                    embeds, mask = p.encode_prompt(prompt=prompt, image=images, device=device)
                mask = torch.ones(embeds.shape[1], dtype=torch.long) if mask is None else mask[0]
                return {"prompt_embeds": embeds[0], "prompt_mask": mask.long()}
            # the encoder's quantization is in the key: nf4 and bf16 encoders give different embeddings
            key = content_key(resolved.ref, "qwen-edit-text", prompt, *[Path(c) for c in controls], bucket,
                              condition_area, _text_encoder_quantization(config, device))
            return self.cache.get("text", key, compute)

        def latents(image: Path, bucket: tuple[int, int]) -> torch.Tensor:
            def compute() -> dict[str, torch.Tensor]:
                p = encoders()
                x = p.image_processor.preprocess(fit_image(image, bucket), bucket[1], bucket[0]).unsqueeze(2)
                with torch.no_grad():
                    lat = p._encode_vae_image(x.to(device, dtype), generator=None)  # (1, 16, 1, h, w), normalised
                return {"latents": lat[0]}
            return self.cache.get("latents", content_key(resolved.ref, "qwen-edit-vae", Path(image), bucket),
                                  compute)["latents"]

        examples = []
        for t in tqdm(triplets, desc="cache latents + text", unit="triplet", leave=False):
            bucket = image_bucket(t.target, options)  # the controls are fitted to the target's bucket
            controls = [Path(c) for c in t.controls]
            examples.append({"latents": latents(Path(t.target), bucket),
                             "controls": [latents(c, bucket) for c in controls],
                             **text(t.prompt, controls, bucket), "bucket": bucket,
                             "group": (bucket, len(controls)), "prompt": t.prompt})
        # previews: sample prompt i edits the controls of triplet i (cycling through the triplets)
        samples = []
        for i, prompt in enumerate(config.sample_prompts):
            t = triplets[i % len(triplets)]
            bucket = image_bucket(t.target, options)
            samples.append({"prompt": prompt, "controls": [Path(c) for c in t.controls], "bucket": bucket,
                            **text(prompt, [Path(c) for c in t.controls], bucket)})
        return examples, samples

    # -- the model and its loss -----------------------------------------------------------------
    def _transformer_class(self) -> Any:
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel

    @staticmethod
    def _text_batch(batch: list[dict], device: torch.device,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings zero-padded to the longest, with the mask (None when nothing is padded)."""
        length = max(b["prompt_embeds"].shape[0] for b in batch)
        embeds = torch.stack([F.pad(b["prompt_embeds"], (0, 0, 0, length - b["prompt_embeds"].shape[0]))
                              for b in batch]).to(device, dtype)
        mask = torch.stack([F.pad(b["prompt_mask"], (0, length - b["prompt_mask"].shape[0])) for b in batch])
        return embeds, (None if bool(mask.all()) else mask.to(device))

    @staticmethod
    def _loss(transformer: Any, batch: list[dict], generator: torch.Generator, config: LoraTrainConfig,
              device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Velocity MSE on the target's tokens, the clean control tokens following them in one sequence."""
        from diffusers import QwenImageEditPlusPipeline

        pack = QwenImageEditPlusPipeline._pack_latents
        latents = torch.stack([b["latents"] for b in batch]).to(device, dtype)  # (B, 16, 1, h, w)
        bsz, channels, _, height, width = latents.shape
        noise, sigmas, noisy = flow_matching_draws(latents, generator, config)
        noisy = pack(noisy, bsz, channels, height, width)
        controls, shapes = [], [(1, height // 2, width // 2)]  # token grids: target, then each control
        for i in range(len(batch[0]["controls"])):  # same count and bucket within a batch (grouped)
            control = torch.stack([b["controls"][i] for b in batch]).to(device, dtype)
            controls.append(pack(control, bsz, channels, control.shape[3], control.shape[4]))
            shapes.append((1, control.shape[3] // 2, control.shape[4] // 2))
        embeds, mask = QwenEditLoraTrainer._text_batch(batch, device, dtype)
        pred = transformer(hidden_states=torch.cat([noisy, *controls], dim=1), timestep=sigmas.to(dtype),
                           guidance=distilled_guidance(transformer, config, bsz, device, dtype),
                           encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                           img_shapes=[shapes] * bsz, return_dict=False)[0][:, :noisy.shape[1]]
        target = pack(noise - latents, bsz, channels, height, width)  # velocity, target tokens only
        return F.mse_loss(pred.float(), target.float())

    # -- previews and the ComfyUI file ----------------------------------------------------------
    def _preview_pipeline(self, resolved: ResolvedModel, transformer: Any, scheduler: Any, device: torch.device,
                          dtype: torch.dtype) -> Any:
        from diffusers import AutoencoderKLQwenImage, QwenImageEditPlusPipeline

        vae = AutoencoderKLQwenImage.from_pretrained(str(resolved.path / "vae"), dtype=dtype,
                                                     use_safetensors=True).to(device)
        return QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                         processor=None, transformer=transformer)

    def _preview(self, pipe: Any, sample: dict, seed: int, config: LoraTrainConfig, device: torch.device,
                 dtype: torch.dtype) -> Image.Image:
        """An edit of the sample's controls (no true CFG: the cached embeddings are the prompt's only)."""
        _, calculate_dimensions = _pipeline_helpers()
        bucket = sample["bucket"]
        width, height = calculate_dimensions(config.sample_size ** 2, bucket[0] / bucket[1])
        images = [fit_image(c, bucket) for c in sample["controls"]]
        return pipe(image=images, prompt_embeds=sample["prompt_embeds"][None].to(device, dtype),
                    prompt_embeds_mask=sample["prompt_mask"][None].to(device),
                    width=width, height=height, num_inference_steps=config.sample_steps,
                    true_cfg_scale=1.0, generator=torch.Generator("cpu").manual_seed(seed)).images[0]

    def _export_comfyui(self, state: dict[str, torch.Tensor], transformer: Any, config: LoraTrainConfig, path: Path,
                        metadata: dict[str, str]) -> Path:
        return export_qwen_comfyui(state, config.alpha, path, metadata)
