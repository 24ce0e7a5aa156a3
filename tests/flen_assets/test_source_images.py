"""source_images (and identity_reference) through Dagster on an inbox full of bad and odd files.

One materialization per module, shared by every assert: each bad file must get a manifest row with
the right reason code, the same reason in lineage and in the materialization metadata, and neither
the inbox nor the byte-exact originals may change.
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest
import skimage.data
from conftest import run_flen, shared_project
from PIL import Image

from flen_resources.project import Project

CHARACTER, ITERATION = "alice", "v1"
MAX_PIXELS = 1_000_000  # lowered through run config so a 4 MP file stands for a decompression bomb

# File name -> the reason_code source_images must give it ("ok": accepted).
EXPECTED = {
    "portrait.jpg": "ok",
    "closeup.png": "ok",
    "side_light.jpg": "ok",
    "wide_cmyk.jpg": "ok",
    "scan_16bit.png": "ok",
    "poster_palette.png": "ok",
    "rotated_exif.jpg": "ok",
    "portrait_copy.jpg": "duplicate",
    "broken.jpg": "corrupt",
    "notes.png": "not_an_image",
    "empty.jpg": "empty",
    "cameraman.png": "no_face",
    "group_photo.png": "several_faces",
    "tiny_face.png": "face_too_small",
    "huge.png": "too_large",
}
REJECTED = {name: code for name, code in EXPECTED.items() if code != "ok"}


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def inbox_files() -> dict[str, bytes]:
    astro = Image.fromarray(skimage.data.astronaut())
    portrait = astro.crop((40, 0, 400, 320))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored a quarter turn counter-clockwise; display rotated 90 clockwise
    rotated = astro.crop((80, 20, 380, 290)).rotate(90, expand=True)
    grey16 = np.asarray(astro.crop((20, 0, 380, 310)).convert("L"), dtype=np.uint16) * 257
    # Palette image whose corner (index of the top-left pixel) is transparent.
    palette = astro.crop((30, 0, 390, 330)).quantize(colors=200)
    # The whole portrait shrunk so the face is ~36 px, on a canvas large enough to decode normally.
    tiny = Image.new("RGB", (400, 400), (128, 128, 128))
    tiny.paste(portrait.resize((140, 124), Image.LANCZOS), (130, 130))
    portrait_bytes = _jpeg(portrait)
    files = {
        "portrait.jpg": portrait_bytes,
        "closeup.png": _png(astro.crop((120, 40, 320, 210)).resize((400, 340), Image.LANCZOS)),
        "side_light.jpg": _jpeg(astro.crop((0, 10, 340, 300)).point(lambda v: min(255, int(v * 1.1)))),
        "wide_cmyk.jpg": _jpeg(astro.crop((60, 0, 420, 330)).convert("CMYK")),
        "scan_16bit.png": _png(Image.fromarray(grey16)),
        "poster_palette.png": _png(palette, transparency=palette.getpixel((0, 0))),
        "rotated_exif.jpg": _jpeg(rotated, exif=exif.tobytes()),
        "portrait_copy.jpg": portrait_bytes,
        "broken.jpg": portrait_bytes[: len(portrait_bytes) // 3],
        "notes.png": b"this is a text file with an image extension\n",
        "empty.jpg": b"",
        "cameraman.png": _png(Image.fromarray(skimage.data.camera())),
        "group_photo.png": _png(astro),
        "tiny_face.png": _png(tiny),
        "huge.png": _png(Image.new("RGB", (2000, 2000), (90, 90, 90))),
    }
    assert set(files) == set(EXPECTED)
    return files


def _hash_tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


class Ingested:
    """What one materialization left behind."""

    def __init__(self, project: Project, inbox: Path, before: dict[str, str], result):
        self.project = project
        self.inbox = inbox
        self.inbox_before = before
        self.result = result
        self.folder = project.partition_dir("source_images", CHARACTER, ITERATION)
        self.rows = {r["original_name"]: r for r in pq.read_table(self.folder / "manifest.parquet").to_pylist()}


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    """A fresh project (like conftest's `project`, but shared by the module) after one run."""
    from flen_assets.definitions import defs
    from flen_assets.partitions import add_partitions
    from flen_assets.runs import init_project

    with shared_project(tmp_path_factory, "sources") as project:
        instance = init_project(project)
        inbox = project.inbox_for(CHARACTER)
        inbox.mkdir(parents=True)
        for name, data in inbox_files().items():
            (inbox / name).write_bytes(data)
        before = _hash_tree(inbox)
        key = add_partitions(instance, CHARACTER, ITERATION)
        job = defs.resolve_job_def("training_set_job")
        result = job.execute_in_process(
            instance=instance, partition_key=str(key), raise_on_error=False,
            asset_selection=[dg.AssetKey("source_images"), dg.AssetKey("identity_reference")],
            run_config={"ops": {"source_images": {"config": {"max_pixels": MAX_PIXELS}}}},
        )
        yield Ingested(project, inbox, before, result)


def _failures(result) -> str:
    return "\n".join(e.event_specific_data.error.to_string() for e in result.all_events
                     if e.event_type_value == "STEP_FAILURE")


def test_run_succeeds(ingested):
    assert ingested.result.success, _failures(ingested.result)
    materialized = {e.asset_key.to_user_string() for e in ingested.result.get_asset_materialization_events()}
    assert materialized == {"source_images", "identity_reference"}


def test_every_inbox_file_has_one_row(ingested):
    assert sorted(ingested.rows) == sorted(EXPECTED)
    assert len(pq.read_table(ingested.folder / "manifest.parquet")) == len(EXPECTED)


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_bad_file_rejected_with_reason(ingested, name):
    row = ingested.rows[name]
    assert row["status"] == "rejected"
    assert row["reason_code"] == REJECTED[name]
    assert row["reason"].startswith(f"{name}: ")  # the message names the file


@pytest.mark.parametrize("name", sorted(n for n, c in EXPECTED.items() if c == "ok"))
def test_good_file_accepted(ingested, name):
    row = ingested.rows[name]
    assert (row["status"], row["reason_code"]) == ("accepted", "ok"), row["reason"]
    assert row["n_faces"] == 1
    assert row["face_size"] >= 40
    assert len(row["embedding"]) == 128
    image = ingested.folder / row["image_path"]
    with Image.open(image) as img:
        assert img.mode == "RGB"
        assert img.size == (row["width"], row["height"])
    assert hashlib.sha256(image.read_bytes()).hexdigest() == row["image_id"]


@pytest.mark.parametrize("name, mode", [("wide_cmyk.jpg", "CMYK"), ("scan_16bit.png", "I;16"),
                                        ("poster_palette.png", "P"), ("portrait.jpg", "RGB")])
def test_original_mode_recorded(ingested, name, mode):
    assert ingested.rows[name]["original_mode"] == mode


def test_exif_rotated_photo_is_upright(ingested):
    row = ingested.rows["rotated_exif.jpg"]
    assert row["exif_transposed"] is True
    with Image.open(ingested.inbox / "rotated_exif.jpg") as stored:
        assert (row["width"], row["height"]) == (stored.height, stored.width)
    assert row["width"] > row["height"]  # the upright crop is landscape (300 x 270)
    assert ingested.rows["portrait.jpg"]["exif_transposed"] is False


def test_duplicate_names_its_first_copy(ingested):
    row = ingested.rows["portrait_copy.jpg"]
    assert "portrait.jpg" in row["reason"]
    assert row["original_id"] == ingested.rows["portrait.jpg"]["original_id"]


def test_face_too_small_still_decoded(ingested):
    row = ingested.rows["tiny_face.png"]
    assert row["n_faces"] == 1
    assert row["face_size"] < 40
    assert (row["width"], row["height"]) == (400, 400)


def test_rejected_by_reason_metadata(ingested):
    mats = [m for m in ingested.result.asset_materializations_for_node("source_images")]
    assert len(mats) == 1
    meta = mats[0].metadata
    assert meta["rejected_by_reason"].value == dict(Counter(REJECTED.values()))
    assert meta["accepted"].value == len(EXPECTED) - len(REJECTED)
    assert meta["rejected"].value == len(REJECTED)
    table = meta["rejected_files"].value
    for name in REJECTED:
        assert f"| {name} |" in table


def test_all_inbox_files_usable_check_warns(ingested):
    checks = {c.check_name: c for c in ingested.result.get_asset_check_evaluations()}
    assert checks["all_inbox_files_usable"].passed is False
    assert checks["enough_sources"].passed is True


def test_lineage_decisions_carry_the_same_reasons(ingested):
    from flen_resources.lineage import LineageStore

    decisions = LineageStore(ingested.project.lineage_dir).rows(
        "SELECT image_id, passed, reason FROM decisions WHERE asset = 'source_images' AND gate = 'source' "
        "AND character = $c AND iteration = $i AND run_id = $r",
        {"c": CHARACTER, "i": ITERATION, "r": ingested.result.run_id})
    assert len(decisions) == len(EXPECTED)
    got = Counter((d["image_id"], d["passed"], d["reason"]) for d in decisions)
    want = Counter((r["image_id"] or r["original_id"], r["status"] == "accepted", r["reason"])
                   for r in ingested.rows.values())
    assert got == want
    for name, code in REJECTED.items():
        assert any(d["reason"] == ingested.rows[name]["reason"] and not d["passed"] for d in decisions), name


def test_lineage_images_record_every_original(ingested):
    from flen_resources.lineage import LineageStore

    images = LineageStore(ingested.project.lineage_dir).rows(
        "SELECT image_id, original_name, status, reason, path FROM images "
        "WHERE asset = 'source_images' AND run_id = $r", {"r": ingested.result.run_id})
    originals = {i["original_name"]: i for i in images if "/originals/" in i["path"]}
    assert sorted(originals) == sorted(EXPECTED)
    for name, row in ingested.rows.items():
        assert originals[name]["image_id"] == row["original_id"]
        assert originals[name]["reason"] == row["reason"]


def test_inbox_untouched(ingested):
    assert _hash_tree(ingested.inbox) == ingested.inbox_before
    assert sorted(p.name for p in ingested.inbox.iterdir()) == sorted(EXPECTED)  # nothing added, nothing hidden


def test_originals_are_byte_exact(ingested):
    for name, row in ingested.rows.items():
        copy = ingested.folder / row["original_path"]
        assert copy.is_file(), name
        assert copy.read_bytes() == (ingested.inbox / name).read_bytes(), name
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == row["original_id"]
    # One copy per distinct content: the duplicate shares portrait.jpg's.
    assert len(list((ingested.folder / "originals").iterdir())) == len(EXPECTED) - 1


def test_identity_reference_uses_the_accepted_sources(ingested):
    import json

    folder = ingested.project.partition_dir("identity_reference", CHARACTER, ITERATION)
    reference = json.loads((folder / "reference.json").read_text())
    accepted = sum(code == "ok" for code in EXPECTED.values())
    assert reference["n_sources"] == accepted
    assert reference["outliers"] == []
    assert len(reference["embedding"]) == 128
    assert 0.4 <= reference["threshold"] <= 0.6


def test_staging_is_left_empty(ingested):
    assert list(ingested.project.staging_dir.iterdir()) == []  # staged folders were moved into data/


# -- the CLI refuses names that would leave the project's folders ---------------------------------

@pytest.mark.parametrize("name", ["../evil", "a|b"])
def test_character_add_refuses_escaping_name(project, tmp_path, name):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "portrait.jpg").write_bytes(_jpeg(Image.new("RGB", (8, 8))))
    proc = run_flen("character", "add", name, "--from", str(photos), project=project.root, check=False)
    assert proc.returncode != 0
    assert f"invalid character name {name!r}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (project.root / "evil").exists()
    assert not (project.root.parent / "evil").exists()
    assert not project.inbox_dir.exists() or not any(project.inbox_dir.iterdir())
