"""`flen checkout` restores a version by its full DVC md5 or a unique 8+ hex prefix, and nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import shared_project
from typer.testing import CliRunner

from flen_assets.cli import app
from flen_resources.lineage import LineageStore, utcnow
from flen_resources.project import Project
from flen_resources.storage import DvcStore, PublishedFolder
from tests_helpers import folder_digest

Versions = tuple[Project, PublishedFolder, PublishedFolder]


def _publish(project: Project, files: dict[str, bytes]) -> PublishedFolder:
    """Publish source_images alice|v1 with `files` and record it in lineage, as an asset's publish() does."""
    store = DvcStore(project)
    staged = store.stage("source_images", "alice", "v1")
    for name, data in files.items():
        (staged / name).write_bytes(data)
    published = store.publish(staged, "source_images", "alice", "v1")
    LineageStore(project.lineage_dir).append("artifacts", [dict(
        run_id=published.dvc_md5, asset="source_images", character="alice", iteration="v1",
        path=project.relative(published.path), dvc_md5=published.dvc_md5, n_files=published.n_files,
        size_bytes=published.size_bytes, dvc_file=published.dvc_file, created_at=utcnow())])
    return published


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Versions]:
    """A project with version a, then version b, of source_images alice|v1 (DVC is slow: one per module)."""
    with shared_project(tmp_path_factory, "checkout") as project:
        DvcStore(project).ensure_repo()
        yield project, _publish(project, {"one.txt": b"1"}), _publish(project, {"two.txt": b"2"})


def _checkout(project: Project, md5: str):
    return CliRunner().invoke(app, ["checkout", "source_images", "alice", "v1", md5, "--project", str(project.root)])


def _state(published: PublishedFolder) -> tuple[dict[str, str], str]:
    """The partition folder's files and its .dvc pointer: what a restore changes."""
    return folder_digest(published.path), published.path.with_name("v1.dvc").read_text()


def test_checkout_refuses_what_is_not_an_md5(versions: Versions):
    project, a, b = versions
    before = _state(b)
    for md5 in ["", "%", "5_8", "________", "%%%%%%%%", "abc", a.dvc_md5[:7], "not-an-md5", "z" * 32,
                a.dvc_md5 + "0", f"{a.dvc_md5[:8]}%"]:
        result = _checkout(project, md5)
        assert result.exit_code == 1, md5
        assert result.output.strip() == (f"error: md5 {md5!r} is not a DVC md5: give the full 32-hex md5 or a unique "
                                         "prefix of 8+ hex characters from `flen versions source_images alice v1`")
        assert _state(b) == before, f"{md5!r} restored something"


def test_checkout_refuses_unknown_and_ambiguous_md5(versions: Versions):
    project, a, b = versions
    assert _checkout(project, a.dvc_md5).exit_code == 0
    before = _state(a)
    unknown = next(p for p in ("00000000", "11111111") if not a.dvc_md5.startswith(p) and not b.dvc_md5.startswith(p))
    result = _checkout(project, unknown)
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: no version {unknown} of source_images alice|v1; "
                                     "see `flen versions source_images alice v1`")
    # another version sharing b's first 8 hex characters makes that prefix ambiguous
    twin = b.dvc_md5[:8] + ("f" if b.dvc_md5[8] != "f" else "e") * 24 + ".dir"
    LineageStore(project.lineage_dir).append("artifacts", [dict(
        run_id="twin", asset="source_images", character="alice", iteration="v1", dvc_md5=twin, dvc_file="-",
        created_at=utcnow())])
    result = _checkout(project, b.dvc_md5[:8])
    assert result.exit_code == 1
    out = result.output.strip()
    assert out.startswith(f"error: md5 prefix '{b.dvc_md5[:8]}' matches 2 versions of source_images alice|v1: {twin} (")
    assert f", {b.dvc_md5} (" in out and out.endswith("; give more characters")
    assert _state(a) == before, "nothing restored"
    # one more character settles it
    assert _checkout(project, b.dvc_md5[:9]).exit_code == 0
    assert sorted(folder_digest(b.path)) == ["two.txt"]


def test_checkout_restores_by_full_md5_hex_or_prefix(versions: Versions):
    project, a, b = versions
    for typed, version, name in [(a.dvc_md5, a, "one.txt"),                      # as `flen versions` prints it
                                 (b.dvc_md5.removesuffix(".dir").upper(), b, "two.txt"),  # hex, any case
                                 (a.dvc_md5[:8].upper(), a, "one.txt")]:         # 8-hex prefix
        result = _checkout(project, typed)
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"restored {version.path} to {version.dvc_md5}"
        assert sorted(folder_digest(version.path)) == [name]
        assert version.path.with_name("v1.dvc").read_text() == version.dvc_file
