"""The fp8 base-weight path (models/fp8_linear.py) on torch's CPU fp8 kernel: the GEMMs' numerics, peft's
LoRA beside an fp8 Linear, LoRA gradients of full-width FLUX blocks against bf16, a tiny-pack run, and the
rule that picks fp8 (models/quantization.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig
from torch.nn.attention import SDPBackend

from flen_resources.models.fp8_linear import (
    E4M3,
    Fp8Linear,
    _quantize_activation,
    blocks_to_fp8,
    fp8_matmuls,
    quantize_rows,
)
from flen_resources.models.quantization import FP8_TRAINING_RESERVE_GIB, fp8_fits, pick_quantization_with_fp8
from flen_resources.models.registry import MODELS
from flen_resources.trainers.config import LoraTrainConfig, TrainingError

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not fp8_matmuls(CPU), reason="this torch has no CPU fp8 GEMM (torch._scaled_mm)")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


def test_rows_quantize_to_e4m3_within_its_precision():
    x = torch.randn(8, 64) * torch.logspace(-3, 3, 8)[:, None]  # rows six orders of magnitude apart
    q, scale = quantize_rows(x)
    assert q.dtype == E4M3 and scale.shape == (8, 1)
    back = q.float() * scale
    assert ((back - x).abs() <= x.abs() * 2**-3 + scale * 2**-9).all()  # 3 mantissa bits: within 1/16 relative


def test_fp8_linear_matches_bf16_forward_and_input_gradient_and_gives_the_weight_none():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 512).to(torch.bfloat16)
    fp8 = Fp8Linear.from_linear(linear, CPU)
    assert fp8.weight.dtype == E4M3 and not fp8.weight.requires_grad and fp8.weight.numel() == 256 * 512
    x = torch.randn(2, 99, 256, dtype=torch.bfloat16, requires_grad=True)  # 198 rows: padded to 208 for the GEMM
    ref = x.detach().clone().requires_grad_(True)
    y, y_ref = fp8(x), linear(ref)
    assert y.shape == y_ref.shape and y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert _cos(y, y_ref) > 0.998 and _cos(x.grad, ref.grad) > 0.998
    assert fp8.weight.grad is None


def test_peft_wraps_an_fp8_linear_with_a_bf16_lora_that_trains():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32)).to(torch.bfloat16)
    assert blocks_to_fp8([model], CPU, torch.bfloat16) == 2
    from peft import get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]))
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    # compute_dtype (bf16), which peft upcasts to fp32 for training: never the base weight's fp8
    assert lora and all(p.dtype == torch.float32 for p in lora), [p.dtype for p in lora]
    peft_model(torch.randn(4, 64, dtype=torch.bfloat16)).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)


def _lora_grads(module: torch.nn.Module, loss, config: LoraTrainConfig) -> dict[str, torch.Tensor]:
    """The gradients of a fresh r16 LoRA on `module` (every tensor drawn nonzero, the same draws for any base)."""
    torch.manual_seed(1)
    module.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                  target_modules=config.target_modules))
    torch.manual_seed(2)
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()
            torch.nn.init.normal_(p, std=0.02)  # B is zero at init: give every LoRA tensor a gradient
    # torch's SDPA route to cuDNN faults in FLUX's block pair's backward (trainers/attention.py says why); the
    # attention kernel is not what these tests are about
    with torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        loss(module).backward()
    return {n: p.grad for n, p in module.named_parameters() if p.requires_grad}


def _lora_grad_cosines(device: torch.device, heads: int, latent_side: int) -> dict[str, float]:
    """Cosine between the LoRA gradients of one double and one single FLUX.1-dev block (`heads` x 128 wide) on an
    fp8 base and on its bf16 original, under the trainer's loss at `latent_side`^2 latents."""
    from diffusers import FluxTransformer2DModel

    from flen_resources.models.architectures import FLUX_TRANSFORMER
    from flen_resources.trainers.batching import step_generator
    from flen_resources.trainers.flux_lora import FluxLoraTrainer

    config = LoraTrainConfig(resolution=latent_side * 8, device=device.type)
    torch.manual_seed(0)
    with device:
        reference = FluxTransformer2DModel(**{**FLUX_TRANSFORMER["full"], "num_layers": 1, "num_single_layers": 1,
                                              "num_attention_heads": heads})
    reference.to(torch.bfloat16).requires_grad_(False)
    fp8 = copy.deepcopy(reference)
    assert blocks_to_fp8([*fp8.transformer_blocks, *fp8.single_transformer_blocks], device, torch.bfloat16) > 10
    g = torch.Generator().manual_seed(0)
    example = {"latents": torch.randn(16, latent_side, latent_side, generator=g),
               "prompt_embeds": torch.randn(512, 4096, generator=g), "pooled": torch.randn(768, generator=g),
               "bucket": (latent_side * 8, latent_side * 8)}

    def loss(module) -> torch.Tensor:
        return FluxLoraTrainer._loss(module, [example], step_generator(0, 0), config, device, torch.bfloat16)

    ours, theirs = _lora_grads(fp8, loss, config), _lora_grads(reference, loss, config)
    assert ours.keys() == theirs.keys() and len(ours) == 2 * (8 + 3)  # double: 8 targets; single: to_q, to_k, to_v
    return {n: _cos(ours[n], theirs[n]) for n in ours}


