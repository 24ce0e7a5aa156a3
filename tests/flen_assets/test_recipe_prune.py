"""The opt-in [prune] table of a recipe: entries that lost the character in earlier iterations are dropped
or down-weighted, never on too few edits; a malformed table is one clear error."""

import pytest

from flen_assets.recipe import PruneRule, RecipeError, load_recipe

ANGLES = """\
name = "angles-pruned"
version = 1
editor = "qwen_edit"
{prune}
[[entries]]
id = "left-45"
preset = "rotate-left-45"

[[entries]]
id = "beach"
prompt = "put the person on a beach"
"""


def _recipe(tmp_path, prune: str):
    path = tmp_path / "r.toml"
    path.write_text(ANGLES.format(prune=prune))
    return load_recipe(path)


def test_an_entry_below_the_rate_is_dropped_and_the_others_run(tmp_path):
    recipe = _recipe(tmp_path, "[prune]\nmin_pass_rate = 0.5\n")
    entries, changes = recipe.prune.apply(recipe.entries, {"left-45": (0.25, 8), "beach": (0.9, 8)})
    assert [e.id for e in entries] == ["beach"]
    assert changes == [{"entry": "left-45", "pass_rate": 0.25, "edits": 8, "min_pass_rate": 0.5, "action": "dropped"}]


def test_down_weighting_scales_the_entrys_loras(tmp_path):
    recipe = _recipe(tmp_path, "[prune]\nmin_pass_rate = 0.5\naction = \"down-weight\"\nfactor = 0.5\n")
    entries, changes = recipe.prune.apply(recipe.entries, {"left-45": (0.0, 8), "beach": (0.0, 8)})
    assert [e.id for e in entries] == ["left-45"], "beach has no LoRA to weigh down: dropped"
    assert entries[0].params["loras"] == {"angles": 0.5, "lightning-8step": 0.5}
    assert [c["action"] for c in changes] == ["down-weighted", "dropped"]


def test_too_few_edits_or_no_record_keeps_an_entry():
    rule = PruneRule(min_pass_rate=0.9, min_edits=4)
    recipe = load_recipe("angles")
    entries, changes = rule.apply(recipe.entries, {recipe.entries[0].id: (0.0, 3)})
    assert entries == recipe.entries and changes == []


def test_without_a_prune_table_nothing_is_pruned():
    assert load_recipe("demo").prune is None


@pytest.mark.parametrize("table, says", [
    ("[prune]\n", "[prune] needs min_pass_rate = a number from 0 to 1"),
    ("[prune]\nmin_pass_rate = 2\n", "[prune] needs min_pass_rate = a number from 0 to 1"),
    ("[prune]\nmin_pass_rate = 0.3\naction = \"halve\"\n", "[prune] action 'halve' is not one of drop, down-weight"),
    ("[prune]\nmin_pass_rate = 0.3\nfactor = 1.5\n", "[prune] factor 1.5 must be a number between 0 and 1"),
])
def test_a_malformed_prune_table_names_the_file_and_the_fix(tmp_path, table, says):
    with pytest.raises(RecipeError, match=r"r\.toml: " + says.replace("[", r"\[").replace("]", r"\]")):
        _recipe(tmp_path, table)
