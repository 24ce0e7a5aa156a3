"""Qwen-Image-Edit-2509 and -2511 in the registry and the tiny pack: 2511 is 2509's architecture with
zero_cond_t on (no parameter of its own), each release's folder is checked to be that release, and a
registered LoRA goes on the release it was made for only."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

from flen_resources.models.loras import LoraError, resolve_lora
from flen_resources.models.registry import (
    LORAS,
    MODELS,
    QWEN_EDIT_MODELS,
    lightning_steps,
    lora_for,
    lora_mismatch,
    release_flags,
)
from flen_resources.models.sources import ModelFolderError, resolve_model

Q2509, Q2511 = "qwen-image-edit-2509", "qwen-image-edit-2511"


def _tensors(folder) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted((folder / "transformer").glob("*.safetensors")):
        with safe_open(str(file), "pt") as fh:
            shapes.update({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})
    return shapes


def test_the_tiny_pack_has_2511_with_zero_cond_t_and_no_parameter_of_its_own(tiny_pack):
    configs = {m: json.loads((tiny_pack / m / "transformer" / "config.json").read_text()) for m in QWEN_EDIT_MODELS}
    assert configs[Q2511]["zero_cond_t"] is True and configs[Q2509]["zero_cond_t"] is False
    assert {k: v for k, v in configs[Q2511].items() if k != "zero_cond_t"} == \
        {k: v for k, v in configs[Q2509].items() if k != "zero_cond_t"}, "the flag is the only difference"
    assert _tensors(tiny_pack / Q2511) == _tensors(tiny_pack / Q2509), "same tensors, same shapes"
    index = json.loads((tiny_pack / Q2511 / "model_index.json").read_text())
    assert index["_class_name"] == MODELS[Q2511].pipeline == "QwenImageEditPlusPipeline"
    for name, spec in LORAS.items():
        assert (tiny_pack / "loras" / f"{name}.safetensors").is_file(), f"tiny:{name} ({spec.model})"


def test_each_release_resolves_to_its_own_tiny_folder(tiny_pack):
    for model in QWEN_EDIT_MODELS:
        resolved = resolve_model(model, "tiny")
        assert resolved.path == tiny_pack / model and resolved.ref.startswith(f"tiny/{model}@")
    assert release_flags(Q2511) == {"zero_cond_t": True} and release_flags(Q2509) == {"zero_cond_t": False}
    assert release_flags("flux.1-dev") == {}


def test_a_2509_folder_given_as_2511_is_refused(tiny_pack, tmp_path):
    folder = tmp_path / "which-one"
    shutil.copytree(tiny_pack / Q2509, folder)
    assert resolve_model(Q2509, str(folder)).kind == "folder"
    with pytest.raises(ModelFolderError) as err:
        resolve_model(Q2511, str(folder))
    message = str(err.value)
    assert f"holds {Q2509} (transformer zero_cond_t=False), not {Q2511}" in message
    assert MODELS[Q2511].setting in message and "Qwen/Qwen-Image-Edit-2511" in message


def test_lora_of_another_release_names_the_right_one():
    assert lora_for("lightning-8step", Q2511) == "lightning-8step-2511"
    assert lora_for("lightning-4step-2511", Q2509) == "lightning-4step"
    assert lora_for("angles", Q2511) is None
    assert lora_mismatch("lightning-8step-2511", Q2511) is None and lora_mismatch("my-own", Q2511) is None
    assert lora_mismatch("lightning-8step", Q2511) == (
        f"LoRA 'lightning-8step' was made for {Q2509}, not {Q2511}; use 'lightning-8step-2511' instead")
    assert "has no angles LoRA: leave it out" in lora_mismatch("angles", Q2511)
    assert lightning_steps(["angles", "lightning-8step-2511"]) == 8 and lightning_steps(["lightning-4step-2511"]) == 4


def test_resolve_lora_refuses_a_registered_lora_of_the_other_release(tiny_pack):
    with pytest.raises(LoraError, match=r"'lightning-8step' was made for qwen-image-edit-2509.*'lightning-8step-2511'"):
        resolve_lora("lightning-8step", "tiny:lightning-8step", Q2511)
    assert resolve_lora("lightning-8step-2511", "tiny:lightning-8step-2511", Q2511).key_style == "lightx2v"


def test_zero_cond_t_changes_the_target_tokens_only_when_a_control_is_in_the_sequence(tiny_pack):
    """2511's one difference at work: the control's tokens are modulated at timestep 0. The same weights
    give the same output on a sequence without a control, and another one with it."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    models = {m: QwenImageTransformer2DModel.from_pretrained(str(tiny_pack / m / "transformer")).eval()
              for m in QWEN_EDIT_MODELS}
    gen = torch.Generator().manual_seed(0)
    target, control = torch.randn(1, 16, 64, generator=gen), torch.randn(1, 16, 64, generator=gen)
    text = torch.randn(1, 5, 64, generator=gen)

    def forward(model: str, tokens: torch.Tensor, shapes: list) -> torch.Tensor:
        with torch.no_grad():
            return models[model](hidden_states=tokens, encoder_hidden_states=text, timestep=torch.tensor([0.7]),
                                 img_shapes=[shapes], return_dict=False)[0][:, :16]

    alone = [forward(m, target, [(1, 4, 4)]) for m in QWEN_EDIT_MODELS]
    assert (alone[0] - alone[1]).abs().max() < 1e-5  # the same up to float rounding (another code path)
    edit = [forward(m, torch.cat([target, control], dim=1), [(1, 4, 4), (1, 4, 4)]) for m in QWEN_EDIT_MODELS]
    assert (edit[0] - edit[1]).abs().max() > 1e-3
