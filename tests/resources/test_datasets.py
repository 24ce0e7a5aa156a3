"""dataset_items: a training_set folder or a flat folder of images, with captions, and one md5 of it all; the
generating assets' prompt templates with the trigger word."""

from __future__ import annotations

from pathlib import Path

import pytest

from flen_resources.datasets import PromptError, dataset_images, dataset_items, prompts_with_trigger


def _folder(root: Path) -> list[Path]:
    root.mkdir(parents=True)
    paths = [root / name for name in ("b.png", "a.JPG", "c.webp")]
    for i, path in enumerate(paths):
        path.write_bytes(b"image %d" % i)
    (root / "a.txt").write_text("  photo of bob \n")
    (root / "c.txt").write_text("\n")  # empty: the default caption
    (root / "notes.md").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"temp file")
    (root / "sub.png").mkdir()
    return paths


def test_flat_folder(tmp_path: Path):
    paths = _folder(tmp_path / "flat")
    items, md5 = dataset_items(tmp_path / "flat")
    assert [i.image.name for i in items] == ["a.JPG", "b.png", "c.webp"]
    assert [i.caption for i in items] == ["photo of bob", None, None]
    assert len(md5) == 32 and int(md5, 16) >= 0
    assert dataset_images(tmp_path / "flat") == sorted(paths)


def test_training_set_folder_reads_images_subfolder(tmp_path: Path):
    _folder(tmp_path / "ts" / "images")
    (tmp_path / "ts" / "manifest.parquet").write_bytes(b"not read")
    (tmp_path / "ts" / "top.png").write_bytes(b"outside images/")
    items, _ = dataset_items(tmp_path / "ts")
    assert [i.image.parent.name for i in items] == ["images"] * 3


def test_md5_follows_names_bytes_and_captions(tmp_path: Path):
    folder = tmp_path / "flat"
    _folder(folder)
    first = dataset_items(folder)[1]
    assert dataset_items(folder)[1] == first, "the same folder, the same md5"
    (folder / "b.txt").write_text("photo of bob")
    captioned = dataset_items(folder)[1]
    assert captioned != first
    (folder / "b.png").write_bytes(b"other bytes")
    assert dataset_items(folder)[1] not in (first, captioned)
    before = dataset_items(folder)[1]
    (folder / "notes.md").write_text("still not an image")
    assert dataset_items(folder)[1] == before, "what is not an image is not part of the dataset"


def test_empty_folder(tmp_path: Path):
    items, md5 = dataset_items(tmp_path)
    assert items == [] and md5 == "d41d8cd98f00b204e9800998ecf8427e"


def test_prompt_templates_take_the_trigger_word():
    assert prompts_with_trigger(["photo of {trigger}", "{trigger} {{smiling}}"], "ada_flen", "cfg") == [
        "photo of ada_flen", "ada_flen {smiling}"]


@pytest.mark.parametrize(("templates", "names"), [
    ([], ["cfg is empty", "give at least one prompt"]),
    (["photo of {trigger}", "  "], ["cfg[1] is blank"]),
    (["photo of {name}"], ["cfg[0] 'photo of {name}'", "only {trigger} can be filled in, not {name}", "{{"]),
    (["photo of {trigger"], ["cfg[0]", "expected '}'", "{{"]),
    (["{trigger.upper}"], ["not {trigger.upper}"]),  # str.format would put a bound method's repr in the prompt
    (["{trigger!r}"], ["not {trigger!r}"]),
    (["{trigger:>99999999999}"], ["not {trigger:>99999999999}"]),  # str.format: MemoryError
    (["{trigger[x]}"], ["not {trigger[x]}"]),  # str.format: TypeError
])
def test_unusable_prompt_templates_name_the_setting_the_entry_and_the_fix(templates, names):
    with pytest.raises(PromptError) as err:
        prompts_with_trigger(templates, "ada_flen", "cfg")
    assert all(name in str(err.value) for name in names), str(err.value)