def test_lora_gradients_of_narrow_flux_blocks_in_fp8_are_those_of_bf16():
    """FLUX.1-dev's blocks at 4 of its 24 heads (512 wide, the CPU's share of the full-width test below), 256
    image tokens and 512 text tokens: LoRA gradients within cosine 0.98 of bf16's."""
    cosines = _lora_grad_cosines(CPU, heads=4, latent_side=32)
    assert min(cosines.values()) >= 0.98, sorted(cosines.items(), key=lambda kv: kv[1])[:4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_matmuls(torch.device("cuda")),
                    reason="needs a CUDA GPU with fp8 matmuls (Ada, Hopper)")
def test_lora_gradients_of_full_width_flux_blocks_in_fp8_are_those_of_bf16():
    """One double and one single FLUX.1-dev block at full width (3072, 24 heads), 1024x1024 (4,096 image tokens)
    and 512 text tokens, the trainer's loss: LoRA gradients within cosine 0.98 of bf16's (issue 15's bound)."""
    cosines = _lora_grad_cosines(torch.device("cuda"), heads=24, latent_side=128)
    assert min(cosines.values()) >= 0.98, sorted(cosines.items(), key=lambda kv: kv[1])[:4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_matmuls(torch.device("cuda")),
                    reason="needs a CUDA GPU with fp8 matmuls (Ada, Hopper)")
def test_an_eager_forward_on_the_card_quantizes_its_activation_in_one_compiled_kernel_to_the_same_values():
    x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16) * 3
    q, scale = _quantize_activation(x)  # eager on CUDA: the compiled quantize_rows
    q_ref, scale_ref = quantize_rows(x)
    assert torch.equal(scale, scale_ref)
    assert (q.float() != q_ref.float()).float().mean() < 1e-3  # a last-bit rounding at most, on a few values


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_matmuls(torch.device("cuda")),
                    reason="needs a CUDA GPU with fp8 matmuls (Ada, Hopper)")
def test_without_a_working_compiler_the_activation_is_quantized_eagerly(monkeypatch, caplog):
    import flen_resources.models.fp8_linear as fp8_linear

    def broken(rows):
        raise RuntimeError("no Triton here")

    monkeypatch.setattr(fp8_linear, "_compiled_quantize_rows", broken)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    q, scale = _quantize_activation(x)
    assert torch.equal(q.float(), quantize_rows(x)[0].float()) and "torch.compile failed" in caplog.text
    assert fp8_linear._compiled_quantize_rows is quantize_rows  # tried once, not at every layer


def test_the_trainer_trains_a_tiny_lora_on_an_fp8_base(tmp_path):
    from PIL import Image

    from flen_resources.trainers.flux_lora import FluxLoraTrainer, TrainItem

    items = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.effect_noise((64, 64), 40 + 10 * i).convert("RGB").save(path)
        items.append(TrainItem(path, f"photo of alice_flen, pose {i}"))
    config = LoraTrainConfig(resolution=64, rank=8, alpha=8.0, quantization="fp8", optimizer="adamw",
                             lr_warmup_steps=0, sample_every=0, max_steps=6, checkpoint_every=3, device="cpu")
    trainer = FluxLoraTrainer(model="tiny", work_dir=tmp_path / "run", log=lambda _: None)
    result = trainer.train(items, config, name="fp8")
    assert result.lora_path.is_file() and all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses)
    assert '"quantization": "fp8"' in result.metadata["flenwheel.config"]


