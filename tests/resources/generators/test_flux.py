"""FLUX generation on the tiny pack, with a character LoRA in diffusers key style."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flen_resources.generators.flux import FluxGenerator

KW = dict(width=64, height=64, steps=2, max_sequence_length=64)


@pytest.fixture(scope="module")
def generator() -> FluxGenerator:
    return FluxGenerator(model="tiny")


def _flux_lora(generator: FluxGenerator, path, rank: int = 4) -> None:
    """A random LoRA on the tiny FLUX transformer's attention, in diffusers/peft key style."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in generator.pipe.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")) and isinstance(module, torch.nn.Linear):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.5
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.5
    save_file(tensors, str(path))


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_generates_one_image_per_seed_deterministically(generator):
    a = generator.generate("photo of alice_flen", [1, 2], **KW)
    b = generator.generate("photo of alice_flen", [1], **KW)
    assert [g.seed for g in a] == [1, 2] and a[0].image.size == (64, 64)
    assert np.array_equal(_arr(a[0].image), _arr(b[0].image))
    assert not np.array_equal(_arr(a[0].image), _arr(a[1].image))
    assert a[0].model.startswith("tiny/flux.1-dev@")


def test_character_lora_changes_output_and_weight_matters(generator, tmp_path):
    path = tmp_path / "alice_v1.safetensors"
    _flux_lora(generator, path)
    base = generator.generate("photo of alice_flen", [3], **KW)[0]
    full = generator.generate("photo of alice_flen", [3], lora=path, lora_weight=1.0, **KW)[0]
    half = generator.generate("photo of alice_flen", [3], lora=path, lora_weight=0.5, **KW)[0]
    assert full.adapters[0]["key_style"] == "diffusers" and full.adapters[0]["weight"] == 1.0
    assert np.abs(_arr(base.image) - _arr(full.image)).mean() > 0.5
    assert not np.array_equal(_arr(full.image), _arr(half.image))
    off = generator.generate("photo of alice_flen", [3], **KW)[0]
    assert np.array_equal(_arr(base.image), _arr(off.image)), "no LoRA: the base model again"


def test_bad_sizes_and_empty_prompt(generator):
    with pytest.raises(ValueError, match="multiples of 16"):
        generator.generate("x", [1], width=70, height=64, steps=1)
    with pytest.raises(ValueError, match="prompt is required"):
        generator.generate("", [1], **KW)
