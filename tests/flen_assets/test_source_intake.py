"""End to end: untrusted entries in a photo folder are refused by name, and no byte behind a link gets in.

One project per module: `flen character add` (through typer's CliRunner) from a photo folder holding
a symlink to a secret outside it, a FIFO, a socket and a subfolder; then the same kinds dropped
straight into inbox/alice/ (as a person or a tool may), plus an EPS; then source_images for v1 and v2.
The secret's marker must appear nowhere under the project: inbox, data/, the DVC cache, the DVC remote.
"""

from __future__ import annotations

import io
import os
import socket
import stat
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest
import skimage.data
from conftest import shared_project
from PIL import Image

from flen_resources.project import Project

CHARACTER = "alice"
MARKER = b"FLEN-E2E-SECRET-MARKER-51c0de"  # in a file outside the project, reached only through links
SUBFOLDER_MARKER = b"FLEN-E2E-SUBFOLDER-MARKER-9ab2"  # in a file inside an inbox subfolder

# Refused by `flen character add` (never copied: their rows come from the inbox's hidden record) ...
ADD_REFUSED = {"passwd.jpg": "symlink", "pipe.jpg": "not_regular_file", "sock.jpg": "not_regular_file",
               "album": "subfolder"}
# ... and refused by source_images itself, having been dropped straight into the inbox.
INBOX_REFUSED = {"dropped_link.jpg": "symlink", "dropped_pipe.jpg": "not_regular_file", "dropped_dir": "subfolder",
                 "dropped_link_to_photo.jpg": "symlink"}
REFUSED = ADD_REFUSED | INBOX_REFUSED


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _unix_socket(path: Path) -> None:
    """Leave a socket file at `path` (the entry stays after the socket is closed)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def _photo_folder(base: Path, secret: Path, portrait: bytes) -> Path:
    photos = base / "photos"
    photos.mkdir()
    (photos / "portrait.jpg").write_bytes(portrait)
    os.symlink(secret, photos / "passwd.jpg")
    os.mkfifo(photos / "pipe.jpg")
    _unix_socket(photos / "sock.jpg")
    (photos / "album").mkdir()
    (photos / "album" / "inner.jpg").write_bytes(portrait)
    (photos / ".hidden.jpg").write_bytes(b"skipped silently")
    return photos


def _drop_into_inbox(inbox: Path, secret: Path) -> None:
    os.symlink(secret, inbox / "dropped_link.jpg")
    os.symlink("portrait.jpg", inbox / "dropped_link_to_photo.jpg")
    os.mkfifo(inbox / "dropped_pipe.jpg")
    (inbox / "dropped_dir").mkdir()
    (inbox / "dropped_dir" / "inner.txt").write_bytes(SUBFOLDER_MARKER)
    eps = io.BytesIO()
    Image.new("RGB", (16, 16), (5, 5, 5)).save(eps, format="EPS")
    (inbox / "drawing.jpg").write_bytes(eps.getvalue())


class Intake:
    """What the module's CLI call and materializations left behind."""

    def __init__(self, project: Project, add_output: str, inbox_after_add: list[str], portrait: bytes, results):
        self.project = project
        self.add_output = add_output
        self.inbox_after_add = inbox_after_add
        self.portrait = portrait
        self.results = results

    def rows(self, iteration: str) -> dict[str, dict]:
        folder = self.project.partition_dir("source_images", CHARACTER, iteration)
        table = pq.read_table(folder / "manifest.parquet").to_pylist()
        assert len({r["original_name"] for r in table}) == len(table), "one row per entry"
        return {r["original_name"]: r for r in table}


@pytest.fixture(scope="module")
def intake(tmp_path_factory: pytest.TempPathFactory) -> Intake:
    from typer.testing import CliRunner

    from flen_assets.cli import app
    from flen_assets.definitions import defs
    from flen_assets.partitions import add_partitions
    from flen_assets.runs import init_project

    with shared_project(tmp_path_factory, "intake") as project:
        base = project.root.parent
        secret = base / "outside" / "secret.txt"
        secret.parent.mkdir()
        secret.write_bytes(b"root:x:0:0:" + MARKER + b"\n")
        portrait = _jpeg(Image.fromarray(skimage.data.astronaut()).crop((40, 0, 400, 320)))
        photos = _photo_folder(base, secret, portrait)

        added = CliRunner().invoke(app, ["character", "add", CHARACTER, "--from", str(photos),
                                         "--project", str(project.root)])
        assert added.exit_code == 0, added.output
        inbox = project.inbox_for(CHARACTER)
        inbox_after_add = sorted(p.name for p in inbox.iterdir())
        _drop_into_inbox(inbox, secret)

        instance = init_project(project)
        job = defs.resolve_job_def("training_set_job")
        results = {}
        for iteration in ("v1", "v2"):
            key = add_partitions(instance, CHARACTER, iteration)
            results[iteration] = job.execute_in_process(instance=instance, partition_key=str(key),
                                                        raise_on_error=False,
                                                        asset_selection=[dg.AssetKey("source_images")])
        yield Intake(project, added.output, inbox_after_add, portrait, results)


