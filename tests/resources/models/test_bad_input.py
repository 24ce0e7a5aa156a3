"""Bad input to the qwen_edit editor and to qwen_edit recipes (issue 3).

Model sources and folders: test_sources.py; LoRA files and stacks: test_loras.py.
"""

from __future__ import annotations

import pytest
from PIL import Image

from flen_assets.recipe import RecipeError, load_recipe
from flen_resources.editors import EditRequest, qwen_edit
from flen_resources.editors.qwen_edit import EditInputError, QwenEditEditor, check_inputs
from flen_resources.models.registry import ANGLE_PRESETS


def _img(w: int = 96, h: int = 80, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, (w, h))


# -- input images -----------------------------------------------------------------------------------


def test_no_images():
    with pytest.raises(EditInputError, match=r"qwen_edit needs 1 to 3 input images, got none"):
        check_inputs([])


def test_four_images():
    with pytest.raises(EditInputError) as err:
        check_inputs([_img() for _ in range(4)])
    assert "qwen_edit takes at most 3 input images" in str(err.value) and "got 4" in str(err.value)


@pytest.mark.parametrize("size", [(20, 20), (63, 500), (500, 63)])
def test_too_small_image(size):
    w, h = size
    with pytest.raises(EditInputError) as err:
        check_inputs([_img(), _img(w, h)])
    message = str(err.value)
    assert f"input image 2 is {w}x{h} px" in message
    assert "at least 64 px" in message


def test_huge_image():
    huge = Image.new("L", (8000, 6000))  # 48 MP; one byte a pixel keeps it cheap
    with pytest.raises(EditInputError) as err:
        check_inputs([huge])
    message = str(err.value)
    assert "input image 1 is 8000x6000 px" in message
    assert "over the 40 MP limit" in message and "downscale" in message


def test_sizes_at_the_limits_are_accepted():
    (small,) = check_inputs([_img(64, 64)])
    assert small.size == (64, 64)
    assert len(check_inputs([_img(64, 64), _img(8000, 5000, "L"), _img(100, 64)])) == 3  # 40 MP exactly


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1", "I;16"])
def test_non_rgb_images_are_converted(mode):
    source = _img(96, 80, mode)
    (out,) = check_inputs([source])
    assert out.mode == "RGB" and out.size == (96, 80)
    assert source.mode == mode  # the caller's image is left as it was


def test_rgb_images_pass_through_unchanged():
    images = [_img(), _img(128, 64)]
    assert all(a is b for a, b in zip(check_inputs(images), images))


def test_four_images_fail_in_the_editor_before_any_model_load(monkeypatch, tiny_pack):
    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded for a request that cannot run")

    monkeypatch.setattr(qwen_edit, "load_pipeline", no_load)
    monkeypatch.setattr(qwen_edit, "resolve_model", no_load)
    editor = QwenEditEditor(model="tiny", device="cpu")
    request = EditRequest(recipe_id="four", operation="qwen_edit", prompt="merge them", seed=0)
    with pytest.raises(EditInputError, match=r"at most 3 input images .* got 4"):
        editor.edit([_img() for _ in range(4)], request)
    assert editor._pipe is None and editor._resolved is None


def test_editor_without_prompt(monkeypatch):
    monkeypatch.setattr(qwen_edit, "load_pipeline", lambda *a, **k: pytest.fail("pipeline loaded"))
    editor = QwenEditEditor(model="tiny", device="cpu")
    request = EditRequest(recipe_id="no-prompt", operation="qwen_edit", prompt=None, seed=0)
    with pytest.raises(EditInputError, match=r"recipe entry 'no-prompt': qwen_edit needs a prompt"):
        editor.edit([_img()], request)


# -- recipes ----------------------------------------------------------------------------------------


def _recipe(tmp_path, body: str):
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\nversion = 1\neditor = "qwen_edit"\n\n' + body)
    return path


def test_qwen_edit_entry_without_prompt_or_preset(tmp_path):
    path = _recipe(tmp_path, '[[entries]]\nid = "nothing"\ncaption = "no instruction at all"\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message
    assert "entry 'nothing'" in message and "needs a 'prompt' or a 'preset'" in message


def test_qwen_edit_entry_in_a_classic_recipe_without_prompt(tmp_path):
    path = tmp_path / "mixed.toml"
    path.write_text('name = "mixed"\n[[entries]]\nid = "q"\neditor = "qwen_edit"\n')
    with pytest.raises(RecipeError, match=r"entry 'q': a qwen_edit entry needs a 'prompt' or a 'preset'"):
        load_recipe(path)


def test_unknown_camera_preset(tmp_path):
    path = _recipe(tmp_path, '[[entries]]\nid = "spin"\npreset = "spin-around"\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert str(path) in message
    assert "entry 'spin': unknown camera preset 'spin-around'" in message
    assert all(name in message for name in ANGLE_PRESETS)


def test_a_valid_preset_entry_loads(tmp_path):
    """The control: a preset expands to its camera command and the default LoRA stack."""
    path = _recipe(tmp_path, '[[entries]]\nid = "left"\npreset = "rotate-left-45"\nprompt = "keep the face"\n')
    (entry,) = load_recipe(path).entries
    assert entry.operation == "qwen_edit"
    assert entry.prompt == ANGLE_PRESETS["rotate-left-45"] + " keep the face"
    assert entry.params["loras"] == {"angles": 1.0, "lightning-8step": 1.0}