def test_a_flux_block_swapped_from_host_memory_trains_the_same_lora_and_renders_previews(tmp_path):
    """FLUX's double and single blocks under block_swap.BlockSwap: the training steps, and the previews' no-grad
    forwards through the pipeline."""
    from PIL import Image
    from safetensors.torch import load_file

    from flen_resources.trainers.flux_lora import FluxLoraTrainer, TrainItem

    items = []
    for i in range(4):
        path = tmp_path / f"img{i}.png"
        Image.effect_noise((64, 64), 40 + 10 * i).convert("RGB").save(path)
        items.append(TrainItem(path, f"photo of alice_flen, pose {i}"))
    results, logs = {}, []
    for swapped in (0, 1):
        config = LoraTrainConfig(resolution=64, rank=8, alpha=8.0, quantization="fp8", optimizer="adamw",
                                 lr_warmup_steps=0, max_steps=4, checkpoint_every=4, device="cpu",
                                 swapped_blocks=swapped, kept_activations=0, sample_every=4 if swapped else 0,
                                 sample_prompts=["photo of alice_flen"], sample_seeds=[1], sample_steps=2,
                                 sample_size=64)
        trainer = FluxLoraTrainer(model="tiny", work_dir=tmp_path / f"run{swapped}", log=logs.append)
        results[swapped] = trainer.train(items, config, name="fp8")
    assert "1 of 2 blocks swap from host memory" in "\n".join(logs)
    assert [round(v, 5) for _, v in results[1].losses] == [round(v, 5) for _, v in results[0].losses]
    expected, got = load_file(str(results[0].lora_path)), load_file(str(results[1].lora_path))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    assert [p.name for p in results[1].samples] == ["step-000004-p0-s1.png"]


def test_auto_picks_fp8_when_the_model_fits_the_budget_in_fp8_and_the_card_has_fp8_matmuls():
    cuda = torch.device("cuda")
    flux, qwen = MODELS["flux.1-dev"].transformer_params, MODELS["qwen-image-edit-2509"].transformer_params
    assert fp8_fits(flux, 20) and not fp8_fits(qwen, 20)
    assert pick_quantization_with_fp8("auto", cuda, flux, 20, fp8_matmuls=True) == "fp8"
    # 19 GiB of fp8 weights with no block to swap (the generator's call; the trainer's: test_quantization.py)
    assert pick_quantization_with_fp8("auto", cuda, qwen, 20, fp8_matmuls=True) == "nf4"
    assert pick_quantization_with_fp8("auto", cuda, flux, 20, fp8_matmuls=False) == "nf4"  # Ampere and older
    assert pick_quantization_with_fp8("auto", cuda, flux, flux / 2**30 + FP8_TRAINING_RESERVE_GIB - 1, True) == "nf4"
    assert pick_quantization_with_fp8("auto", cuda, qwen, 40, fp8_matmuls=True) == "fp8"  # a 48 GB card's budget
    assert pick_quantization_with_fp8("auto", CPU, flux, 20, fp8_matmuls=True) == "none"
    assert LoraTrainConfig(device="cpu", quantization="fp8").resolved().quantization == "fp8"


def test_fp8_where_there_are_no_fp8_matmuls_is_one_line_with_the_fix():
    with pytest.raises(ValueError, match=r"fp8 quantization needs fp8 matmuls .* set FLEN_QUANTIZATION=auto"):
        pick_quantization_with_fp8("fp8", torch.device("cuda"), 1e9, 20, fp8_matmuls=False)
    with pytest.raises(TrainingError, match="quantization 'fp4' is not one of auto, none, nf4, fp8"):
        LoraTrainConfig(device="cpu", quantization="fp4").resolved()



def test_fp8_for_the_editor_names_who_takes_it_and_the_fix():
    from flen_resources.models.quantization import pick_quantization

    with pytest.raises(ValueError, match="'fp8' is for the LoRA trainers and the FLUX generator; the editor .*"
                                         "set FLEN_QUANTIZATION=auto"):
        pick_quantization("fp8", torch.device("cuda"))


