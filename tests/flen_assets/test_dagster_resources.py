"""The editor resource builds the Qwen editor by where its weights come from (no model loads here)."""

from __future__ import annotations

from flen_assets.dagster_resources import EditorResource, ModelsResource


def _editor(source: str):
    return EditorResource(models=ModelsResource(qwen_edit_model=source, device="cpu")).get("qwen_edit")


def test_the_tiny_pack_edits_at_256_px_and_encodes_its_input_images_at_that_size():
    editor = _editor("tiny")
    assert editor.output_area == 256 * 256 and editor.references_at_output_area is True


def test_real_weights_edit_at_1024_px_with_the_pipelines_own_input_size(tmp_path):
    editor = _editor(str(tmp_path / "qwen-image-edit-2509"))  # a folder: not resolved until the first edit
    assert editor.output_area == 1024 * 1024 and editor.references_at_output_area is False


def test_a_setting_that_is_not_a_number_is_named_with_its_fix(monkeypatch):
    import dagster as dg
    import pytest

    from flen_resources.deployment import DeploymentError

    models = ModelsResource(memory_budget_gib=dg.EnvVar.int("FLEN_MEMORY_BUDGET_GIB"))
    monkeypatch.setenv("FLEN_MEMORY_BUDGET_GIB", "16")
    assert models.read_now().memory_budget_gib == 16
    monkeypatch.setenv("FLEN_MEMORY_BUDGET_GIB", "abc")
    with pytest.raises(DeploymentError, match=r"FLEN_MEMORY_BUDGET_GIB='abc' is not a whole number .* "
                                              r"FLEN_MEMORY_BUDGET_GIB=20, or unset it"):
        models.read_now()


def test_a_setting_set_empty_is_the_default(monkeypatch):
    from flen_assets.definitions import model_settings

    monkeypatch.setenv("FLEN_MEMORY_BUDGET_GIB", "")
    monkeypatch.setenv("FLEN_QUANTIZATION", "")
    models = model_settings().read_now()
    assert (models.memory_budget_gib, models.quantization) == (20, "auto")
