"""Partitions under control: an unknown character or a skipped iteration is refused before anything is
registered; `flen character remove` and `flen iteration remove` delete partition keys, refuse while data
exists unless --archive moves it to archive/; unknown names get a "did you mean".

No run executes here: the partition folders are written by hand (a folder, its .dvc pointer, the
.gitignore entry DVC adds), which is all the commands look at.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import shared_project
from typer.testing import CliRunner

from flen_assets.cli import app
from flen_assets.partitions import (
    PartitionRefused,
    add_partitions,
    character_partitions,
    check_new_partition,
    iteration_partitions,
)
from flen_assets.runs import init_project
from flen_resources.project import Project, did_you_mean


def _flen(*args: str):
    return CliRunner().invoke(app, list(args))


def _error(result) -> str:
    """The command's one error line (it must end the output, and be the only one)."""
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def _registered(project: Project) -> tuple[list[str], list[str]]:
    instance = init_project(project)
    return (list(instance.get_dynamic_partitions(character_partitions.name)),
            list(instance.get_dynamic_partitions(iteration_partitions.name)))


def _photos(project: Project, character: str) -> Path:
    inbox = project.inbox_for(character)
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "portrait.jpg").write_bytes(b"\xff\xd8 not decoded here")
    return inbox


def _publish(project: Project, asset: str, character: str, iteration: str) -> Path:
    """A published partition as DVC leaves it: the folder, its pointer, its entry in the .gitignore."""
    folder = project.partition_dir(asset, character, iteration)
    folder.mkdir(parents=True)
    (folder / "manifest.parquet").write_bytes(b"PAR1")
    folder.with_name(f"{iteration}.dvc").write_text(f"outs:\n- md5: 0123.dir\n  path: {iteration}\n")
    with open(folder.parent / ".gitignore", "a") as f:
        f.write(f"/{iteration}\n")
    return folder


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A project (git, DVC, instance) with photos of `astronaut` and nothing registered, made once."""
    with shared_project(tmp_path_factory, "partitions") as project:
        init_project(project)
        _photos(project, "astronaut")
        yield project


@pytest.fixture
def astronaut(template: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Project:
    """A fresh copy of the template, selected through $FLEN_PROJECT_DIR for this test."""
    root = tmp_path / "project"
    shutil.copytree(template.root, root, symlinks=True)
    monkeypatch.setenv("FLEN_PROJECT_DIR", str(root))
    monkeypatch.setenv("DAGSTER_HOME", str(root / ".flen" / "dagster"))
    return Project(root)


# -- refused before anything is registered -------------------------------------------------------

def test_unknown_character_is_refused_and_nothing_is_registered(astronaut):
    line = _error(_flen("materialize", "astronot", "v1"))
    assert line.startswith("error: unknown character 'astronot' (did you mean astronaut?)"), line
    assert "flen character add astronot --from DIR" in line
    assert _registered(astronaut) == ([], [])
    assert init_project(astronaut).get_runs() == []
    assert not astronaut.inbox_for("astronot").exists()


def test_a_character_with_photos_or_registered_is_known(astronaut):
    instance = init_project(astronaut)
    check_new_partition(astronaut, instance, "astronaut", "v1")  # photos in its inbox
    add_partitions(instance, "bob", "v1")
    check_new_partition(astronaut, instance, "bob", "v1")  # registered
    with pytest.raises(PartitionRefused, match=r"unknown character 'bobb' \(did you mean bob\?\)"):
        check_new_partition(astronaut, instance, "bobb", "v1")
    (astronaut.inbox_for("empty")).mkdir()
    with pytest.raises(PartitionRefused, match="unknown character 'empty'"):  # a folder without photos
        check_new_partition(astronaut, instance, "empty", "v1")


def test_a_skipped_iteration_is_refused_and_nothing_is_registered(astronaut):
    line = _error(_flen("materialize", "astronaut", "v3", "--all"))
    assert line == ("error: astronaut|v3 would skip an iteration: astronaut|v2 is not complete (its synthetic_batch "
                    "is not published); did you mean v1? Complete it with `flen materialize astronaut v1 --all "
                    f"--project {astronaut.root}`, then `flen iterate astronaut --project {astronaut.root}` runs "
                    "the next one")
    assert _registered(astronaut) == ([], [])
    assert init_project(astronaut).get_runs() == []


def test_the_next_iteration_needs_the_previous_synthetic_batch(astronaut):
    instance = init_project(astronaut)
    _publish(astronaut, "training_set", "astronaut", "v1")
    with pytest.raises(PartitionRefused, match=r"astronaut\|v1 is not complete .* did you mean v1\?"):
        check_new_partition(astronaut, instance, "astronaut", "v2")
    _publish(astronaut, "synthetic_batch", "astronaut", "v1")
    check_new_partition(astronaut, instance, "astronaut", "v2")
    with pytest.raises(PartitionRefused, match=r"astronaut\|v2 is not complete .* did you mean v2\?"):
        check_new_partition(astronaut, instance, "astronaut", "v3")


def test_character_add_refuses_a_skipped_iteration(astronaut, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"\xff\xd8")
    line = _error(_flen("character", "add", "carol", "--from", str(photos), "--iteration", "v2"))
    assert "carol|v2 would skip an iteration" in line
    assert not astronaut.inbox_for("carol").exists()
    assert _registered(astronaut) == ([], [])


def test_character_add_takes_the_photos_already_in_its_inbox(astronaut):
    added = _flen("character", "add", "astronaut")
    assert added.exit_code == 0, added.output
    assert "1 file(s) already in" in added.output and "partition astronaut|v1 registered" in added.output
    assert _registered(astronaut) == (["astronaut"], ["v1"])
    assert [p.name for p in astronaut.inbox_for("astronaut").iterdir()] == ["portrait.jpg"], "nothing copied"
    line = _error(_flen("character", "add", "carol"))
    assert line == "error: inbox/carol holds no photos: put them there, or copy them in with --from FOLDER"
    assert _registered(astronaut) == (["astronaut"], ["v1"])


def test_review_of_an_unknown_character_says_did_you_mean(astronaut):
    line = _error(_flen("review", "astronot"))
    assert line.startswith("error: unknown character 'astronot' (did you mean astronaut?)"), line


def test_did_you_mean():
    assert did_you_mean("astronot", ["astronaut", "bob"]) == " (did you mean astronaut?)"
    assert did_you_mean("zed", ["astronaut", "bob"]) == " (known: astronaut, bob)"
    assert did_you_mean("v7", ["v1", "v2"], "it has") == " (it has: v1, v2)"
    assert did_you_mean("x", []) == ""


# -- flen character remove --------------------------------------------------------------------------

def test_a_character_without_data_is_removed(astronaut):
    add_partitions(init_project(astronaut), "astronot", "v1")  # registered by mistake, nothing else
    assert _flen("character", "remove", "astronot").exit_code == 0
    assert _registered(astronaut) == ([], ["v1"])


def test_character_remove_refuses_while_data_exists_then_archives(astronaut):
    instance = init_project(astronaut)
    add_partitions(instance, "astronaut", "v1")
    folder = _publish(astronaut, "source_images", "astronaut", "v1")
    report = astronaut.data_dir / "reports" / "eval_history-astronaut.csv"
    report.parent.mkdir()
    report.write_text("iteration,identity_consistency\n")

    line = _error(_flen("character", "remove", "astronaut"))
    assert line.startswith("error: astronaut has data (data/source_images/astronaut/v1, inbox/astronaut, "
                           "data/reports/eval_history-astronaut.csv): add --archive"), line
    assert folder.is_dir() and _registered(astronaut) == (["astronaut"], ["v1"])

    result = _flen("character", "remove", "astronaut", "--archive")
    assert result.exit_code == 0, result.output
    archives = list((astronaut.root / "archive").iterdir())
    assert len(archives) == 1 and archives[0].name.endswith("-astronaut")
    kept = archives[0]
    assert (kept / "data/source_images/astronaut/v1/manifest.parquet").read_bytes() == b"PAR1"
    assert (kept / "data/source_images/astronaut/v1.dvc").is_file()
    assert (kept / "data/source_images/astronaut/.gitignore").read_text() == "/v1\n"  # still out of git
    assert (kept / "inbox/astronaut/portrait.jpg").is_file()
    assert (kept / "data/reports/eval_history-astronaut.csv").is_file()
    assert not (astronaut.data_dir / "source_images" / "astronaut").exists()
    assert not astronaut.inbox_for("astronaut").exists() and not report.exists()
    assert _registered(astronaut) == ([], ["v1"])
    assert "did you mean astronaut" not in _flen("materialize", "astronaut", "v1").stderr  # now unknown
    assert _registered(astronaut) == ([], ["v1"])


def test_remove_of_an_unknown_character_says_did_you_mean(astronaut):
    line = _error(_flen("character", "remove", "astronot"))
    assert line.startswith("error: unknown character 'astronot' (did you mean astronaut?)"), line


@pytest.mark.parametrize("args", [("character", "remove", "../inbox"), ("iteration", "remove", "astronaut", "../v1"),
                                  ("iteration", "remove", "a|b", "v1")])
def test_remove_validates_names(astronaut, args):
    line = _error(_flen(*args))
    assert "invalid" in line
    assert astronaut.inbox_for("astronaut").is_dir()


# -- flen iteration remove ----------------------------------------------------------------------------

def test_iteration_remove(astronaut):
    instance = init_project(astronaut)
    for character in ("astronaut", "bob"):
        for iteration in ("v1", "v2"):
            add_partitions(instance, character, iteration)
    _photos(astronaut, "bob")
    for iteration in ("v1", "v2"):
        _publish(astronaut, "source_images", "astronaut", iteration)
        _publish(astronaut, "training_set", "astronaut", iteration)
    _publish(astronaut, "source_images", "bob", "v2")

    line = _error(_flen("iteration", "remove", "astronaut", "v1", "--archive"))
    assert line == "error: astronaut|v1 is not astronaut's last iteration (v2 build on it): remove v2 first"
    assert _error(_flen("iteration", "remove", "astronaut", "v7")) == \
        "error: astronaut has no iteration v7 (it has: v1, v2)"
    line = _error(_flen("iteration", "remove", "astronaut", "v2"))
    assert line.startswith("error: astronaut|v2 has data (data/source_images/astronaut/v2, "
                           "data/training_set/astronaut/v2): add --archive"), line

    result = _flen("iteration", "remove", "astronaut", "v2", "--archive")
    assert result.exit_code == 0, result.output
    assert "v2 stays registered: other characters have data in it" in result.stdout
    kept = next((astronaut.root / "archive").iterdir())
    assert kept.name.endswith("-astronaut-v2")
    assert sorted(p.relative_to(kept).as_posix() for p in kept.rglob("*.dvc")) == [
        "data/source_images/astronaut/v2.dvc", "data/training_set/astronaut/v2.dvc"]
    assert (astronaut.data_dir / "source_images/astronaut/.gitignore").read_text() == "/v1\n"  # v2's entry moved
    assert (astronaut.data_dir / "source_images/astronaut/v1").is_dir()
    assert _registered(astronaut) == (["astronaut", "bob"], ["v1", "v2"])

    assert _flen("iteration", "remove", "bob", "v2", "--archive").exit_code == 0
    assert _registered(astronaut) == (["astronaut", "bob"], ["v1"])  # nobody has v2 now
    assert len(list((astronaut.root / "archive").iterdir())) == 2  # never deleted
