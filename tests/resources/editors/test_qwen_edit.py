"""The qwen_edit editor on the tiny pack: the real QwenImageEditPlusPipeline loading and call path."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from flen_resources.editors import EditRequest, get_editor, qwen_phases
from flen_resources.editors.qwen_edit import QwenEditEditor
from flen_resources.models.sources import resolve_model

AREA = 96 * 96  # small outputs keep the CPU tests fast; the code path is the same at 1024x1024


@pytest.fixture(scope="module")
def editor() -> QwenEditEditor:
    return QwenEditEditor(model="tiny", output_area=AREA, references_at_output_area=True)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    astro = Image.fromarray(skimage.data.astronaut())
    return [astro.crop((40, 0, 400, 320)), astro.crop((0, 0, 256, 256)), Image.fromarray(skimage.data.chelsea())]


def _req(seed: int = 1, **params) -> EditRequest:
    return EditRequest("t", "qwen_edit", params={"steps": 2, **params}, prompt="将镜头转为特写镜头", seed=seed)


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def test_loads_the_saved_pipeline_with_from_pretrained(editor):
    from diffusers import QwenImageEditPlusPipeline

    assert isinstance(editor.pipe, QwenImageEditPlusPipeline)
    assert editor.resolved.kind == "tiny" and (editor.resolved.path / "model_index.json").is_file()
    assert editor.model_id().startswith("tiny/qwen-image-edit-2509@")
    assert editor.pipe.transformer.config.zero_cond_t is False


@pytest.mark.parametrize("n_images", [1, 2, 3])
def test_edits_with_one_two_three_images(editor, photos, n_images):
    result = editor.edit(photos[:n_images], _req())
    assert result.image.mode == "RGB" and result.image.size == (result.params["width"], result.params["height"])
    assert result.params["n_inputs"] == n_images
    assert np.isfinite(_arr(result.image)).all()


def test_same_seed_same_image_other_seed_other_image(editor, photos):
    a, b = editor.edit(photos[:1], _req(seed=5)), editor.edit(photos[:1], _req(seed=5))
    c = editor.edit(photos[:1], _req(seed=6))
    assert np.array_equal(_arr(a.image), _arr(b.image))
    assert not np.array_equal(_arr(a.image), _arr(c.image))


def test_lora_stack_loads_and_changes_the_output(editor, photos):
    plain = editor.edit(photos[:1], _req(seed=3))
    angles = editor.edit(photos[:1], _req(seed=3, loras={"angles": 1.0}))
    assert [a["name"] for a in angles.adapters] == ["angles"] and angles.adapters[0]["sha256"]
    assert np.abs(_arr(plain.image) - _arr(angles.image)).mean() > 1.0
    weaker = editor.edit(photos[:1], _req(seed=3, loras={"angles": 0.3}))
    assert not np.array_equal(_arr(weaker.image), _arr(angles.image)), "the weight is applied"
    again = editor.edit(photos[:1], _req(seed=3))
    assert np.array_equal(_arr(plain.image), _arr(again.image)), "an empty stack turns the LoRAs off"


def test_lightning_sets_its_scheduler_steps_and_cfg(editor, photos):
    result = editor.edit(photos[:1], _req(loras={"angles": 1.0, "lightning-8step": 1.0}, true_cfg=4.0, steps=40))
    assert result.params["steps"] == 8 and result.params["true_cfg"] == 1.0
    assert result.params["scheduler"] == "lightning"
    assert editor.pipe.scheduler.config.shift_terminal is None  # Lightning's settings, not Qwen's 0.02
    assert {a["name"] for a in result.adapters} == {"angles", "lightning-8step"}
    assert {a["key_style"] for a in result.adapters} == {"comfyui", "lightx2v"}


def test_a_local_folder_loads_through_the_same_path(tmp_path, editor, photos):
    folder = tmp_path / "my-qwen-edit"
    shutil.copytree(resolve_model("qwen-image-edit-2509", "tiny").path, folder)
    local = get_editor("qwen_edit", model=str(folder), output_area=AREA, references_at_output_area=True)
    assert local.resolved.kind == "folder"
    assert np.array_equal(_arr(local.edit(photos[:1], _req(seed=9)).image), _arr(editor.edit(photos[:1], _req(seed=9)).image))


def test_set_lora_source_replaces_a_loaded_adapter(tmp_path, editor, photos):
    """A LoRA re-pointed at another file, or whose file changed in place, is reloaded, not reused."""
    from flen_resources.models.tiny_pack import ensure_tiny_pack

    loras = ensure_tiny_pack() / "loras"
    path = tmp_path / "adapter.safetensors"
    shutil.copyfile(loras / "angles.safetensors", path)
    editor.set_lora_source("mine", str(path))
    first = editor.edit(photos[:1], _req(seed=4, loras={"mine": 1.0}))
    assert first.adapters[0]["sha256"] == editor._loaded["mine"].sha256

    editor.set_lora_source("mine", str(path))  # same file, same bytes: the loaded adapter stays
    assert "mine" in editor._loaded
    shutil.copyfile(loras / "lightning-4step.safetensors", path)  # the file changes in place
    editor.set_lora_source("mine", str(path))
    assert "mine" not in editor._loaded
    assert not any("mine" in names for names in editor.pipe.get_list_adapters().values())
    second = editor.edit(photos[:1], _req(seed=4, loras={"mine": 1.0}))
    assert second.adapters[0]["sha256"] != first.adapters[0]["sha256"]
    assert second.adapters[0]["key_style"] == "lightx2v"

    editor.set_lora_source("mine", "tiny:angles")  # another source
    assert "mine" not in editor._loaded
    third = editor.edit(photos[:1], _req(seed=4, loras={"mine": 1.0}))
    assert third.adapters[0]["sha256"] == first.adapters[0]["sha256"]
    assert np.array_equal(_arr(third.image), _arr(first.image))
    editor.unload_lora("mine")


def _pipeline_edit(editor: QwenEditEditor, images: list[Image.Image], request: EditRequest) -> Image.Image:
    """The per-edit loop before batching: the whole pipeline called once for one edit."""
    from flen_resources.editors.base import EditJob

    plan = editor._plan(EditJob(images, request))
    editor._apply_stack(plan.stack)
    with qwen_phases.vae_reference_area(plan.reference_area):
        image = editor.pipe(image=plan.inputs if len(plan.inputs) > 1 else plan.inputs[0], prompt=request.prompt,
                            negative_prompt=plan.negative if plan.true_cfg > 1 else None,
                            true_cfg_scale=plan.true_cfg, num_inference_steps=plan.steps, width=plan.width,
                            height=plan.height, generator=torch.Generator("cpu").manual_seed(request.seed)).images[0]
    if not plan.stack and editor._loaded:
        editor.pipe.enable_lora()
    return image


def test_the_reference_area_is_set_for_the_call_only():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    default = module.VAE_IMAGE_SIZE
    with qwen_phases.vae_reference_area(AREA):
        assert module.VAE_IMAGE_SIZE == AREA
    with pytest.raises(RuntimeError), qwen_phases.vae_reference_area(AREA):
        raise RuntimeError("a failed edit")
    assert module.VAE_IMAGE_SIZE == default
    with qwen_phases.vae_reference_area(None):
        assert module.VAE_IMAGE_SIZE == default


@pytest.mark.parametrize("area", [AREA, 64 * 64])  # the editor's output area, and a recipe entry's own
def test_the_tiny_editor_encodes_its_input_images_at_the_output_area_and_records_it(editor, photos, area):
    encoded = []
    hook = editor.pipe.vae.encoder.register_forward_hook(lambda _m, args, _out: encoded.append(args[0].shape[-2:]))
    try:
        result = editor.edit(photos[:1], _req(output_area=area))
    finally:
        hook.remove()
    assert encoded and all(h * w <= area * 1.1 for h, w in encoded), encoded  # not the pipeline's 1024x1024
    assert result.params["reference_area"] == area


def test_real_weights_encode_at_the_pipelines_own_size():
    from flen_resources.editors.base import EditJob

    real = QwenEditEditor(model="tiny", output_area=AREA)  # as the resource builds it for real weights
    photo = Image.new("RGB", (96, 96))
    assert real._plan(EditJob([photo], _req())).reference_area is None


def test_a_batch_gives_the_per_edit_loops_images_and_records(editor, photos):
    """Phase by phase over mixed stacks, input counts and cfg: each output and record is the single edit's."""
    from flen_resources.editors.base import EditJob

    jobs = [EditJob(photos[:1], _req(seed=11, loras={"angles": 1.0, "lightning-8step": 1.0})),
            EditJob(photos[:2], _req(seed=12, true_cfg=3.0)),
            EditJob(photos[1:2], _req(seed=13, loras={"angles": 0.5})),
            EditJob(photos[:1], _req(seed=14, loras={"angles": 1.0, "lightning-8step": 1.0})),
            EditJob(photos[2:3], _req(seed=15))]
    done = []
    batch = editor.edit_batch(jobs, progress=lambda: done.append(1))
    assert len(done) == len(jobs), "progress once per edit"
    for job, got in zip(jobs, batch, strict=True):
        single = editor.edit(job.images, job.request)
        assert (got.params, got.adapters, got.model, got.seed, got.prompt) == (
            single.params, single.adapters, single.model, single.seed, single.prompt)
        reference = _pipeline_edit(editor, list(job.images), job.request)
        assert got.image.size == reference.size
        # the same computation in another order: equal up to bf16 rounding (exact in fp32 on the CPU)
        assert np.abs(_arr(got.image) - _arr(reference)).max() <= 2
    assert batch[0].params["scheduler"] == "lightning" and batch[1].params["true_cfg"] == 3.0
    assert not np.array_equal(_arr(batch[0].image), _arr(batch[3].image)), "each edit keeps its own seed"


