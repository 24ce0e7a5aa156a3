"""Frozen base weights in fp8 (e4m3) with fp8 matmuls, for LoRA training on cards that have them (Ada, Hopper).

Every Linear of the transformer's blocks keeps its weight in e4m3 with one scale per output row
(half the bytes of bf16: FLUX.1-dev's blocks take 11 GiB, not 22). Its forward and its input-gradient
backward both run as fp8 GEMMs through `torch._scaled_mm`, with row-wise scales:

- forward:  y  = (x / sx) (W / sw)^T * sx * sw^T             x quantized per token row;
- backward: dx = ((g * sw^T) / sg) (W / sw) * sg              the weight's row scales fold into g.

No weight gradient is computed: the base is frozen, the LoRA beside it (peft) trains in fp32. The
activation's quantization (an amax and a cast) is plain pointwise code, so under torch.compile of a
block it fuses into the op before it, as torchao's float8 linear does; a separate quantization
kernel would give back most of what the fp8 GEMM wins (issue 15: 1.84x the bf16 GEMMs fused, 1.29x not).
The first and last layers of the model (embedders, output projection) stay in bf16.

An nf4 base (a model too big for fp8 within the budget, or on a host too small to quantize it) can run the same
fp8 GEMMs:
`Nf4Fp8Linear` dequantizes its nf4 weight and quantizes it to e4m3 per row at each use, so the nf4 bytes stay
the only copy on the card (bitsandbytes' own layer dequantizes to bf16 at each use the same way).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)
E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
# torch._scaled_mm on CUDA needs both sides of the GEMM in multiples of 16.
ALIGNMENT = 16


def fp8_matmuls(device: torch.device) -> bool:
    """Whether `device` runs fp8 GEMMs: CUDA compute capability 8.9 (Ada) and newer, or torch's CPU kernel."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and hasattr(torch, "_scaled_mm")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` (rows, k) in e4m3 with one fp32 scale per row (rows, 1): x ~= q * scale."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / E4M3_MAX
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


_compiled_quantize_rows = None


