"""Fixtures for the bad-input tests: the tiny pack, copies of its folders, an empty offline HF cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flen_resources.models.tiny_pack import ensure_tiny_pack

QWEN = "qwen-image-edit-2509"
QWEN_HUB = "Qwen/Qwen-Image-Edit-2509"
FLUX = "flux.1-dev"
FLUX_HUB = "black-forest-labs/FLUX.1-dev"


@pytest.fixture(scope="session")
def tiny_pack() -> Path:
    """The embedded tiny pack in the default models folder (built once, ~10 s, then reused)."""
    return ensure_tiny_pack()


@pytest.fixture
def qwen_folder(tiny_pack: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny pack's Qwen-Image-Edit pipeline folder (4 MB)."""
    dest = tmp_path / "qwen-edit-copy"
    shutil.copytree(tiny_pack / QWEN, dest)
    return dest


@pytest.fixture
def offline_empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE=1 with HF_HOME / HF_HUB_CACHE on an empty folder.

    huggingface_hub reads these variables once, at import, into `huggingface_hub.constants`;
    the code under test reads `constants.*` at call time, so both are patched.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def write_lora(path: Path, modules: list[str], rank: int = 2, dim: int = 64, seed: int = 0) -> Path:
    """A small diffusers-style LoRA (lora_A / lora_B per module) with random tensors."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module in modules:
        tensors[f"{module}.lora_A.weight"] = torch.randn(rank, dim, generator=gen)
        tensors[f"{module}.lora_B.weight"] = torch.randn(dim, rank, generator=gen)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="session")
def make_lora():
    """`write_lora` for tests that build their own LoRA files."""
    return write_lora


@pytest.fixture(scope="session")
def flux_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX-style LoRA: double and single transformer blocks, diffusers keys."""
    modules = [f"transformer.{blocks}.{i}.attn.{target}"
               for blocks in ("transformer_blocks", "single_transformer_blocks") for i in range(2)
               for target in ("to_q", "to_k", "to_v")]
    return write_lora(tmp_path_factory.mktemp("loras") / "flux_character.safetensors", modules)
