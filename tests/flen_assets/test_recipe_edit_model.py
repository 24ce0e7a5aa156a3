"""A recipe's `edit_model` (Qwen-Image-Edit-2509 or -2511): what it expands to, the one-line errors for a
LoRA or an adapter of the other release, and which release qwen_adapter trains on."""

from __future__ import annotations

import dagster as dg
import pytest

from flen_assets.assets.edit_model import adapter_edit_model
from flen_assets.assets.enrichment import check_adapter_fits
from flen_assets.recipe import RecipeError, load_recipe
from flen_resources.models.registry import ANGLE_PRESETS

Q2509, Q2511 = "qwen-image-edit-2509", "qwen-image-edit-2511"


def _recipe(tmp_path, head: str, entries: str):
    path = tmp_path / "r.toml"
    path.write_text(f'name = "r"\neditor = "qwen_edit"\n{head}\n{entries}')
    return path


def test_without_edit_model_a_recipe_edits_with_2509(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, "", '[[entries]]\nid = "left"\npreset = "rotate-left-45"\n'))
    assert recipe.edit_model == Q2509
    assert recipe.entries[0].params["loras"] == {"angles": 1.0, "lightning-8step": 1.0}


def test_edit_model_2511_gives_presets_its_own_lightning(tmp_path):
    path = _recipe(tmp_path, f'edit_model = "{Q2511}"', '[[entries]]\nid = "left"\npreset = "rotate-left-45"\n'
                   '[[entries]]\nid = "beach"\nprompt = "on a beach"\nloras = { lightning-4step-2511 = 1.0 }\n')
    recipe = load_recipe(path)
    assert recipe.edit_model == Q2511
    left, beach = recipe.entries
    assert left.prompt == ANGLE_PRESETS["rotate-left-45"] and left.params["loras"] == {"lightning-8step-2511": 1.0}
    assert beach.params["loras"] == {"lightning-4step-2511": 1.0}


def test_the_builtin_angles_2511_recipe():
    recipe = load_recipe("angles-2511")
    assert recipe.edit_model == Q2511 and len(recipe.entries) == len(load_recipe("angles").entries)
    assert all(set(e.params.get("loras", {})) <= {"lightning-8step-2511"} for e in recipe.entries)


@pytest.mark.parametrize(("head", "lora", "fix"), [
    (f'edit_model = "{Q2511}"', "lightning-8step", f"use 'lightning-8step-2511' instead, or set edit_model = \"{Q2509}\""),
    (f'edit_model = "{Q2511}"', "angles", f"{Q2511} has no angles LoRA: leave it out, or set edit_model = \"{Q2509}\""),
    ("", "lightning-4step-2511", f"use 'lightning-4step' instead, or set edit_model = \"{Q2511}\""),
])
def test_a_lora_of_the_other_release_is_one_line_naming_the_setting_and_the_fix(tmp_path, head, lora, fix):
    path = _recipe(tmp_path, head, f'[[entries]]\nid = "smile"\nprompt = "smile"\nloras = {{ {lora} = 1.0 }}\n')
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: entry 'smile': LoRA {lora!r} was made for ")
    assert message.endswith(f"{fix} at the top of the recipe"), message


def test_an_unknown_edit_model_is_refused(tmp_path):
    with pytest.raises(RecipeError, match=r"edit_model = 'qwen-image-edit-2512' is not an editor model; use one of "
                                          r"\"qwen-image-edit-2509\", \"qwen-image-edit-2511\""):
        load_recipe(_recipe(tmp_path, 'edit_model = "qwen-image-edit-2512"', '[[entries]]\nid = "a"\nprompt = "a"\n'))


def test_the_adapter_trains_on_the_release_of_the_latest_edits():
    rows = [{"origin_iteration": "v1", "edit_model": Q2509}, {"origin_iteration": "v10", "edit_model": Q2511},
            {"origin_iteration": "v2", "edit_model": Q2509}, {"origin_iteration": "v11", "edit_model": None}]
    assert adapter_edit_model("", rows) == Q2511, "v10 is the latest that recorded one (not v2: numbers, not text)"
    assert adapter_edit_model(Q2509, rows) == Q2509, "the asset's config overrules the recipe's"
    assert adapter_edit_model("", [{"origin_iteration": "v1"}]) == Q2509, "triplets from before edit_model was kept"
    with pytest.raises(dg.Failure, match=r"edit_model 'sdxl' is not an editor model: set it to one of"):
        adapter_edit_model("sdxl", rows)


def test_an_adapter_of_the_other_release_stops_enrichment_with_the_fix():
    adapter = {"iteration": "v1", "edit_model": Q2509}
    check_adapter_fits(adapter, "angles", Q2509)
    with pytest.raises(dg.Failure) as err:
        check_adapter_fits(adapter, "angles-2511", Q2511)
    assert err.value.description == (
        f"qwen_adapter v1 was trained on {Q2509} and recipe 'angles-2511' edits with {Q2511} (its edit_model): "
        f"set enriched_images' adapter_weight to 0 to leave the adapter out, or set edit_model = \"{Q2509}\" "
        "in the recipe")
