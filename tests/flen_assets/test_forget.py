"""`flen forget`: a photo and everything derived from it leave the working tree, the DVC cache, the local
remote, the inbox and lineage; the erasure is recorded by hash; a killed erasure is finished by a rerun;
bad input changes nothing; the iteration materializes again without the photo."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest
from conftest import run_flen

from flen_assets.instance import get_instance
from flen_resources.forget import execute_forget, pending_plan, plan_forget
from flen_resources.lineage import LineageStore
from flen_resources.project import Project
from flen_resources.storage import DvcStore

pytestmark = pytest.mark.slow

PHOTO = "side_light.jpg"  # a demo source: its edits reached LoRA v1, the v1 adapter made v2's qwen edits


@pytest.fixture(scope="module")
def forgettable(demo_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of the session's demo project (its DVC remote and lineage paths are relative): this one is changed."""
    root = tmp_path_factory.mktemp("forget") / "project"
    shutil.copytree(demo_project.root, root, symlinks=True)
    return Project(root)


def _digests(path: Path) -> tuple[str, str]:
    data = path.read_bytes()
    return hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()


def _snapshot(project: Project) -> dict[str, int]:
    """Every file of the project but lineage's CLI database (rewritten by any command), with its size."""
    return {str(p.relative_to(project.root)): p.stat().st_size for p in project.root.rglob("*")
            if p.is_file() and ".git" not in p.parts and p.parent.name != "lineage"}


def test_bad_input_is_one_line_and_changes_nothing(forgettable: Project, tmp_path: Path):
    stranger = tmp_path / "stranger.jpg"
    stranger.write_bytes(b"not a photo of this project")
    before = _snapshot(forgettable)
    cases = {"abc123": "is not a sha256", str(tmp_path / "missing.jpg"): "does not exist",
             "0" * 64: "is not a photo this project knows", str(stranger): "is not a photo this project knows"}
    for arg, said in cases.items():
        for extra in ([], ["--yes"]):
            proc = run_flen("forget", arg, *extra, project=forgettable.root, check=False)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and said in lines[0], \
                proc.stderr
    assert _snapshot(forgettable) == before


def test_dry_run_lists_what_derives_from_the_photo_and_changes_nothing(forgettable: Project):
    before = _snapshot(forgettable)
    out = run_flen("forget", str(forgettable.inbox_for("astronaut") / PHOTO), project=forgettable.root).stdout
    for part in ("source_images astronaut|v1", "enriched_images astronaut|v1", "training_set astronaut|v1",
                 "flux_lora astronaut|v1", "synthetic_batch astronaut|v1", "qwen_adapter astronaut|v1",
                 "enriched_images astronaut|v2", "flux_lora astronaut|v2", "edit_triplets astronaut|v1"):
        assert part in out, out
    assert "inbox/astronaut/side_light.jpg" in out and "dry run: nothing was changed" in out
    assert _snapshot(forgettable) == before


def test_forget_removes_everything_derived_and_a_killed_run_finishes(forgettable: Project, tmp_path: Path):
    project = forgettable
    photo = project.inbox_for("astronaut") / PHOTO
    kept_bytes = photo.read_bytes()
    target = hashlib.sha256(kept_bytes).hexdigest()
    store = LineageStore(project.lineage_dir, bucket=None)
    dvc = DvcStore(project)
    plan = plan_forget(project, store, target, dvc.local_remote())
    derived = set(plan.derived_ids)
    assert {"flux_lora", "lora_eval", "synthetic_batch", "qwen_adapter"} <= {a for a, _, _ in plan.partition_keys()}
    # What must not survive: every derived image, and the files of the models trained on them.
    shas, md5s = set(derived), set()
    for asset, character, iteration in plan.partition_keys():
        for path in project.partition_dir(asset, character, iteration).rglob("*"):
            whole = asset in ("flux_lora", "qwen_adapter", "lora_eval")
            if path.is_file() and (whole or path.name.split(".")[0] in derived):
                sha, md5 = _digests(path)
                shas.add(sha)
                md5s.add(md5)
    assert len(md5s) > 20

    # Killed midway: the blobs are gone but Dagster was not told, and the plan file stays.
    def killed(_parts):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        execute_forget(project, store, plan, dvc.local_remote(), True, dvc._lock, killed)
    assert pending_plan(project, target) is not None
    out = run_flen("forget", target, "--yes", project=project.root).stdout
    assert "was interrupted: finishing it" in out and "forgotten:" in out, out
    assert pending_plan(project, target) is None
    assert "was forgotten on" in run_flen("forget", target, "--yes", project=project.root).stdout

    # Nothing of it can be read back: working tree, DVC cache and local remote, lineage, Dagster.
    for top, _dirs, files in os.walk(project.root):
        for name in files:
            sha, md5 = _digests(Path(top) / name)
            assert sha not in shas and md5 not in md5s, f"{Path(top) / name} holds derived content"
    assert not photo.exists()
    assert not store.rows("SELECT image_id FROM images WHERE list_contains($ids, image_id)", {"ids": sorted(derived)})
    assert not store.rows("SELECT 1 FROM edges WHERE list_contains($ids, child_id) OR list_contains($ids, parent_id)",
                          {"ids": sorted(derived)})
    erased = store.rows("SELECT erased_id, kind FROM erasures")
    assert {r["erased_id"] for r in erased} >= derived and {"photo", "image", "version"} == {r["kind"] for r in erased}
    assert not (project.data_dir / "training_set" / "astronaut" / "v1.dvc").exists()
    instance = get_instance(project)
    for asset in ("training_set", "flux_lora", "synthetic_batch"):
        records = instance.fetch_materializations(dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(asset), asset_partitions=["astronaut|v1"]), limit=1).records
        if records:  # SQLite storage cannot wipe one partition: the erasure is observed instead
            observed = instance.fetch_observations(dg.AssetRecordsFilter(
                asset_key=dg.AssetKey(asset), asset_partitions=["astronaut|v1"]), limit=1).records
            assert observed and observed[0].asset_observation.metadata["erased"].value is True

    # The photo dropped in again is refused; v1 materializes again without anything derived from it.
    photo.write_bytes(kept_bytes)
    run_flen("materialize", "astronaut", "v1", project=project.root, timeout=900)
    members = {r["image_id"] for r in store.rows(
        "SELECT image_id FROM latest_members WHERE asset = 'training_set' AND character = 'astronaut' AND iteration = 'v1'")}
    assert members and not members & derived
    traced = {r["image_id"] for r in store.trace("astronaut", "v1")}
    assert traced and not traced & derived
    assert not store.rows("SELECT 1 FROM images WHERE image_id = $t", {"t": target})