def _regular_files(folder: Path, skip: Path | None = None):
    """Every regular file under `folder`, walking without following links."""
    for root, dirs, files in os.walk(folder):
        if skip is not None and Path(root) == skip:
            dirs[:] = []
            continue
        for name in files:
            path = Path(root, name)
            if stat.S_ISREG(path.lstat().st_mode):
                yield path


def test_runs_succeed(intake):
    for iteration, result in intake.results.items():
        assert result.success, iteration


def test_character_add_prints_one_line_per_refused_entry(intake):
    lines = [line for line in intake.add_output.splitlines() if line.startswith("refused ")]
    assert len(lines) == len(ADD_REFUSED)
    for name, code in ADD_REFUSED.items():
        assert any(line.startswith(f"refused {name}: ") and line.endswith(f"[{code}]") for line in lines), name
    assert "1 file(s) copied" in intake.add_output
    assert ".hidden.jpg" not in intake.add_output


def test_character_add_copied_only_the_regular_file(intake):
    assert intake.inbox_after_add == [".flen-refused.json", "portrait.jpg"]
    assert not (intake.project.inbox_for(CHARACTER) / "portrait.jpg").is_symlink()


@pytest.mark.parametrize("iteration", ["v1", "v2"])
@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_entry_has_a_manifest_row(intake, iteration, name):
    row = intake.rows(iteration)[name]
    assert (row["status"], row["reason_code"]) == ("rejected", REFUSED[name])
    assert row["reason"].startswith(f"{name}: ")
    assert row["original_path"] is None and row["original_id"] is None  # never read
    assert ("refused by `flen character add`" in row["reason"]) == (name in ADD_REFUSED)


@pytest.mark.parametrize("iteration", ["v1", "v2"])
def test_every_entry_has_exactly_one_row(intake, iteration):
    assert sorted(intake.rows(iteration)) == sorted([*REFUSED, "portrait.jpg", "drawing.jpg"])


def test_photo_accepted_and_eps_refused_as_unsupported(intake):
    rows = intake.rows("v1")
    assert rows["portrait.jpg"]["status"] == "accepted"
    eps = rows["drawing.jpg"]
    assert (eps["status"], eps["reason_code"]) == ("rejected", "unsupported_format")
    assert eps["reason"].startswith("drawing.jpg: EPS file")


def test_refused_entries_in_lineage_decisions(intake):
    from flen_resources.lineage import LineageStore

    decisions = LineageStore(intake.project.lineage_dir).rows(
        "SELECT reason, passed FROM decisions WHERE asset = 'source_images' AND gate = 'source' AND run_id = $r",
        {"r": intake.results["v1"].run_id})
    for name in REFUSED:
        assert any(d["reason"].startswith(f"{name}: ") and not d["passed"] for d in decisions), name


def test_refused_entries_in_materialization_metadata(intake):
    meta = intake.results["v1"].asset_materializations_for_node("source_images")[0].metadata
    assert meta["rejected_by_reason"].value == {"symlink": 3, "not_regular_file": 3, "subfolder": 2,
                                                "unsupported_format": 1}


def test_secret_behind_links_is_nowhere_in_the_project(intake):
    root = intake.project.root
    stores = [root / ".dvc" / "cache", intake.project.dvc_remote_dir, intake.project.data_dir]
    for store in stores:  # the control: the accepted photo's bytes did reach every store the scan reads
        assert any(p.read_bytes() == intake.portrait for p in _regular_files(store)), store
    leaks = [p for p in _regular_files(root) if MARKER in p.read_bytes()]
    assert leaks == []


def test_inbox_subfolder_content_is_not_ingested(intake):
    root = intake.project.root
    inbox = intake.project.inbox_for(CHARACTER)
    leaks = [p for p in _regular_files(root, skip=inbox / "dropped_dir") if SUBFOLDER_MARKER in p.read_bytes()]
    assert leaks == []


def test_inbox_is_left_as_it_was(intake):
    inbox = intake.project.inbox_for(CHARACTER)
    assert os.readlink(inbox / "dropped_link.jpg").endswith("secret.txt")
    assert stat.S_ISFIFO((inbox / "dropped_pipe.jpg").lstat().st_mode)
    assert not any(p.name.endswith(".tmp") for p in inbox.iterdir())


def test_source_config_default_pixel_limit_is_40_mp():
    from flen_assets.assets.sources import SourceConfig
    from flen_resources.imaging import DEFAULT_MAX_PIXELS

    assert SourceConfig().max_pixels == DEFAULT_MAX_PIXELS == 40_000_000
