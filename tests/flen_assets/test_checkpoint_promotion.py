"""Checkpoint selection on the demo (tiny pack: every score is zero, the plumbing is what counts): flux_lora
keeps each checkpoint, lora_eval scores them all, promotes one and shows identity against step and the
checkpoints x prompts grid; synthetic_batch uses the promoted checkpoint; `flen eval` prints the table;
`flen promote` overrules the rule (recorded), refuses a step that does not exist, and export and a new
synthetic batch follow it."""

from __future__ import annotations

import json
import shutil

import dagster as dg
import pyarrow.parquet as pq
import pytest
from conftest import run_flen
from huggingface_hub import ModelCard
from PIL import Image

from flen_assets.instance import get_instance
from flen_resources.lineage import LineageStore
from flen_resources.project import (
    CHECKPOINTS_FILE,
    EVAL_BY_STEP,
    EVAL_CHECKPOINT_GRID,
    EVAL_EVOLUTION,
    Project,
)
from flen_resources.storage import DvcStore

pytestmark = pytest.mark.slow

STEPS = [10, 20]  # the cpu-demo run settings: 20 steps, a checkpoint every 10


def _metadata(project: Project, asset: str, partition: str) -> dict:
    records = get_instance(project).fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
    return records[0].asset_materialization.metadata


def test_every_checkpoint_is_kept_scored_plotted_and_the_promoted_one_is_used(demo_project: Project):
    lora = demo_project.partition_dir("flux_lora", "astronaut", "v2")
    listed = json.loads((lora / CHECKPOINTS_FILE).read_text())
    assert [c["step"] for c in listed] == STEPS
    assert all((lora / c["file"]).is_file() and (lora / c["comfyui_file"]).is_file() for c in listed)
    assert (lora / listed[-1]["file"]).read_bytes() == (lora / "lora.safetensors").read_bytes()

    folder = demo_project.partition_dir("lora_eval", "astronaut", "v2")
    evaluated = json.loads((folder / CHECKPOINTS_FILE).read_text())
    assert [s["step"] for s in evaluated["scores"]] == STEPS
    assert (evaluated["promoted"], evaluated["chosen_by"]) == (20, "rule"), "no signal: the final step"
    manifest = pq.read_table(folder / "manifest.parquet").to_pylist()
    assert sorted({r["step"] for r in manifest}) == STEPS and all((folder / r["file"]).is_file() for r in manifest)
    assert {"memorised", "copy_distance", "yaw"} <= set(manifest[0])
    grid, evolution = Image.open(folder / EVAL_CHECKPOINT_GRID), Image.open(folder / EVAL_EVOLUTION)
    assert grid.width == evolution.width, "the same prompt x seed columns"
    assert Image.open(folder / EVAL_BY_STEP).size[0] > 500

    meta = _metadata(demo_project, "lora_eval", "astronaut|v2")
    assert meta["promoted_step"].value == 20 and meta["promotion"].value == "step 20, promoted by the rule"
    table = meta["checkpoints"].value.splitlines()
    assert table[0].startswith("| step | pass rate | memorised |") and len(table) == 2 + len(STEPS)
    assert table[-1].startswith("| 20 | 0% |") and table[-1].endswith("**promoted** |")
    for key in ("identity_by_step", "checkpoint_grid"):
        assert "data:image/jpeg;base64," in meta[key].value

    md5 = DvcStore(demo_project).published("flux_lora", "astronaut", "v2")[1]
    store = LineageStore(demo_project.lineage_dir)
    scored = store.rows("SELECT DISTINCT step FROM checkpoint_scores WHERE character='astronaut' AND iteration='v2' "
                        "AND lora_md5=$m ORDER BY step", {"m": md5})
    assert [r["step"] for r in scored] == STEPS
    assert _metadata(demo_project, "synthetic_batch", "astronaut|v2")["lora_checkpoint"].value == \
        "step 20, promoted by the rule"


@pytest.fixture(scope="module")
def promotable(demo_project: Project, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of the session's demo project: promotions change it."""
    root = tmp_path_factory.mktemp("promote") / "project"
    shutil.copytree(demo_project.root, root, symlinks=True)
    return Project(root)


def test_a_person_overrules_the_rule_and_export_and_the_next_batch_follow(promotable: Project, tmp_path):
    shown = run_flen("eval", "astronaut", "v2", project=promotable.root).stdout
    assert "2 checkpoints" in shown and "in use: step 20, promoted by the rule" in shown
    assert "| 10 | 0% |" in shown and "rule: The checkpoint with the most generations" in shown

    store = LineageStore(promotable.lineage_dir)
    count = "SELECT count(*) AS n FROM promotions WHERE chosen_by='person'"
    bad = run_flen("promote", "astronaut", "v2", "--step", "15", project=promotable.root, check=False)
    assert bad.returncode == 1 and store.rows(count)[0]["n"] == 0
    assert bad.stderr.strip().splitlines() == [
        "error: astronaut v2 has no checkpoint at step 15: the evaluated steps are 10, 20"]
    missing = run_flen("promote", "astronaut", "v9", "--step", "10", project=promotable.root, check=False)
    assert missing.returncode == 1 and "flux_lora astronaut|v9 is not materialized" in missing.stderr

    done = run_flen("promote", "astronaut", "v2", "--step", "10", "--reason", "sharper eyes",
                    project=promotable.root).stdout
    assert "step 10, promoted by" in done and "(was step 20, promoted by the rule)" in done
    assert store.rows(count)[0]["n"] == 1
    assert "in use: step 10, promoted by" in run_flen("eval", "astronaut", "v2", project=promotable.root).stdout

    run_flen("export", "astronaut", "v2", "--to", str(tmp_path / "export"), project=promotable.root)
    step10 = promotable.partition_dir("flux_lora", "astronaut", "v2") / "checkpoints" / "step-000010.safetensors"
    assert (tmp_path / "export" / "astronaut_v2_lora.safetensors").read_bytes() == step10.read_bytes()
    card = ModelCard.load(tmp_path / "export" / "README.md")
    assert card.data.checkpoint["step"] == 10 and "sharper eyes" in card.data.checkpoint["chosen_by"]

    run_flen("materialize", "astronaut", "v2", "--all", "--from", "synthetic_batch", project=promotable.root,
             timeout=900)
    assert _metadata(promotable, "synthetic_batch", "astronaut|v2")["lora_checkpoint"].value.startswith(
        "step 10, promoted by")
    steps = store.rows("SELECT DISTINCT json_extract(params, '$.checkpoint_step')::INT AS step FROM edges "
                       "WHERE asset='synthetic_batch' AND character='astronaut' AND iteration='v2' "
                       "AND created_at = (SELECT max(created_at) FROM edges WHERE asset='synthetic_batch')")
    assert [r["step"] for r in steps] == [10]