# -- Qwen-Image-Edit-2511 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def editor_2511() -> QwenEditEditor:
    return QwenEditEditor(model="tiny", output_area=AREA, references_at_output_area=True, model_key="qwen-image-edit-2511")


def test_2511_edits_with_zero_cond_t_and_records_its_release(editor_2511, photos):
    result = editor_2511.edit(photos[:1], _req(seed=5, loras={"lightning-8step-2511": 1.0}))
    assert editor_2511.pipe.transformer.config.zero_cond_t is True
    assert result.model.startswith("tiny/qwen-image-edit-2511@") and result.params["model_key"] == "qwen-image-edit-2511"
    assert result.params["steps"] == 8 and result.params["scheduler"] == "lightning"
    assert [a["name"] for a in result.adapters] == ["lightning-8step-2511"]
    assert np.isfinite(_arr(result.image)).all()


@pytest.mark.parametrize(("lora", "advice"), [("lightning-8step", "use 'lightning-8step-2511' instead"),
                                              ("angles", "qwen-image-edit-2511 has no angles LoRA: leave it out")])
def test_a_2509_lora_on_2511_is_refused_before_loading(editor_2511, photos, lora, advice):
    from flen_resources.models.loras import LoraError

    with pytest.raises(LoraError) as err:
        editor_2511.edit(photos[:1], _req(loras={lora: 1.0}))
    assert str(err.value) == f"LoRA {lora!r} was made for qwen-image-edit-2509, not qwen-image-edit-2511; {advice}"
    assert lora not in editor_2511._loaded
