"""Which examples a step sees and which random draws it makes: aspect buckets, the data order of an
epoch, the batch of a micro-step, and the flow-matching noise and noise levels.

Exact resume rests on one rule: every random draw of step N (noise, timesteps) comes from a
generator seeded by (seed, N), and the data order of epoch E from (seed, E). Nothing here reads
the global RNG, so a run resumed at step N sees the batches and draws an uninterrupted run saw.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable
from pathlib import Path

import torch
from PIL import Image, ImageOps

from flen_resources.trainers.config import LoraTrainConfig, TrainingError


# -- random draws ---------------------------------------------------------------------------------
def step_generator(seed: int, step: int, salt: str = "") -> torch.Generator:
    """The generator for the random draws of one step: a pure function of (seed, step)."""
    digest = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def logit_normal_sigmas(batch: int, generator: torch.Generator, mean: float, std: float) -> torch.Tensor:
    """Flow-matching noise levels in (0, 1) from the logit-normal density (SD3, FLUX trainers)."""
    return torch.sigmoid(torch.normal(mean=mean, std=std, size=(batch,), generator=generator))


def flow_matching_draws(latents: torch.Tensor, generator: torch.Generator,
                        config: LoraTrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, sigmas, noisy latents) of one batch: noise drawn first, then the sigmas, always in this order.

    Drawn on the CPU (a generator per step, see the module's docstring), then moved to the latents'
    device and dtype; noisy = (1 - sigma) * latents + sigma * noise, so the velocity is noise - latents.
    """
    noise = torch.randn(latents.shape, generator=generator).to(latents.device, latents.dtype)
    sigmas = logit_normal_sigmas(latents.shape[0], generator, config.logit_mean, config.logit_std).to(latents.device)
    s = sigmas.view(-1, *[1] * (latents.dim() - 1)).to(latents.dtype)
    return noise, sigmas, (1.0 - s) * latents + s * noise


# -- aspect buckets -------------------------------------------------------------------------------
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


def image_bucket(path: Path, options: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of the image file at `path` (read from its header: the pixels are not decoded)."""
    with Image.open(path) as img:
        return nearest_bucket(img.width, img.height, options)


def fit_image(path: Path, size: tuple[int, int]) -> Image.Image:
    """RGB, resized to cover the bucket (width, height) and centre-cropped to it."""
    with Image.open(path) as img:
        return ImageOps.fit(img.convert("RGB"), size, Image.LANCZOS)


# -- the training set and its batches -----------------------------------------------------------
def check_training_set(n_examples: int, files: list[Path], config: LoraTrainConfig, what: str = "image") -> None:
    """At least config.min_images examples, and every file present."""
    if n_examples < config.min_images:
        raise TrainingError(f"the training set has {n_examples} {what}(s); at least {config.min_images} are needed")
    missing = [str(f) for f in files if not Path(f).is_file()]
    if missing:
        raise TrainingError(f"training images missing: {', '.join(missing[:5])}")


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=step_generator(seed, epoch, "order")).tolist()


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
