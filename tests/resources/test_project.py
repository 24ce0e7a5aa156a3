"""Names that become partition keys and folders: slugs and iterations, and partition_dir's escape guard."""

from __future__ import annotations

import pytest

from flen_resources.project import InvalidNameError, Project, iteration_number, validate_iteration, validate_slug


@pytest.mark.parametrize("name", ["alice", "a", "bob-2", "eileen_collins", "0day", "x" * 64])
def test_slug_accepted(name):
    assert validate_slug(name) == name


@pytest.mark.parametrize("name", [
    "a/b", "/alice", "..", "../evil", "a..b/..", "a|b", "a,b", "a[b", "a]b", "[alice]", "ali ce", " alice", "alice ",
    "Alice", "ALICE", "", "x" * 65, "-alice", "_alice", ".alice", "alice\n", "a\\b", "a\x00b", "ålice",
])
def test_slug_refused(name):
    with pytest.raises(InvalidNameError, match="invalid character name"):
        validate_slug(name)


@pytest.mark.parametrize("name", [None, 3, b"alice"])
def test_slug_refuses_non_strings(name):
    with pytest.raises(InvalidNameError):
        validate_slug(name)


def test_slug_error_says_what_was_named():
    with pytest.raises(InvalidNameError, match="invalid asset name 'a/b'"):
        validate_slug("a/b", "asset name")


@pytest.mark.parametrize("name, number", [("v1", 1), ("v2", 2), ("v12", 12), ("v9999", 9999)])
def test_iteration_accepted(name, number):
    assert validate_iteration(name) == name
    assert iteration_number(name) == number


@pytest.mark.parametrize("name", ["v0", "1", "vx", "v", "", "V1", "v01", "v-1", "v1.0", "v1 ", "v1/..", "v10000", "v1\n"])
def test_iteration_refused(name):
    with pytest.raises(InvalidNameError, match="invalid iteration"):
        validate_iteration(name)


def test_partition_dir_inside_data(tmp_path):
    project = Project(tmp_path)
    path = project.partition_dir("source_images", "alice", "v1")
    assert path == (tmp_path / "data" / "source_images" / "alice" / "v1").resolve()


@pytest.mark.parametrize("asset, character, iteration", [
    ("..", "alice", "v1"),
    ("source_images", "..", "v1"),
    ("source_images", "../../etc", "v1"),
    ("source_images", "alice", ".."),
    ("source_images", "alice", "v1/../../.."),
    ("../source_images", "alice", "v1"),
    ("/tmp", "alice", "v1"),
    ("source_images", "/etc", "v1"),
])
def test_partition_dir_refuses_escapes(tmp_path, asset, character, iteration):
    with pytest.raises(InvalidNameError):
        Project(tmp_path).partition_dir(asset, character, iteration)


def test_partition_dir_refuses_symlink_out_of_data(tmp_path):
    project = Project(tmp_path / "project")
    project.data_dir.mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (project.data_dir / "source_images").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidNameError, match="outside the data folder"):
        project.partition_dir("source_images", "alice", "v1")


def test_partition_dir_allows_data_folder_itself_to_be_a_link(tmp_path):
    real = tmp_path / "disk" / "data"
    real.mkdir(parents=True)
    root = tmp_path / "project"
    root.mkdir()
    (root / "data").symlink_to(real, target_is_directory=True)
    path = Project(root).partition_dir("source_images", "alice", "v1")
    assert path == real.resolve() / "source_images" / "alice" / "v1"


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "Alice", ""])
def test_inbox_for_refuses_bad_names(tmp_path, name):
    with pytest.raises(InvalidNameError):
        Project(tmp_path).inbox_for(name)


def test_split_partition_key_validates_both_parts():
    import pytest

    from flen_resources.project import InvalidNameError, split_partition_key

    assert split_partition_key("alice|v1") == ("alice", "v1")
    for bad in ("alice", "alice|", "|v1", "Alice|v1", "alice|1", "../x|v1", "alice|v1|v2"):
        with pytest.raises(InvalidNameError):
            split_partition_key(bad)


def test_latest_iteration_reads_the_published_pointers(tmp_path):
    from flen_resources.project import Project

    project = Project(tmp_path)
    assert project.latest_iteration("alice") == 0
    folder = tmp_path / "data" / "synthetic_batch" / "alice"
    folder.mkdir(parents=True)
    for name in ("v1.dvc", "v2.dvc", "v10.dvc", "v3.dvc.tmp", "vx.dvc", "v02.dvc"):
        (folder / name).write_text("outs: []\n")
    assert project.latest_iteration("alice") == 10
    assert project.latest_iteration("alice", asset="training_set") == 0


def test_flen_command_names_the_project_and_quotes_each_part(tmp_path):
    from flen_resources.project import flen_command

    plain = Project(tmp_path / "proj")
    assert flen_command(plain, "lineage", "alice", "v1") == f"flen lineage alice v1 --project {plain.root}"
    odd = tmp_path / "my photos" / "it's"
    line = flen_command(odd, "materialize", "alice", "v2", "--from", "filtered_images")
    import shlex

    assert shlex.split(line) == ["flen", "materialize", "alice", "v2", "--from", "filtered_images", "--project", str(odd)]
