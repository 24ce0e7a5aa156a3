"""GPU-only: both trainers' QLoRA path (nf4 base, 8-bit AdamW, compiled blocks) and their fp8 bases on the tiny pack.
bitsandbytes needs CUDA, so CI skips these; the device machine runs them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from flen_resources.trainers.config import LoraTrainConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _config(**overrides) -> LoraTrainConfig:
    base = dict(resolution=64, rank=8, alpha=8.0, quantization="nf4", optimizer="adamw8bit", learning_rate=1e-3,
                lr_warmup_steps=0, sample_every=0, max_steps=30, checkpoint_every=15, device="cuda", compile=True)
    return LoraTrainConfig(**{**base, **overrides})


def _images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    paths = []
    for i in range(n):
        img = np.broadcast_to(rng.uniform(0, 255, 3)[None, None, :], (64, 64, 3)).copy()
        img[8 * i:8 * i + 24, 10:40] = rng.uniform(0, 255, 3)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(img.astype(np.uint8)).save(paths[-1])
    return paths


def _assert_learned(result) -> None:
    losses = [v for _, v in result.losses]
    assert all(math.isfinite(v) for v in losses), losses
    assert result.eval_loss_end < result.eval_loss_start, (result.eval_loss_start, result.eval_loss_end)
    assert result.peak_gib is not None and result.peak_gib > 0
    state = load_file(str(result.lora_path))
    assert state and all(torch.isfinite(t).all() for t in state.values())


def test_flux_qlora_learns_on_gpu(tmp_path: Path):
    from flen_resources.trainers.flux_lora import FluxLoraTrainer, TrainItem

    items = [TrainItem(p, "photo of alice_flen") for p in _images(tmp_path / "images", 4)]
    trainer = FluxLoraTrainer(model="tiny", work_dir=tmp_path / "run", log=lambda _: None)
    _assert_learned(trainer.train(items, _config(), name="alice_gpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs fp8 matmuls (Ada, Hopper)")
def test_flux_lora_on_an_fp8_base_learns_on_gpu(tmp_path: Path):
    from flen_resources.trainers.flux_lora import FluxLoraTrainer, TrainItem

    items = [TrainItem(p, "photo of alice_flen") for p in _images(tmp_path / "images", 4)]
    trainer = FluxLoraTrainer(model="tiny", work_dir=tmp_path / "run", log=lambda _: None)
    result = trainer.train(items, _config(quantization="fp8"), name="alice_fp8")
    recorded = json.loads(result.metadata["flenwheel.config"])
    assert recorded["quantization"] == "fp8"
    # every block kept, the compiled blocks recompute within torch's activation budget
    assert (recorded["kept_activations"], recorded["activation_budget"]) == ("all", 0.2)
    _assert_learned(result)


def test_the_allocator_grows_segments_in_place_on_gpu(monkeypatch):
    """torch 2.11's private allocator setter (no public one after start-up) still takes the setting."""
    from flen_resources.trainers.loop import grow_segments_in_place, set_allocator

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    try:
        assert grow_segments_in_place(torch.device("cuda")) is True
        x = torch.ones(64 << 20, device="cuda")  # a new segment, 256 MiB: made expandable
        segments = [s for s in torch.cuda.memory_snapshot() if s["total_size"] >= x.numel() * 4]
        assert segments and any(s.get("is_expandable") for s in segments), segments[:2]
        assert x.sum().item() == 64 << 20
        del x
    finally:  # the other tests in this process get the default allocator back
        torch.cuda.empty_cache()
        set_allocator("expandable_segments:False")


def _mirror_triplets(folder: Path) -> list:
    from flen_resources.trainers.qwen_edit_lora import Triplet

    paths = _images(folder, 4)
    for p in paths:
        Image.open(p).transpose(Image.FLIP_LEFT_RIGHT).save(p.with_name(p.stem + "_target.png"))
    return [Triplet([p], "mirror the image", p.with_name(p.stem + "_target.png")) for p in paths]


def test_qwen_edit_qlora_learns_on_gpu(tmp_path: Path):
    from flen_resources.trainers.qwen_edit_lora import QwenEditLoraTrainer

    trainer = QwenEditLoraTrainer(model="tiny", work_dir=tmp_path / "run", log=lambda _: None)
    _assert_learned(trainer.train(_mirror_triplets(tmp_path / "images"), _config(), name="mirror_gpu"))


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs fp8 matmuls (Ada, Hopper)")
def test_qwen_edit_lora_on_auto_swaps_an_fp8_base_and_learns_on_gpu(tmp_path: Path, monkeypatch):
    """What the qwen_adapter asset runs on an Ada or Hopper card: fp8 base, blocks in pinned host memory."""
    import flen_resources.models.quantization as quantization
    from flen_resources.trainers.qwen_edit_lora import QwenEditLoraTrainer

    monkeypatch.setattr(quantization, "host_memory_gib", lambda: 128.0)  # the rule judges Qwen's full size

    logs: list[str] = []
    trainer = QwenEditLoraTrainer(model="tiny", work_dir=tmp_path / "run", log=logs.append)
    result = trainer.train(_mirror_triplets(tmp_path / "images"),
                           _config(quantization="auto", optimizer="auto"), name="mirror_auto")
    recorded = json.loads(result.metadata["flenwheel.config"])
    assert (recorded["quantization"], recorded["swapped_blocks"]) == ("fp8", 32), "the full-size rule"
    assert any("1 of 2 blocks swap from host memory" in line for line in logs), logs  # the tiny pack's two
    _assert_learned(result)
