"""The Qwen-Image-Edit LoRA trainer on the tiny pack (CPU): it learns an edit (mirror the image),
its LoRA loads into a fresh pipeline and changes the edit, a resumed run ends where an
uninterrupted one does, and bad triplets are refused before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from skimage import data

from flen_resources.models.sources import resolve_model
from flen_resources.models.tiny_pack import ensure_tiny_pack
from flen_resources.trainers.checkpoints import load_checkpoint, save_checkpoint
from flen_resources.trainers.config import TRAINER_VERSION, LoraTrainConfig, TrainingError
from flen_resources.trainers.qwen_edit_lora import MODEL_KEY, QwenEditLoraTrainer, Triplet

PROMPT = "mirror the image left to right"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(**overrides) -> LoraTrainConfig:
    base = dict(resolution=64, rank=8, alpha=8.0, quantization="none", optimizer="adamw", learning_rate=1e-2,
                lr_warmup_steps=0, sample_every=0, max_steps=20, checkpoint_every=5, device="cpu")
    return LoraTrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def triplets(tmp_path_factory: pytest.TempPathFactory) -> list[Triplet]:
    """4 triplets from astronaut crops: target = the control mirrored; the last has a second control."""
    ensure_tiny_pack()
    folder = tmp_path_factory.mktemp("triplets")
    photo = data.astronaut()
    out = []
    for i, (y, x, h, w) in enumerate([(0, 0, 256, 256), (120, 120, 256, 256), (0, 200, 300, 200), (60, 40, 200, 300)]):
        control = Image.fromarray(photo[y:y + h, x:x + w]).resize((w // 4, h // 4), Image.LANCZOS)
        control.save(folder / f"control{i}.png")
        control.transpose(Image.FLIP_LEFT_RIGHT).save(folder / f"target{i}.png")
        controls = [folder / f"control{i}.png"] + ([folder / "control0.png"] if i == 3 else [])
        out.append(Triplet(controls=controls, prompt=PROMPT if i % 2 else f"{PROMPT}, keep the colours",
                           target=folder / f"target{i}.png"))
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.fixture(scope="module")
def trained(triplets, cache_dir, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted 20-step run, shared by the tests that only read its result."""
    trainer = QwenEditLoraTrainer(model="tiny", work_dir=tmp_path_factory.mktemp("run") / "mirror-v1",
                                  cache_dir=cache_dir, log=lambda _: None)
    return trainer.train(triplets, _config(), name="mirror_v1", dataset_md5="abc123")


# -- it learns, and writes a complete LoRA file ---------------------------------------------------
def test_loss_falls_on_a_fixed_batch(trained):
    assert trained.steps == 20 and len(trained.losses) == 20 and trained.resumed_from == 0
    assert trained.eval_loss_end < trained.eval_loss_start, (trained.eval_loss_start, trained.eval_loss_end)
    # 4 target latents, 4 distinct control latents, 4 prompt encodings; control0's second use is a hit
    assert (trained.cache_misses, trained.cache_hits) == (12, 1)
    assert trained.loss_curve.is_file() and trained.loss_curve.stat().st_size > 0


def test_lora_file_keys_and_metadata(trained):
    with safe_open(str(trained.lora_path), "pt") as fh:
        meta = fh.metadata()
        keys = list(fh.keys())
    assert keys and all(k.startswith("transformer.transformer_blocks.") for k in keys)
    assert {k.rsplit(".", 2)[-2] for k in keys} == {"lora_A", "lora_B"}
    adapter = json.loads(meta["lora_adapter_metadata"])
    assert adapter and all(k.startswith("transformer.") for k in adapter)
    assert adapter["transformer.r"] == 8 and adapter["transformer.lora_alpha"] == 8.0
    assert meta["flenwheel.base_model"].startswith(f"tiny/{MODEL_KEY}@")
    assert meta["flenwheel.dataset_md5"] == "abc123"
    assert meta["flenwheel.step"] == "20"
    assert meta["flenwheel.trainer_version"] == TRAINER_VERSION
    assert meta["flenwheel.key_style"] == "diffusers"
    assert json.loads(meta["flenwheel.config"])["rank"] == 8
    comfy = load_file(str(trained.comfyui_path))
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in comfy)
    assert len(comfy) == len(keys) * 3 // 2  # lora_A, lora_B and alpha per module


