"""LoraTrainer's shared model set-up (trainers/base.py) on the tiny pack, CPU."""

from __future__ import annotations

import torch

from flen_resources.trainers.config import LoraTrainConfig

CPU = torch.device("cpu")


def test_blocks_that_keep_their_activations_give_the_gradients_of_recomputed_ones(monkeypatch):
    """LoraTrainConfig.kept_activations: the last N blocks run without checkpointing; the gradients are the same."""
    from flen_resources.models.sources import resolve_model
    from flen_resources.trainers.batching import step_generator
    from flen_resources.trainers.flux_lora import FluxLoraTrainer

    checkpointed = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda fn, *a, **k: checkpointed.append(fn) or real(fn, *a, **k))
    trainer = FluxLoraTrainer(model="tiny", log=lambda _: None)
    resolved = resolve_model("flux.1-dev", "tiny")
    example = {"latents": torch.randn(16, 8, 8, generator=torch.Generator().manual_seed(0)),
               "prompt_embeds": torch.randn(16, 64), "pooled": torch.randn(64), "bucket": (64, 64)}

    def grads(kept: int) -> tuple[list[torch.Tensor], int]:
        checkpointed.clear()
        config = LoraTrainConfig(resolution=64, rank=4, alpha=4.0, quantization="none", device="cpu",
                                 kept_activations=kept).resolved()
        module = trainer._transformer(resolved, config, CPU, torch.float32)
        FluxLoraTrainer._loss(module, [example], step_generator(0, 0), config, CPU, torch.float32).backward()
        return [p.grad for p in module.parameters() if p.requires_grad], len(checkpointed)

    (recomputed, n_all), (kept, n_kept), (every, n_none) = grads(0), grads(1), grads("all")
    blocks = n_all
    assert blocks >= 2 and n_kept == blocks - 1 and n_none == 0
    assert grads(blocks + 5)[1] == 0, "more kept blocks than the model has: all of them"
    assert all(torch.equal(a, b) for a, b in zip(recomputed, kept, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(recomputed, every, strict=True))


def test_a_negative_kept_activations_is_one_line():
    import pytest

    from flen_resources.trainers.config import TrainingError

    for bad in (-1, "lots", True):
        with pytest.raises(TrainingError, match="kept_activations must be 'auto', 'all' or 0 or more"):
            LoraTrainConfig(kept_activations=bad)
    for bad in (0, 1.5, -0.2, "half", True):
        with pytest.raises(TrainingError, match=r"activation_budget must be 'auto' or a share in \(0, 1\]"):
            LoraTrainConfig(activation_budget=bad)
    assert LoraTrainConfig(activation_budget=1).activation_budget == 1.0 and '"activation_budget": 1.0' in \
        LoraTrainConfig(activation_budget=1).to_json(), "1 and 1.0 record the same metadata"
