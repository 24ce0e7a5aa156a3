"""LoRAs given bad input: unknown names, missing, corrupt, pickle and wrong-architecture files (issue 3)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flen_resources.editors import EditRequest
from flen_resources.editors.qwen_edit import EditInputError, QwenEditEditor
from flen_resources.generators.flux import FluxGenerator
from flen_resources.models.loras import LoraError, detect_architecture, inspect_lora, resolve_lora
from flen_resources.models.sources import ModelNotAvailable

QWEN = "qwen-image-edit-2509"
FLUX = "flux.1-dev"


@pytest.fixture(scope="module")
def odd_lora(tmp_path_factory, make_lora):
    """LoRA tensors whose module names match nothing in either model (architecture unknown)."""
    return make_lora(tmp_path_factory.mktemp("odd") / "odd.safetensors", ["foo.bar", "foo.baz"])


@pytest.fixture(scope="module")
def editor(tiny_pack, flux_lora, odd_lora) -> QwenEditEditor:
    """The qwen editor on the tiny pack, with a FLUX LoRA and an unmatched LoRA configured next to angles."""
    return QwenEditEditor(model="tiny", device="cpu", output_area=64 * 64, references_at_output_area=True,
                          loras={"angles": "tiny:angles", "flux": str(flux_lora), "odd": str(odd_lora)})


def _request(loras: dict[str, float]) -> EditRequest:
    return EditRequest(recipe_id="bad-lora", operation="qwen_edit", params={"loras": loras, "steps": 2},
                       prompt="turn the head", seed=1)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.new("RGB", (64, 64), (120, 90, 60))


# -- through the editor and the generator ------------------------------------------------------


def test_unknown_lora_name_in_the_request(editor, photo):
    with pytest.raises(EditInputError) as err:
        editor.edit([photo], _request({"nope": 1.0}))
    message = str(err.value)
    assert "unknown LoRA 'nope'" in message
    assert "configured: angles, flux, odd" in message


def test_a_flux_lora_is_refused_by_the_qwen_editor(editor, photo, flux_lora):
    with pytest.raises(LoraError) as err:
        editor.edit([photo], _request({"flux": 1.0}))
    message = str(err.value)
    assert flux_lora.name in message
    assert "is a flux LoRA" in message
    assert "cannot be applied to Qwen/Qwen-Image-Edit-2509" in message
    assert "flux" not in editor._loaded


def test_a_lora_matching_no_module_is_refused_by_the_qwen_editor(editor, photo, odd_lora):
    """diffusers only warns when no key matches; the editor must not go on with a missing adapter."""
    with pytest.raises(EditInputError) as err:
        editor.edit([photo], _request({"odd": 1.0}))
    message = str(err.value)
    assert odd_lora.name in message and "does not fit" in message and "match" in message
    assert "odd" not in editor._loaded


def test_the_editor_still_works_after_refused_loras(editor, photo):
    result = editor.edit([photo], _request({"angles": 1.0}))
    assert [a["name"] for a in result.adapters] == ["angles"]
    assert result.image.mode == "RGB"


def test_the_qwen_angles_lora_is_refused_by_the_flux_generator(tiny_pack):
    generator = FluxGenerator(model="tiny", device="cpu")
    with pytest.raises(LoraError) as err:
        generator.generate("a portrait", [0], lora="tiny:angles", width=64, height=64, steps=1)
    message = str(err.value)
    assert "angles.safetensors" in message
    assert "does not fit FLUX.1-dev" in message
    assert generator._lora is None
    # and the generator is still usable without it
    (out,) = generator.generate("a portrait", [0], lora=None, width=64, height=64, steps=1)
    assert out.adapters == []


def test_a_real_size_qwen_lora_is_refused_for_flux_before_loading(tmp_path, make_lora):
    """Real Qwen-Image LoRAs (img_mlp modules, or 60 blocks) are recognised from their keys alone."""
    path = make_lora(tmp_path / "qwen_style.safetensors",
                     ["transformer_blocks.59.attn.to_q", "transformer_blocks.59.img_mlp.net.0.proj"])
    with pytest.raises(LoraError) as err:
        resolve_lora("character", str(path), FLUX)
    assert "qwen_style.safetensors is a qwen-image LoRA" in str(err.value)
    assert "cannot be applied to black-forest-labs/FLUX.1-dev" in str(err.value)


def test_a_flux_lora_is_refused_for_qwen_without_any_pipeline(flux_lora):
    with pytest.raises(LoraError, match=r"is a flux LoRA; it cannot be applied to Qwen/Qwen-Image-Edit-2509"):
        resolve_lora("flux", str(flux_lora), QWEN)


def test_detect_architecture():
    assert detect_architecture(["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]) == "flux"
    assert detect_architecture(["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]) == "flux"
    assert detect_architecture(["transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight"]) == "qwen-image"
    assert detect_architecture(["transformer_blocks.40.attn.to_q.lora_A.weight"]) == "qwen-image"
    assert detect_architecture(["transformer_blocks.3.attn.to_q.lora_A.weight"]) == "unknown"


# -- files ------------------------------------------------------------------------------------------


def test_lora_path_that_does_not_exist(tmp_path):
    path = tmp_path / "gone.safetensors"
    with pytest.raises(LoraError) as err:
        resolve_lora("angles", str(path), QWEN)
    assert f"LoRA file {path} does not exist" in str(err.value)


def test_tiny_pack_lora_that_does_not_exist(tiny_pack):
    with pytest.raises(LoraError, match=r"the tiny pack has no LoRA 'tiny:nope'"):
        resolve_lora("nope", "tiny:nope", QWEN)


def test_hub_lora_not_in_the_cache(offline_empty_hub):
    source = "dx8152/Qwen-Edit-2509-Multiple-angles/镜头转换.safetensors"
    with pytest.raises(ModelNotAvailable) as err:
        resolve_lora("angles", source, QWEN)
    message = str(err.value)
    assert "LoRA angles (dx8152/Qwen-Edit-2509-Multiple-angles/镜头转换.safetensors)" in message
    assert str(offline_empty_hub) in message
    assert "hf download dx8152/Qwen-Edit-2509-Multiple-angles" in message


def test_hub_lora_source_that_is_not_a_file_path():
    with pytest.raises(LoraError, match=r"LoRA source 'org/repo': expected a \.safetensors path"):
        resolve_lora("angles", "org/repo", QWEN)


def test_safetensors_without_lora_tensors(tmp_path):
    path = tmp_path / "plain_model.safetensors"
    save_file({"proj.weight": torch.zeros(4, 4), "proj.bias": torch.zeros(4)}, str(path))
    with pytest.raises(LoraError) as err:
        resolve_lora("angles", str(path), QWEN)
    assert "LoRA plain_model.safetensors holds no LoRA tensors" in str(err.value)


@pytest.mark.parametrize("content", [os.urandom(4096), b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"],
                         ids=["random-bytes", "empty", "truncated-header"])
def test_corrupt_safetensors(tmp_path, content):
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(LoraError) as err:
        resolve_lora("angles", str(path), QWEN)
    assert "LoRA corrupt.safetensors is not a readable safetensors file" in str(err.value)


def test_truncated_tensor_data(tmp_path, make_lora):
    path = make_lora(tmp_path / "cut.safetensors", ["transformer_blocks.40.attn.to_q"], dim=256)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1024])  # header intact, tensor bytes cut off
    with pytest.raises(LoraError, match=r"LoRA cut\.safetensors is not a readable safetensors file"):
        inspect_lora(path)


@pytest.mark.parametrize("name", ["x.bin", "x.ckpt", "x.pt", "x.pth", "X.BIN"])
def test_pickle_lora_is_refused_unread(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a pickle LoRA"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called on a pickle LoRA"))
    with pytest.raises(LoraError) as err:
        resolve_lora("character", str(path), FLUX)
    message = str(err.value)
    assert f"LoRA {name}" in message
    assert "pickle format, refused" in message and ".safetensors" in message


def test_lora_with_another_suffix(tmp_path):
    path = tmp_path / "weights.gguf"
    path.write_bytes(b"GGUF")
    with pytest.raises(LoraError, match=r"LoRA weights\.gguf: expected a \.safetensors file"):
        resolve_lora("character", str(path), FLUX)