# -- the LoRA loads into a fresh pipeline and changes the edit ------------------------------------
def test_lora_loads_into_a_fresh_pipeline_and_changes_the_edit(trained, triplets):
    from diffusers import QwenImageEditPlusPipeline

    from flen_resources.models.architectures import patch_qwen2vl_processor_without_torchvision

    patch_qwen2vl_processor_without_torchvision()
    pipe = QwenImageEditPlusPipeline.from_pretrained(str(resolve_model(MODEL_KEY, "tiny").path))
    pipe.set_progress_bar_config(disable=True)
    with Image.open(triplets[0].controls[0]) as img:
        control = img.convert("RGB").resize((64, 64))

    def edit() -> np.ndarray:
        return pipe(image=[control], prompt=PROMPT, num_inference_steps=2, height=64, width=64, true_cfg_scale=1.0,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="np").images

    base = edit()
    pipe.load_lora_weights(str(trained.lora_path), adapter_name="mirror")
    assert "mirror" in pipe.get_list_adapters()["transformer"]
    with_lora = edit()
    assert np.abs(with_lora - base).max() > 1e-2
    pipe.delete_adapters("mirror")
    assert np.abs(edit() - base).max() < 1e-5
    # the ComfyUI file (diffusion_model. keys, alpha per module) means the same LoRA
    pipe.load_lora_weights(str(trained.comfyui_path), adapter_name="comfy")
    assert np.abs(edit() - with_lora).max() < 2e-3  # bf16 weights in the ComfyUI file


# -- a resumed run ends exactly where an uninterrupted one does -----------------------------------
def test_resume_gives_the_same_lora_as_an_uninterrupted_run(trained, triplets, cache_dir, tmp_path: Path):
    work_dir = tmp_path / "mirror-v1"
    first = QwenEditLoraTrainer(model="tiny", work_dir=work_dir, cache_dir=cache_dir, log=lambda _: None)
    half = first.train(triplets, _config(max_steps=10), name="mirror_v1", dataset_md5="abc123")
    assert half.cache_misses == 0, "the features were cached by the first run"
    assert sorted(p.name for p in (work_dir / "checkpoints").iterdir()) == ["step-000005", "step-000010"]

    second = QwenEditLoraTrainer(model="tiny", work_dir=work_dir, cache_dir=cache_dir, log=lambda _: None)
    resumed = second.train(triplets, _config(), name="mirror_v1", dataset_md5="abc123")
    assert resumed.resumed_from == 10 and resumed.steps == 20
    assert [s for s, _ in resumed.losses] == list(range(1, 21))
    assert np.allclose([v for _, v in resumed.losses], [v for _, v in trained.losses], atol=1e-6)
    expected, got = load_file(str(trained.lora_path)), load_file(str(resumed.lora_path))
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=0)


# -- batches of two: prompts of different lengths are padded and masked ---------------------------
def test_batches_of_two_train(triplets, cache_dir, tmp_path: Path):
    trainer = QwenEditLoraTrainer(model="tiny", work_dir=tmp_path / "b2", cache_dir=cache_dir, log=lambda _: None)
    result = trainer.train(triplets, _config(batch_size=2, max_steps=2, checkpoint_every=2))
    assert len(result.losses) == 2 and all(np.isfinite(v) for _, v in result.losses)


# -- an fp8 base too big for the budget: its blocks swap from host memory, and it trains the same LoRA -------
def test_an_fp8_base_with_a_swapped_block_trains_the_lora_of_one_without(triplets, cache_dir, tmp_path: Path):
    from flen_resources.models.fp8_linear import fp8_matmuls

    if not fp8_matmuls(torch.device("cpu")):
        pytest.skip("this torch has no CPU fp8 GEMM (torch._scaled_mm)")
    logs: list[str] = []
    results = {}
    for swapped in (0, 1):
        trainer = QwenEditLoraTrainer(model="tiny", work_dir=tmp_path / f"swap{swapped}", cache_dir=cache_dir,
                                      log=logs.append)
        results[swapped] = trainer.train(triplets, _config(quantization="fp8", swapped_blocks=swapped, max_steps=3,
                                                           checkpoint_every=3, kept_activations=0))
    assert "1 of 2 blocks swap from host memory" in "\n".join(logs)
    assert results[1].losses == results[0].losses
    expected, got = load_file(str(results[0].lora_path)), load_file(str(results[1].lora_path))
    for key in expected:  # the markers' identity nodes sum the streams' gradients in another order: fp32 noise
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    assert json.loads(results[1].metadata["flenwheel.config"])["swapped_blocks"] == 1


