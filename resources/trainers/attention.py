"""The attention kernel a LoRA step runs on a GPU.

Attention is a third of a FLUX step, and on Hopper cuDNN's kernels run its backward at about
1.7x flash's (benchmarks/kernels_gpu.py: 1.9 vs 3.3 ms per FLUX layer, forward + backward, H100).
torch's own SDPA route to cuDNN cannot train FLUX on torch 2.11, though: its cuDNN backward faults
("illegal memory access"; "mha_graph.execute ... is_good()" with CUDA_LAUNCH_BLOCKING) in a full
FLUX step, compiled or eager, and in one double + one single full-width block without gradient
checkpointing (with it, that pair trains), contiguous q/k/v or not; one attention layer alone
does not fault. Calling the same cuDNN kernels directly, with contiguous q/k/v and an output
gradient laid out like the output, trains every configuration that faulted (H100, cuDNN 9.19).

So `attention="cudnn"` (what "auto", the default, picks on Hopper and newer GPUs, where it was
measured; older GPUs get flash) gives the transformer diffusers' `_native_cudnn` backend
and, while `training_attention` is open, that backend's implementation is `cudnn_attention`
below. A call without gradients (previews) goes to the implementation diffusers registered (cuDNN
forward, which works); a training call it does not cover (an attention mask, dropout, causal,
context parallel) to diffusers' default backend, where torch picks flash or memory-efficient
attention (torch's cuDNN route stays off while training: it is the one that faults).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


class _CudnnAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v on cuDNN's kernels; q, k, v as (batch, heads, seq, dim)."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scale: float | None) -> torch.Tensor:
        query, key, value = (x.contiguous() for x in (query, key, value))
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, False, False, scale=scale)
        ctx.save_for_backward(query, key, value, out, lse, cum_q, cum_k, seed, offset)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):
        query, key, value, out, lse, cum_q, cum_k, seed, offset = ctx.saved_tensors
        # cuDNN reads the output gradient with the output's strides
        grad = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device).copy_(grad_out)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            grad, query, key, value, out, lse, seed, offset, None, cum_q, cum_k, ctx.max_q, ctx.max_k, 0.0, False,
            scale=ctx.scale)
        return dq, dk, dv, None


def cudnn_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                    scale: float | None = None, enable_gqa: bool = False, return_lse: bool = False,
                    _parallel_config: Any = None) -> torch.Tensor:
    """diffusers' `_native_cudnn` backend for training: (batch, seq, heads, dim) in and out."""
    trains = torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
    covered = attn_mask is None and not (dropout_p or is_causal or enable_gqa or return_lse or _parallel_config)
    if trains and covered:
        out = _CudnnAttention.apply(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale)
        return out.transpose(1, 2)
    fallback = _fallbacks["train" if trains else "no_grad"]
    return fallback(query=query, key=key, value=value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, return_lse=return_lse,
                    _parallel_config=_parallel_config)


# Set by training_attention: diffusers' registered `_native_cudnn` ("no_grad") and default ("train").
_fallbacks: dict[str, Callable[..., torch.Tensor]] = {}


def pick_attention(attention: str, device: torch.device) -> str:
    """"auto" is cuDNN on Hopper and newer (measured there: benchmarks/kernels_gpu.py), flash elsewhere."""
    if attention != "auto":
        return attention
    if device.type != "cuda":
        return "flash"
    return "cudnn" if torch.cuda.get_device_capability(device) >= (9, 0) else "flash"


@contextmanager
def training_attention(attention: str, device: torch.device) -> Iterator[None]:
    """While inside, a GPU trains with `attention` ("auto", "cudnn" or "flash"); the process's
    settings come back on exit, so generation that follows keeps its own.

    torch's SDPA keeps cuDNN off (its cuDNN route is the one that faults) and flash on: that is the
    "flash" setting, and where "cudnn" hands a call back (an attention mask, say) torch picks
    flash or memory-efficient attention for it.
    """
    if device.type != "cuda":
        yield
        return
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    attention = pick_attention(attention, device)
    backends = _AttentionBackendRegistry._backends
    name = AttentionBackendName._NATIVE_CUDNN
    flags = torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    registered = backends[name]
    torch.backends.cuda.enable_cudnn_sdp(False)
    torch.backends.cuda.enable_flash_sdp(True)
    if attention == "cudnn" and registered is not cudnn_attention:
        _fallbacks.update(no_grad=registered, train=backends[AttentionBackendName.NATIVE])
        backends[name] = cudnn_attention
    try:
        yield
    finally:
        backends[name] = registered
        torch.backends.cuda.enable_cudnn_sdp(flags[0])
        torch.backends.cuda.enable_flash_sdp(flags[1])


def use_attention(transformer: torch.nn.Module, attention: str, device: torch.device) -> None:
    """Point the transformer's attention at diffusers' cuDNN backend when training with cuDNN on a GPU."""
    if device.type == "cuda" and pick_attention(attention, device) == "cudnn":
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        default = _AttentionBackendRegistry._active_backend
        transformer.set_attention_backend("_native_cudnn")
        # set_attention_backend also makes it every other model's default in this process: undo that
        _AttentionBackendRegistry.set_active_backend(default)