def _quantize_activation(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows, as one compiled kernel when a CUDA forward runs eagerly (the generator's, an uncompiled run)."""
    global _compiled_quantize_rows
    # Inside a compiled block the quantization fuses into the op before it. Run eagerly, its amax, divide, clamp
    # and cast are five kernels over the activation, which cost more than the fp8 GEMM saves; compiled on its
    # own it is one (issue 15's measurement: 1.29x the bf16 GEMM, against 1.84x fused).
    if not rows.is_cuda or torch.compiler.is_compiling():
        return quantize_rows(rows)
    if _compiled_quantize_rows is None:
        _compiled_quantize_rows = torch.compile(quantize_rows) if compiler_works(rows.device) else quantize_rows
    try:  # a compiler that works may still fail on this graph
        return _compiled_quantize_rows(rows)
    except Exception as exc:  # torch.compile needs Triton and a C compiler: without them, the eager kernels
        log.warning("fp8 layers quantize their activations eagerly (slower): torch.compile failed: %s", exc)
        _compiled_quantize_rows = quantize_rows
        return quantize_rows(rows)


def _scaled_mm(rows: torch.Tensor, b_t: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """rows (m, k), quantized here per row, @ b_t (k, n): e4m3, column-major, with column scales (1, n)."""
    m = rows.shape[0]
    pad = -m % ALIGNMENT  # CUDA's fp8 GEMM wants every dimension in multiples of 16: zero rows, cut off after
    if pad:
        rows = torch.nn.functional.pad(rows, (0, 0, 0, pad))
    q, scale = _quantize_activation(rows)
    out = torch._scaled_mm(q.contiguous(), b_t, scale_a=scale, scale_b=b_scale, out_dtype=out_dtype)
    return out[:m] if pad else out


class _Fp8Matmul(torch.autograd.Function):
    """x @ W^T with W frozen in e4m3: fp8 GEMMs forward and for the input gradient; no weight gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight, weight_scale)
        ctx.out_dtype = x.dtype
        y = _scaled_mm(x.reshape(-1, x.shape[-1]), weight.t(), weight_scale.t(), x.dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        weight, weight_scale = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1]) * weight_scale.t()  # the weight's row scales, folded into g
        ones = torch.ones(1, weight.shape[1], device=weight.device, dtype=torch.float32)
        # b must be column-major (k, n) = W (out, in) laid out by columns: a transposed copy, 1 byte per weight.
        dx = _scaled_mm(rows, weight.t().contiguous().t(), ones, ctx.out_dtype)
        return dx.reshape(*grad.shape[:-1], weight.shape[1]), None, None


class Fp8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is e4m3 with row scales; peft wraps it as it wraps any Linear.

    `compute_dtype` tells peft the dtype to give the LoRA beside it (as bitsandbytes' layers do), so the
    adapter is never cast to fp8.
    """

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.compute_dtype = compute_dtype

    @classmethod
    def from_linear(cls, linear: nn.Linear, device: torch.device) -> Fp8Linear:
        """`linear`'s weight quantized to e4m3 per output row on `device` (its bias stays in its dtype)."""
        weight = linear.weight.detach().to(device)
        q, scale = quantize_rows(weight)
        bias = linear.bias.detach().to(device) if linear.bias is not None else None
        return cls(q, scale, bias, weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Fp8Matmul.apply(x.to(self.compute_dtype), self.weight, self.weight_scale)
        return y + self.bias if self.bias is not None else y

    def dequantized(self) -> torch.Tensor:
        """The weight in compute_dtype (for tests and merging)."""
        return (self.weight.float() * self.weight_scale).to(self.compute_dtype)


class Nf4Fp8Linear(nn.Linear):
    """A frozen bitsandbytes nf4 Linear whose GEMMs run in fp8: its weight dequantized and quantized to e4m3 per
    output row at each use (under torch.compile one fused kernel beside the dequantization), then _Fp8Matmul."""

    def __init__(self, linear4bit: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear4bit.in_features, linear4bit.out_features
        self.weight = linear4bit.weight  # bitsandbytes' Params4bit: the packed nf4 bytes and their quant_state
        self.bias = linear4bit.bias
        self.compute_dtype = linear4bit.compute_dtype or torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # _Fp8Matmul saves the e4m3 weight for backward: one block's worth at a time, as every block of an nf4
        # base is checkpointed (config.auto_kept_activations); blocks kept whole would hold them all.
        weight, scale = quantize_rows(self.dequantized())
        y = _Fp8Matmul.apply(x.to(self.compute_dtype), weight, scale)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def dequantized(self) -> torch.Tensor:
        """The weight in compute_dtype, from its nf4 bytes."""
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(self.weight, self.weight.quant_state).to(self.compute_dtype)


def convertible(linear: nn.Linear) -> bool:
    """Whether _scaled_mm can take `linear`'s shape (both dimensions multiples of 16)."""
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0


def blocks_to_fp8(blocks: Iterable[nn.Module], device: torch.device, dtype: torch.dtype) -> int:
    """Move each block to `device` in `dtype`, its Linears quantized to Fp8Linear on the way; returns how many.

    One block at a time, so the card never holds more than one block in `dtype`."""
    converted = 0
    for block in blocks:
        block.to(device, dtype)  # before quantizing: Module.to(dtype) would cast e4m3 weights back up
        for _, parent in list(block.named_modules()):
            for attr, linear in list(parent.named_children()):
                if type(linear) is nn.Linear and convertible(linear):
                    setattr(parent, attr, Fp8Linear.from_linear(linear, device))
                    converted += 1
    return converted


def nf4_blocks_to_fp8_matmuls(blocks: Iterable[nn.Module]) -> int:
    """Swap each block's bitsandbytes nf4 Linears for Nf4Fp8Linear (same weights, fp8 GEMMs); returns how many."""
    from bitsandbytes.nn import Linear4bit

    swapped = 0
    for block in blocks:
        for _, parent in list(block.named_modules()):
            for attr, linear in list(parent.named_children()):
                if isinstance(linear, Linear4bit) and convertible(linear):
                    setattr(parent, attr, Nf4Fp8Linear(linear))
                    swapped += 1
    return swapped


def compute_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks (FLUX: double then single; Qwen-Image: one kind), where the compute is."""
    return [*transformer.transformer_blocks, *getattr(transformer, "single_transformer_blocks", [])]


_compiler_works: dict[str, bool] = {}  # device type -> whether torch.compile ran a kernel there


def _probe(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x * 2 - 1)


def compiler_works(device: torch.device) -> bool:
    """Whether torch.compile builds and runs a kernel on `device` (Triton and a C compiler), probed once a process."""
    if device.type not in _compiler_works:
        try:  # a plain fp32 kernel: an Ampere card compiles bf16 and nf4 blocks but cannot cast to fp8
            torch.compile(_probe)(torch.ones(16, 16, device=device))
            _compiler_works[device.type] = True
        except Exception as exc:  # noqa: BLE001 -- inductor raises many types; any of them means "run eagerly"
            log.warning("torch.compile does not work on %s, so the transformer blocks run eagerly (slower): %s",
                        device.type, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            _compiler_works[device.type] = False
    return _compiler_works[device.type]


def compiles_blocks(asked: bool, device: torch.device) -> bool:
    """Whether a transformer's blocks run compiled: asked for, on a GPU (a CPU runs eager), where torch.compile works."""
    return asked and device.type == "cuda" and compiler_works(device)


def compile_blocks(transformer: nn.Module, eager_hooks: Iterable[nn.Module] = ()) -> int:
    """torch.compile each of the transformer's blocks in place (one graph per block class); how many.

    A block in `eager_hooks` compiles its forward only, so its hooks (block_swap.BlockSwap's) run eagerly around
    the graph and the graph is entered with the weights they brought onto the card."""
    hooked = {id(block) for block in eager_hooks}
    blocks = compute_blocks(transformer)
    for block in blocks:
        if id(block) in hooked:
            block.forward = torch.compile(block.forward)
        else:
            block.compile()
    return len(blocks)


def transformer_to_fp8(transformer: nn.Module, device: torch.device, dtype: torch.dtype,
                       host_blocks: Iterable[int] = ()) -> int:
    """Every block's Linears quantized to Fp8Linear on `device` (blocks_to_fp8), the rest of `transformer` moved
    there as it is; the blocks at `host_blocks` (compute_blocks' indices) go back to the CPU once quantized, for
    block_swap.BlockSwap. How many Linears were quantized."""
    blocks = compute_blocks(transformer)
    on_host = {id(blocks[i]) for i in host_blocks}
    converted = 0
    for block in blocks:
        converted += blocks_to_fp8([block], device, dtype)
        if id(block) in on_host:
            block.to("cpu")
    if on_host:
        _to_device_except(transformer, device, on_host)
    else:
        transformer.to(device)  # no dtype: it would cast the fp8 weights back up
    return converted


def _to_device_except(module: nn.Module, device: torch.device, skipped: set[int]) -> None:
    """Module.to(device) for everything under `module` but the submodules whose id is in `skipped`."""
    for child in module.children():
        if id(child) not in skipped:
            _to_device_except(child, device, skipped)
    for param in module.parameters(recurse=False):
        param.data = param.data.to(device)
    for name, buffer in list(module.named_buffers(recurse=False)):
        setattr(module, name, buffer.to(device))