# -- Qwen-Image-Edit-2511: the same loss on its transformer (zero_cond_t reads the same img_shapes) -----
def test_2511_trains_a_few_steps_on_its_own_release(trained, triplets, cache_dir, tmp_path: Path):
    trainer = QwenEditLoraTrainer(model="tiny", work_dir=tmp_path / "2511", cache_dir=cache_dir, log=lambda _: None,
                                  model_key="qwen-image-edit-2511")
    result = trainer.train(triplets, _config(max_steps=3, checkpoint_every=3))
    assert len(result.losses) == 3 and all(np.isfinite(v) for _, v in result.losses)
    assert result.cache_misses == 12, "2509's cached features (`trained`) are not reused: the model ref keys the cache"
    assert result.metadata["flenwheel.base_model"].startswith("tiny/qwen-image-edit-2511@")
    with safe_open(str(result.lora_path), "pt") as fh:
        assert any(k.startswith("transformer.transformer_blocks.") for k in fh.keys())


def test_an_unknown_release_is_refused():
    with pytest.raises(TrainingError, match=r"unknown Qwen-Image-Edit model 'qwen-image-edit-2512'"):
        QwenEditLoraTrainer(model="tiny", model_key="qwen-image-edit-2512")


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case, message", [
    ("too_few", r"3 triplet\(s\); at least 4"),
    ("no_control", r"triplet 1 .*0 control image\(s\)"),
    ("four_controls", r"triplet 2 .*4 control image\(s\); Qwen-Image-Edit-2509 takes 1 to 3"),
    ("no_prompt", r"triplet 0 .*no prompt"),
    ("missing_control", r"training images missing: .*gone\.png"),
    ("missing_target", r"training images missing: .*nowhere\.png"),
])
def test_bad_triplets_are_refused(case, message, triplets, tmp_path: Path):
    bad = [Triplet(list(t.controls), t.prompt, t.target) for t in triplets]
    if case == "too_few":
        bad = bad[:3]
    elif case == "no_control":
        bad[1].controls = []
    elif case == "four_controls":
        bad[2].controls = [bad[0].controls[0]] * 4
    elif case == "no_prompt":
        bad[0].prompt = "  "
    elif case == "missing_control":
        bad[3].controls[1] = tmp_path / "gone.png"
    elif case == "missing_target":
        bad[2].target = tmp_path / "nowhere.png"
    trainer = QwenEditLoraTrainer(model="tiny", work_dir=tmp_path / "run", log=lambda _: None)
    with pytest.raises(TrainingError, match=message):
        trainer.train(bad, _config())
    assert not (tmp_path / "run").exists(), "nothing is written for refused input"


def test_nf4_on_the_cpu_is_refused(triplets, cache_dir, tmp_path: Path):
    trainer = QwenEditLoraTrainer(model="tiny", work_dir=tmp_path / "run", cache_dir=cache_dir, log=lambda _: None)
    with pytest.raises(TrainingError, match="nf4 .*needs a CUDA GPU"):
        trainer.train(triplets, _config(quantization="nf4"))


# -- checkpoints keep nested optimizer state (bitsandbytes' 8-bit AdamW wraps its quantization state) ----
def test_checkpoint_round_trips_nested_optimizer_state(tmp_path: Path):
    class Nested:
        """An optimizer whose per-parameter state holds a dict of tensors, as AdamW8bit's does."""

        def __init__(self):
            self.state = {"state": {0: {"step": torch.tensor(7.0), "quant": {"state1": torch.arange(4.0),
                                                                             "qmap1": torch.linspace(-1, 1, 5)}}},
                          "param_groups": [{"lr": 0.01, "betas": [0.9, 0.999], "params": [0]}]}
            self.loaded = None

        def state_dict(self):
            return self.state

        def load_state_dict(self, state):
            self.loaded = state

    class Scheduler:
        def state_dict(self):
            return {"last_epoch": 7}

        def load_state_dict(self, state):
            self.loaded = state

    saved = save_checkpoint(tmp_path, 7, {"a.lora_A.weight": torch.ones(2, 2)}, Nested(), Scheduler(), {}, 2)
    optimizer = Nested()
    step, lora, _ = load_checkpoint(saved, optimizer, Scheduler(), torch.device("cpu"))
    assert step == 7 and torch.equal(lora["a.lora_A.weight"], torch.ones(2, 2))
    quant = optimizer.loaded["state"][0]["quant"]
    assert torch.equal(quant["state1"], torch.arange(4.0)) and torch.equal(quant["qmap1"], torch.linspace(-1, 1, 5))
    assert optimizer.loaded["state"][0]["step"].item() == 7.0
