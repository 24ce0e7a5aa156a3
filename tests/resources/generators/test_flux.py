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


def _flux_lora(generator: FluxGenerator, path, rank: int = 4, seed: int = 0) -> None:
    """A random LoRA on the tiny FLUX transformer's attention, in diffusers/peft key style."""
    gen = torch.Generator().manual_seed(seed)
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


def test_a_grid_is_the_pipeline_s_own_images_with_each_prompt_encoded_once(generator, monkeypatch):
    """Phase by phase (text encoders, then the transformer) gives the pipeline's per-image pictures, seed for seed."""
    prompts = ["photo of alice_flen", "photo of alice_flen outdoors"]
    grid = generator.generate_grid(prompts, [1, 2], **KW)
    assert [(g.prompt, g.seed) for g in grid] == [(p, s) for p in prompts for s in (1, 2)]
    for g in grid:
        plain = generator.pipe(prompt=g.prompt, width=64, height=64, num_inference_steps=2, guidance_scale=3.5,
                               generator=torch.Generator("cpu").manual_seed(g.seed), max_sequence_length=64).images[0]
        assert np.array_equal(_arr(g.image), _arr(plain))
    encoded = []
    real = generator.pipe.encode_prompt
    # the pipeline's call passes the embeddings through encode_prompt too (prompt None): only texts count
    monkeypatch.setattr(generator.pipe, "encode_prompt",
                        lambda **kw: (kw.get("prompt") and encoded.append(kw["prompt"])) or real(**kw))
    again = generator.generate_grid(prompts, [1], **KW)
    assert encoded == [] and np.array_equal(_arr(again[0].image), _arr(grid[0].image))
    generator.generate("photo of bob_flen", [1], **KW)
    assert encoded == ["photo of bob_flen"]


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
    with pytest.raises(ValueError, match="prompt is required"):
        generator.generate_grid([], [1], **KW)


@pytest.mark.skipif(not hasattr(torch, "_scaled_mm"), reason="this torch has no CPU fp8 GEMM (torch._scaled_mm)")
def test_an_fp8_base_generates_the_plain_model_s_image_and_takes_the_lora(generator, tmp_path):
    from flen_resources.models.fp8_linear import Fp8Linear

    fp8 = FluxGenerator(model="tiny", quantization="fp8", device="cpu")
    assert sum(isinstance(m, Fp8Linear) for m in fp8.pipe.transformer.modules()) > 10
    path = tmp_path / "alice_v1.safetensors"
    _flux_lora(generator, path)
    plain = generator.generate("photo of alice_flen", [5], lora=path, **KW)[0]
    ours = fp8.generate("photo of alice_flen", [5], lora=path, **KW)[0]
    base = fp8.generate("photo of alice_flen", [5], **KW)[0]
    assert ours.params["quantization"] == "fp8" and ours.adapters[0]["weight"] == 1.0
    # e4m3 keeps about two significant digits: the same picture, not the same pixels
    assert np.corrcoef(_arr(plain.image).ravel(), _arr(ours.image).ravel())[0, 1] > 0.95
    assert np.abs(_arr(base.image) - _arr(ours.image)).mean() > 0.5, "the LoRA changes the fp8 model's output"


def test_auto_generates_in_fp8_where_the_card_and_the_budget_allow():
    from flen_resources.models.quantization import FP8_GENERATION_RESERVE_GIB, pick_quantization_with_fp8
    from flen_resources.models.registry import MODELS

    flux, cuda = MODELS["flux.1-dev"].transformer_params, torch.device("cuda")
    pick = lambda budget, fp8: pick_quantization_with_fp8("auto", cuda, flux, budget, fp8,  # noqa: E731
                                                          FP8_GENERATION_RESERVE_GIB)
    assert pick(20, True) == "fp8" and pick(20, False) == "nf4" and pick(0, True) == "nf4"
    assert FluxGenerator(model="tiny", device="cpu").quantization == "none"
    with pytest.raises(ValueError, match="fp8 quantization needs fp8 matmuls"):
        pick_quantization_with_fp8("fp8", cuda, flux, 20, False, FP8_GENERATION_RESERVE_GIB)


def test_the_blocks_compile_on_a_gpu_where_torch_compile_works(generator, monkeypatch):
    assert FluxGenerator(model="tiny", device="cpu").compiles is False  # a CPU runs eager
    assert FluxGenerator(model="tiny", device="cpu", compile=False).compiles is False
    assert not any(getattr(b, "_compiled_call_impl", None) for b in generator.pipe.transformer.transformer_blocks)
    import flen_resources.generators.flux as flux
    import flen_resources.models.fp8_linear as fp8_linear

    monkeypatch.setattr(flux, "pick_device", lambda _: torch.device("cuda"))
    monkeypatch.setattr(fp8_linear, "_compiler_works", {"cuda": False})
    assert FluxGenerator.compiles.fget(generator) is False, "a GPU without a working torch.compile runs eager"
    monkeypatch.setattr(fp8_linear, "_compiler_works", {"cuda": True})
    assert FluxGenerator.compiles.fget(generator) is True


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA GPU with fp8 matmuls (Ada, Hopper)")
def test_auto_on_an_fp8_card_generates_in_fp8_with_its_components_resident(tmp_path, monkeypatch):
    import flen_resources.generators.flux as flux

    monkeypatch.setattr(flux, "host_memory_gib", lambda: 128.0)  # the rule judges FLUX.1-dev's full size
    generator = FluxGenerator(model="tiny", device="cuda")
    assert generator.quantization == "fp8"
    assert "transformer" in generator.residency.resident, "quantized on the card: counted as resident"
    path = tmp_path / "alice_v1.safetensors"
    _flux_lora(generator, path)
    out = generator.generate_grid(["photo of alice_flen", "photo of alice_flen outdoors"], [1, 2], lora=path, **KW)
    assert out[0].params["quantization"] == "fp8" and all(np.isfinite(_arr(o.image)).all() for o in out)
    assert _arr(out[0].image).std() > 0
    # the tiny pack fits the budget whole: every component went onto the card once and stayed
    assert generator.residency.resident == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    assert generator.residency.moves == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_blocks_generate_the_eager_pipeline_s_images(tmp_path):
    compiled, eager = FluxGenerator(model="tiny", device="cuda"), FluxGenerator(model="tiny", device="cuda", compile=False)
    assert compiled.compiles and not eager.compiles
    assert all(b._compiled_call_impl is not None for b in compiled.pipe.transformer.transformer_blocks)
    # as lora_eval calls it: six checkpoints' LoRAs in turn, the LoRA-off images at weight 0, then the base model;
    # dynamo would fall back to eager past its recompile limit, and here it fails instead
    checkpoints = [tmp_path / f"step-{n}.safetensors" for n in range(6)]
    for n, path in enumerate(checkpoints):
        _flux_lora(eager, path, seed=n)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for lora, weight in [*((p, 1.0) for p in checkpoints), (checkpoints[-1], 0.0), (None, 1.0), (checkpoints[0], 1.0)]:
            ours = compiled.generate("photo of alice_flen", [3], lora=lora, lora_weight=weight, **KW)[0]
            plain = eager.generate("photo of alice_flen", [3], lora=lora, lora_weight=weight, **KW)[0]
            assert np.corrcoef(_arr(plain.image).ravel(), _arr(ours.image).ravel())[0, 1] > 0.99
