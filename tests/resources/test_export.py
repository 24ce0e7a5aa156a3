"""flen_resources.export: refusals before anything is written (the cards themselves: test_flywheel.py on the demo)."""

import pytest

from flen_resources.export import ExportError, export_iteration
from flen_resources.project import Project


def test_an_unmaterialized_training_set_is_refused_with_the_command_that_makes_it(tmp_path):
    with pytest.raises(ExportError, match=r"training_set alice\|v1 is not materialized: run `flen materialize alice v1 --project "):
        export_iteration(Project(tmp_path / "project"), "alice", "v1", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_folder_with_files_is_never_written_into(tmp_path):
    project = Project(tmp_path / "project")
    training = project.partition_dir("training_set", "alice", "v1")
    training.mkdir(parents=True)
    (training / "manifest.parquet").write_bytes(b"")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(ExportError, match="exists and is not empty: choose a new --to folder"):
        export_iteration(project, "alice", "v1", out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep"
