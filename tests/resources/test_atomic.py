"""The one atomic-write helper: readers see the old file or the new one, and a failed write leaves no trace."""

from __future__ import annotations

import pytest

from flen_resources.atomic import atomic_path, write_bytes_atomic, write_text_atomic


def test_write_replaces_the_file_and_creates_its_folder(tmp_path):
    target = tmp_path / "deep" / "file.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "file.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_the_temp_is_a_hidden_sibling(tmp_path):
    with atomic_path(tmp_path / "x.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.json.") and tmp.suffix == ".tmp"
        tmp.write_text("{}")
    assert (tmp_path / "x.json").read_text() == "{}"
