"""The classic editor: deterministic, identity-preserving, with clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image

from flen_assets.recipe import RecipeError, load_recipe
from flen_resources.editors import EditRequest, UnknownEditorError, get_editor
from flen_resources.editors.classic import OPERATIONS
from flen_resources.faces import FaceAnalyzer, face_distance
from flen_resources.imaging import png_bytes


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    return Image.fromarray(skimage.data.astronaut()).crop((40, 0, 400, 320))


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer()


def test_every_builtin_recipe_entry_keeps_the_identity(portrait, analyzer):
    editor = get_editor("classic")
    (ref,) = analyzer.analyze(portrait)
    recipe = load_recipe()
    assert {e.operation for e in recipe.entries} <= set(OPERATIONS)
    for entry in recipe.entries:
        result = editor.edit([portrait], entry.request_for("parent", recipe.version), face_box=ref.box)
        assert result.image.size == portrait.size and result.image.mode == "RGB"
        faces = analyzer.analyze(result.image)
        assert len(faces) == 1, entry.id
        assert face_distance(faces[0].embedding, ref.embedding) < 0.4, entry.id
        assert result.model == "classic/1" and result.operation == entry.operation


def test_same_seed_same_image_other_seed_other_params(portrait):
    editor = get_editor("classic")
    req = EditRequest("tilt", "rotate", {"degrees": [-8.0, 8.0]}, seed=7)
    a, b = editor.edit([portrait], req), editor.edit([portrait], req)
    assert png_bytes(a.image) == png_bytes(b.image)
    assert -8.0 <= a.params["degrees"] <= 8.0
    other = editor.edit([portrait], EditRequest("tilt", "rotate", {"degrees": [-8.0, 8.0]}, seed=8))
    assert other.params["degrees"] != a.params["degrees"]


def test_a_batch_is_the_single_edits_in_order_with_progress_per_edit(portrait):
    from flen_resources.editors import EditJob

    editor = get_editor("classic")
    requests = [EditRequest("tilt", "rotate", {"degrees": [-8.0, 8.0]}, seed=s) for s in (1, 2, 3)]
    done = []
    batch = editor.edit_batch([EditJob([portrait], r) for r in requests], progress=lambda: done.append(1))
    assert [png_bytes(b.image) for b in batch] == [png_bytes(editor.edit([portrait], r).image) for r in requests]
    assert len(done) == 3


def test_rotation_leaves_no_empty_corners(portrait):
    out = np.asarray(get_editor("classic").edit([portrait], EditRequest("t", "rotate", {"degrees": 8.0})).image)
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        assert corner.sum() > 30


def test_errors_name_the_problem(portrait):
    editor = get_editor("classic")
    with pytest.raises(ValueError, match="unknown classic operation 'sepia'"):
        editor.edit([portrait], EditRequest("x", "sepia"))
    with pytest.raises(ValueError, match="bad parameters"):
        editor.edit([portrait], EditRequest("x", "zoom", {"strength": 2}))
    with pytest.raises(ValueError, match="needs one input image"):
        editor.edit([], EditRequest("x", "mirror"))
    with pytest.raises(UnknownEditorError, match="unknown editor backend"):
        get_editor("photoshop")


def test_recipe_errors_name_the_file(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("entries = [")
    with pytest.raises(RecipeError, match="bad.toml is not valid TOML"):
        load_recipe(bad)
    dup = tmp_path / "dup.toml"
    dup.write_text('[[entries]]\nid="a"\noperation="mirror"\n[[entries]]\nid="a"\noperation="zoom"\n')
    with pytest.raises(RecipeError, match="'a' appears twice"):
        load_recipe(dup)
    empty = tmp_path / "empty.toml"
    empty.write_text('name="x"\n')
    with pytest.raises(RecipeError, match="no \\[\\[entries\\]\\]"):
        load_recipe(empty)