def test_a_machine_where_torch_compile_fails_is_probed_once_and_runs_eagerly(monkeypatch, caplog):
    import flen_resources.models.fp8_linear as fp8_linear

    calls = []

    def broken(fn):
        calls.append(fn)
        raise RuntimeError("Compiler: cc is not found\nmore lines of the inductor trace")

    monkeypatch.setattr(fp8_linear, "_compiler_works", {})
    monkeypatch.setattr(torch, "compile", broken)
    cpu = torch.device("cpu")
    assert fp8_linear.compiler_works(cpu) is False and fp8_linear.compiler_works(cpu) is False
    assert len(calls) == 1, "probed once a process"
    assert "torch.compile does not work on cpu" in caplog.text and "cc is not found" in caplog.text
    assert "more lines" not in caplog.text


# -- an nf4 base with fp8 GEMMs (Nf4Fp8Linear): bitsandbytes quantizes and dequantizes nf4 on the CPU too ----------
def _nf4(linear: torch.nn.Linear, device: torch.device = CPU) -> torch.nn.Module:
    """`linear` as bitsandbytes' nf4 Linear with double quantization, as the trainer loads an nf4 base."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    return layer.to(device)  # quantizes the weight


def test_an_nf4_linear_with_fp8_gemms_matches_the_nf4_layers_forward_and_input_gradient():
    from flen_resources.models.fp8_linear import Nf4Fp8Linear

    torch.manual_seed(0)
    nf4 = _nf4(torch.nn.Linear(256, 512).to(torch.bfloat16))
    ours = Nf4Fp8Linear(nf4)
    assert ours.weight is nf4.weight and ours.weight.dtype == torch.uint8  # the nf4 bytes, not a copy
    x = torch.randn(2, 99, 256, dtype=torch.bfloat16, requires_grad=True)
    ref = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), F.linear(ref, ours.dequantized(), nf4.bias)  # what bitsandbytes' layer computes
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert y.dtype == torch.bfloat16 and _cos(y, y_ref) > 0.998 and _cos(x.grad, ref.grad) > 0.998


def test_nf4_blocks_swap_their_nf4_linears_and_peft_trains_a_lora_beside_them():
    from peft import get_peft_model

    from flen_resources.models.fp8_linear import Nf4Fp8Linear, nf4_blocks_to_fp8_matmuls

    torch.manual_seed(0)
    model = torch.nn.Sequential(_nf4(torch.nn.Linear(64, 64)), torch.nn.GELU(), _nf4(torch.nn.Linear(64, 32)),
                                _nf4(torch.nn.Linear(32, 8)))  # 8 outputs: not a multiple of 16, stays nf4
    assert nf4_blocks_to_fp8_matmuls([model]) == 2 and isinstance(model[0], Nf4Fp8Linear)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"]))
    lora = [p for p in peft_model.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora), [p.dtype for p in lora]
    peft_model(torch.randn(4, 64, dtype=torch.bfloat16)).float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)


def test_fp8_gemms_run_on_an_fp8_base_always_and_on_nf4_only_when_asked():
    from flen_resources.models.quantization import QuantizationError, pick_fp8_matmuls

    assert pick_fp8_matmuls("auto", "fp8", fp8_matmuls=True)
    assert not pick_fp8_matmuls("auto", "nf4", fp8_matmuls=True)  # slower on an H200: the weight casts cost more
    assert pick_fp8_matmuls(True, "nf4", fp8_matmuls=True)
    assert not pick_fp8_matmuls("auto", "none", fp8_matmuls=True)
    with pytest.raises(QuantizationError, match="fp8_matmuls false with quantization 'fp8'.* set fp8_matmuls to auto"):
        pick_fp8_matmuls(False, "fp8", fp8_matmuls=True)
    with pytest.raises(QuantizationError, match="fp8_matmuls true with quantization 'none'.* set quantization"):
        pick_fp8_matmuls(True, "none", fp8_matmuls=True)
    with pytest.raises(QuantizationError, match="fp8_matmuls true on a card without fp8 GEMMs"):
        pick_fp8_matmuls(True, "nf4", fp8_matmuls=False)
    with pytest.raises(TrainingError, match="fp8_matmuls must be 'auto', true or false, not 'yes'"):
        LoraTrainConfig(device="cpu", quantization="fp8", fp8_matmuls="yes")
    assert LoraTrainConfig(device="cpu", quantization="fp8").resolved().fp8_matmuls is True
    assert LoraTrainConfig(device="cpu", quantization="none").resolved().fp8_matmuls is False


def _nf4_blocks(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` with every Linear of its blocks in nf4 on `device`, as the trainer's nf4 base."""
    from flen_resources.models.fp8_linear import compute_blocks

    for block in compute_blocks(model):
        for _, parent in list(block.named_modules()):
            for attr, linear in list(parent.named_children()):
                if type(linear) is torch.nn.Linear:
                    setattr(parent, attr, _nf4(linear, device))
    return model.to(device)


