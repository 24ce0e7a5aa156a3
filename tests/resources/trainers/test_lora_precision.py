"""The LoRA's bf16 matmuls beside fp32 weights (trainers/lora_precision.py), on the CPU's bf16 kernels."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from flen_resources.trainers.lora_precision import ComputeDtypeLinear, lora_matmuls_in


def lora_model(seed: int = 0) -> nn.Module:
    """A bf16 two-Linear model with an fp32 LoRA on both, B non-zero so that every LoRA weight has a gradient."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 32)).to(torch.bfloat16)
    model.requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]), model)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = torch.randn_like(p, dtype=torch.float32) * 0.1
    return model


def lora_grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The output and every LoRA weight's gradient for a sum-of-squares loss."""
    out = model(x)
    out.float().pow(2).sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_the_lora_runs_in_bf16_and_its_fp32_weights_keep_their_names_and_get_the_gradients():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    reference, reference_grads = lora_grads(lora_model(), x)  # peft's own way: the input cast to fp32
    model = lora_model()
    names = [n for n, _ in model.named_parameters()]

    assert lora_matmuls_in(model, torch.bfloat16) == 4  # A and B of both layers
    out, grads = lora_grads(model, x)

    assert [n for n, _ in model.named_parameters()] == names  # saved LoRAs and checkpoints keep their keys
    assert all(isinstance(m, ComputeDtypeLinear) for n, m in model.named_modules()
               if n.endswith((".lora_A.default", ".lora_B.default")))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference.float(), rtol=0.05, atol=0.05)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name  # the optimizer still steps fp32 weights
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), reference_grads[name].flatten(), dim=0)
        assert cosine > 0.99, (name, cosine)


def test_fp32_matmuls_again_give_peft_s_own_result():
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    reference, _ = lora_grads(lora_model(), x)
    model = lora_model()
    lora_matmuls_in(model, torch.bfloat16)
    lora_matmuls_in(model, torch.float32)  # what train_gpu's -lora32 variant measures
    out, _ = lora_grads(model, x)
    assert torch.equal(out, reference)


def test_a_conv_lora_is_left_to_peft_s_own_cast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.LazyLinear(4)).to(torch.bfloat16)
    model(torch.zeros(1, 3, 6, 6, dtype=torch.bfloat16))  # materialize the lazy Linear
    model.requires_grad_(False)
    model = inject_adapter_in_model(LoraConfig(r=2, target_modules=["0", "2"]), model)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    assert lora_matmuls_in(model, torch.bfloat16) == 2  # the Linear's A and B; the Conv's are not Linears
    out = model(torch.randn(1, 3, 6, 6, dtype=torch.bfloat16))  # the Conv LoRA still gets fp32 input
    assert out.dtype == torch.bfloat16
