"""QwenImageEditPlusPipeline cut into its three phases, so that a batch of edits runs each phase over every edit.

Each function does what the pipeline's `__call__` does for its part (diffusers 0.42), one edit at a
time, so an edit made phase by phase is the pipeline's own edit, seed for seed:

- `encode_text`: Qwen2.5-VL over the prompt and the input images at the condition size (~384x384 px);
- `denoise`: the pipeline itself from those embeddings (VAE encoding of the inputs at the reference
  area, noise from the edit's generator, every transformer step) up to the latents;
- `decode`: the VAE from the latents to the picture.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

PIPELINE_LOGGER = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus"


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Silence a logger's warnings: the pipeline warns at every call that gets embeddings without a
    mask, which is how its own encoder returns an all-ones mask."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


_REFERENCE_AREA_LOCK = threading.Lock()


@contextmanager
def vae_reference_area(area: int | None) -> Iterator[None]:
    """The pipeline VAE-encodes its input images at `area` pixels meanwhile; None keeps its own 1024x1024."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    if area is None:
        yield
        return
    # diffusers reads the module constant at each call and takes no argument for it; the lock keeps
    # two edits of one process (threads) from saving each other's value and leaving it set.
    with _REFERENCE_AREA_LOCK:
        default = module.VAE_IMAGE_SIZE
        module.VAE_IMAGE_SIZE = area
        try:
            yield
        finally:
            module.VAE_IMAGE_SIZE = default


def encode_text(pipe: Any, images: Sequence[Image.Image], prompt: str,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(prompt embeddings, mask or None) of `prompt` with `images`, as the pipeline encodes them."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions

    condition = []
    for img in images:
        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, img.width / img.height)
        condition.append(pipe.image_processor.resize(img, height, width))
    with torch.no_grad():
        return pipe.encode_prompt(image=condition, prompt=prompt, device=device)


def denoise(pipe: Any, images: Sequence[Image.Image], text: tuple[torch.Tensor, torch.Tensor | None],
            negative: tuple[torch.Tensor, torch.Tensor | None] | None, true_cfg: float, steps: int, width: int,
            height: int, generator: torch.Generator, reference_area: int | None) -> torch.Tensor:
    """The packed latents of one edit: the pipeline's call from its text embeddings, stopped before the VAE."""
    embeds, mask = text
    negative_embeds, negative_mask = negative if negative is not None else (None, None)
    with _quiet(PIPELINE_LOGGER), vae_reference_area(reference_area):
        return pipe(image=list(images) if len(images) > 1 else images[0], prompt_embeds=embeds,
                    prompt_embeds_mask=mask, negative_prompt_embeds=negative_embeds,
                    negative_prompt_embeds_mask=negative_mask, true_cfg_scale=true_cfg, num_inference_steps=steps,
                    width=width, height=height, generator=generator, output_type="latent").images


def decode(pipe: Any, latents: torch.Tensor, width: int, height: int) -> Image.Image:
    """The picture of packed `latents`, as the pipeline's last lines make it."""
    vae = pipe.vae
    with torch.no_grad():
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.device, vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        image = vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]
