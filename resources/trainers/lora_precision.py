"""Mixed precision for a peft LoRA: fp32 weights, gradients and optimizer states; bf16 matmuls on a GPU.

peft casts a LoRA layer's input to its weights' dtype, so fp32 LoRA weights beside a bf16 (or fp8, nf4)
base turn every activation into an fp32 copy and run the rank-16 matmuls in fp32: on an H200 these were
~50 ms of a 0.49 s FLUX step (train_gpu's -prof variant), bound by moving fp32 activations. Here the
LoRA's Linears cast their fp32 weight to the base's compute dtype inside the forward instead (the cast is
differentiable, so the gradient still lands on the fp32 weight), as mixed-precision training does under
autocast, and peft leaves the input as it comes. Parameter names do not change, so saved LoRAs and
checkpoints are the same files.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ComputeDtypeLinear(nn.Linear):
    """An nn.Linear whose fp32 weight (and bias) is cast to `compute_dtype` for the matmul."""

    compute_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype), bias)


def lora_matmuls_in(transformer: nn.Module, dtype: torch.dtype) -> int:
    """Run every peft LoRA Linear of `transformer` in `dtype`, its weights staying as they are; how many."""
    from peft.tuners.lora import LoraLayer

    swapped = 0
    for layer in transformer.modules():
        if not isinstance(layer, LoraLayer):
            continue
        linears = [m for adapters in (layer.lora_A, layer.lora_B) for m in adapters.values()]
        if not linears or any(type(m) not in (nn.Linear, ComputeDtypeLinear) for m in linears):
            continue  # a Conv or another kind of LoRA keeps peft's cast of its input to its weights' dtype
        for linear in linears:
            linear.__class__ = ComputeDtypeLinear  # same parameters, same names: only the forward changes
            linear.compute_dtype = dtype
            swapped += 1
        layer.cast_input_dtype_enabled = False  # peft's cast of the input to the LoRA weights' dtype (fp32)
    return swapped
