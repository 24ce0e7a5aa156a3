"""Training attention: the cuDNN route for LoRA steps (trainers/attention.py).

The settings tests run anywhere; the kernel tests need a CUDA GPU (marked gpu, CI skips them,
the device machine runs them). The FLUX test is the reproducer of torch 2.11's cuDNN fault:
full-width blocks without checkpointing, where torch's own SDPA route to cuDNN faults."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flen_resources.trainers.attention import cudnn_attention, training_attention, use_attention

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _registered():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    return _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_CUDNN]


def test_training_attention_swaps_the_cudnn_backend_and_restores_everything():
    before = _registered(), torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()
    with training_attention("cudnn", torch.device("cuda")):
        assert _registered() is cudnn_attention
        assert not torch.backends.cuda.cudnn_sdp_enabled()  # torch's cuDNN route is the one that faults
        assert torch.backends.cuda.flash_sdp_enabled()
    assert (_registered(), torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled()) == before


def test_flash_training_and_the_cpu_leave_diffusers_backend_alone():
    before = _registered()
    with training_attention("flash", torch.device("cuda")):
        assert _registered() is before
    with training_attention("cudnn", torch.device("cpu")):
        assert _registered() is before


def test_a_masked_training_call_goes_to_torch_sdpa_with_its_mask():
    """cuDNN's direct route takes no mask: such a call (Qwen batches of padded prompts) is handed
    to diffusers' default backend, where torch's SDPA applies the mask."""
    q, k, v = (torch.randn(2, 12, 2, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 9:] = False
    with training_attention("cudnn", torch.device("cuda")):  # only swaps settings: runs on a CPU
        out = cudnn_attention(q, k, v, attn_mask=mask)
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)),
                                              attn_mask=mask[:, None, None, :]).transpose(1, 2)
    torch.testing.assert_close(out, expected)


def test_use_attention_sets_the_backend_on_a_gpu_only():
    from diffusers import FluxTransformer2DModel

    from flen_resources.models.architectures import FLUX_TRANSFORMER

    module = FluxTransformer2DModel(**FLUX_TRANSFORMER["tiny"])
    use_attention(module, "cudnn", torch.device("cpu"))
    assert all(getattr(m.processor, "_attention_backend", None) is None for m in module.modules() if hasattr(m, "processor"))
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    default = _AttentionBackendRegistry._active_backend
    use_attention(module, "cudnn", torch.device("cuda"))
    assert _AttentionBackendRegistry._active_backend == default  # other models keep theirs
    backends = {m.processor._attention_backend for m in module.modules() if hasattr(m, "processor")}
    assert backends == {"_native_cudnn"}


def _qkv(seed: int, shape=(2, 640, 4, 64)) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("scale", [None, 0.1])
@pytest.mark.gpu
@needs_gpu
def test_cudnn_attention_matches_fp32_attention_forward_and_backward(scale):
    qkv = _qkv(0)
    grad = torch.randn_like(qkv[0])
    with training_attention("cudnn", torch.device("cuda")):
        out = cudnn_attention(*qkv, scale=scale)
    out.backward(grad)
    ref = [x.detach().float().requires_grad_() for x in qkv]
    with sdpa_kernel(SDPBackend.MATH):
        expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in ref), scale=scale).transpose(1, 2)
    expected.backward(grad.float())
    assert out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(qkv, ref):
        torch.testing.assert_close(got.grad.float(), want.grad, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@needs_gpu
def test_full_width_flux_blocks_train_with_cudnn_as_with_flash():
    """One double and one single FLUX block at full width, no checkpointing: torch's SDPA route to
    cuDNN faults here on torch 2.11; ours trains and gives flash's LoRA gradients."""
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from flen_resources.models.architectures import FLUX_TRANSFORMER
    from flen_resources.trainers.batching import step_generator
    from flen_resources.trainers.config import LoraTrainConfig
    from flen_resources.trainers.flux_lora import FluxLoraTrainer

    config = LoraTrainConfig(resolution=1024, device="cuda")
    torch.manual_seed(0)
    with torch.device("cuda"):
        module = FluxTransformer2DModel(**{**FLUX_TRANSFORMER["full"], "num_layers": 1, "num_single_layers": 1})
    module.to(torch.bfloat16).requires_grad_(False)
    module.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=config.target_modules))
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            torch.nn.init.normal_(p, std=0.02)  # B is zero at init: give every LoRA tensor a gradient
    g = torch.Generator().manual_seed(0)
    example = {"latents": torch.randn(16, 128, 128, generator=g), "prompt_embeds": torch.randn(512, 4096, generator=g),
               "pooled": torch.randn(768, generator=g), "bucket": (1024, 1024)}

    def grads(attention: str) -> list[torch.Tensor]:
        module.zero_grad(set_to_none=True)
        module.set_attention_backend("_native_cudnn" if attention == "cudnn" else "native")
        with training_attention(attention, torch.device("cuda")):
            for step in range(2):  # a second step: the fault came from backward after another block's forward
                FluxLoraTrainer._loss(module, [example], step_generator(0, 0), config, torch.device("cuda"),
                                      torch.bfloat16).backward()
        torch.cuda.synchronize()
        return [p.grad.clone() for p in module.parameters() if p.requires_grad]

    cudnn, flash = grads("cudnn"), grads("flash")
    assert all(torch.isfinite(x).all() for x in cudnn)
    cos = [F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in zip(cudnn, flash)]
    assert min(cos) > 0.99, min(cos)


def test_an_unknown_attention_kernel_is_refused_by_name():
    from flen_resources.trainers.config import LoraTrainConfig, TrainingError

    with pytest.raises(TrainingError, match="'sdpa'"):
        LoraTrainConfig(attention="sdpa")


def test_auto_is_flash_off_a_gpu_and_a_named_kernel_is_kept():
    from flen_resources.trainers.attention import pick_attention

    assert pick_attention("auto", torch.device("cpu")) == "flash"
    assert pick_attention("cudnn", torch.device("cpu")) == "cudnn"
    assert pick_attention("flash", torch.device("cuda")) == "flash"


@pytest.mark.gpu
@needs_gpu
def test_auto_is_cudnn_on_hopper_and_newer():
    from flen_resources.trainers.attention import pick_attention

    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert pick_attention("auto", torch.device("cuda")) == ("cudnn" if hopper else "flash")