def _qwen_nf4_lora_grad_cosines(device: torch.device, heads: int, latent_side: int) -> dict[str, float]:
    """Cosine between the LoRA gradients of one Qwen-Image block (`heads` x 128 wide) on an nf4 base with fp8 GEMMs
    and on the same nf4 base with bitsandbytes' bf16 GEMMs, under the trainer's loss with one control."""
    from diffusers import QwenImageTransformer2DModel

    from flen_resources.models.architectures import QWEN_TRANSFORMER
    from flen_resources.models.fp8_linear import compute_blocks, nf4_blocks_to_fp8_matmuls
    from flen_resources.trainers.batching import step_generator
    from flen_resources.trainers.qwen_edit_lora import QwenEditLoraTrainer

    config = LoraTrainConfig(resolution=latent_side * 8, device=device.type)
    torch.manual_seed(0)
    reference = QwenImageTransformer2DModel(**{**QWEN_TRANSFORMER["full"], "num_layers": 1,
                                               "num_attention_heads": heads}).to(torch.bfloat16)
    reference = _nf4_blocks(reference.requires_grad_(False), device)
    ours = copy.deepcopy(reference)
    assert nf4_blocks_to_fp8_matmuls(compute_blocks(ours)) > 10
    g = torch.Generator().manual_seed(0)
    example = {"latents": torch.randn(16, 1, latent_side, latent_side, generator=g),
               "controls": [torch.randn(16, 1, latent_side, latent_side, generator=g)],
               "prompt_embeds": torch.randn(256, 3584, generator=g), "prompt_mask": torch.ones(256, dtype=torch.long)}

    def loss(module) -> torch.Tensor:
        return QwenEditLoraTrainer._loss(module, [example], step_generator(0, 0), config, device, torch.bfloat16)

    ours_grads, theirs = _lora_grads(ours, loss, config), _lora_grads(reference, loss, config)
    # the last block's text stream feeds nothing: its text query and output LoRAs get no gradient, on either base
    trained = {n for n, grad in theirs.items() if grad is not None and grad.any()}
    assert trained == {n for n, grad in ours_grads.items() if grad is not None and grad.any()}
    assert len(trained) == 2 * 6
    return {n: _cos(ours_grads[n], theirs[n]) for n in trained}


def test_lora_gradients_of_a_narrow_qwen_block_with_fp8_gemms_on_nf4_are_those_of_bf16_gemms():
    """Qwen-Image's block at 2 of its 24 heads (256 wide), 2 x 256 image tokens and 256 text tokens."""
    pytest.importorskip("bitsandbytes")
    cosines = _qwen_nf4_lora_grad_cosines(CPU, heads=2, latent_side=32)
    assert min(cosines.values()) >= 0.98, sorted(cosines.items(), key=lambda kv: kv[1])[:4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not fp8_matmuls(torch.device("cuda")),
                    reason="needs a CUDA GPU with fp8 matmuls (Ada, Hopper)")
def test_lora_gradients_of_a_full_width_qwen_block_with_fp8_gemms_on_nf4_are_those_of_bf16_gemms():
    """One Qwen-Image block at full width (3072, 24 heads), 1024x1024 target and control (2 x 4,096 tokens), 256
    text tokens, the trainer's loss: LoRA gradients within cosine 0.98 of the nf4 base's bf16 GEMMs."""
    cosines = _qwen_nf4_lora_grad_cosines(torch.device("cuda"), heads=24, latent_side=128)
    assert min(cosines.values()) >= 0.98, sorted(cosines.items(), key=lambda kv: kv[1])[:4]
