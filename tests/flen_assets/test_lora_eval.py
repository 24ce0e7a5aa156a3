"""lora_eval: the LoRA-off column and prompt labels of its contact sheet, readable metrics (no blank NaN
cells), the not-worse rule at 0%, and the evolution across iterations (metrics table, image grid)."""

from __future__ import annotations

import json

import dagster as dg
import pyarrow.parquet as pq
import pytest
from PIL import Image

from flen_assets.assets.common import readable_metadata
from flen_assets.assets.lora import EvalConfig, _sheet_tiles, config_prompts
from flen_assets.instance import get_instance
from flen_assets.visuals import NEUTRAL, REJECT, contact_sheet, labelled_grid
from flen_resources.project import CONTACT_SHEET, EVAL_EVOLUTION, EVAL_HISTORY

NAN = float("nan")


def test_an_empty_prompt_list_fails_the_run_naming_the_asset_and_its_setting():
    with pytest.raises(dg.Failure, match="lora_eval's config `prompts` is empty: give at least one prompt"):
        config_prompts("lora_eval", [], "ada_flen")
    assert config_prompts("synthetic_batch", ["photo of {trigger}"], "ada_flen") == ["photo of ada_flen"]


def test_nan_metadata_reads_as_why():
    meta = readable_metadata({"mean_distance": NAN, "diversity": NAN, "final_loss": NAN, "identity_consistency": 0.0,
                              "note": "x"})
    assert meta["mean_distance"] == dg.MetadataValue.text("n/a (no face found)")
    assert meta["diversity"] == dg.MetadataValue.text("n/a (fewer than 2 faces found)")
    assert meta["final_loss"] == dg.MetadataValue.text("n/a (no training step ran)")
    assert meta["identity_consistency"] == 0.0 and meta["note"] == "x"


def _row(prompt, seed, face, distance, same, weight=1.0):
    return {"prompt": prompt, "seed": seed, "face": face, "distance": distance, "same_person": same,
            "lora_weight": weight}


def test_sheet_tiles_name_prompt_seed_and_verdict_with_a_lora_off_tile_per_prompt():
    trigger = "alice_flen"
    prompts = [p.format(trigger=trigger) for p in EvalConfig().prompts[:2]]
    seeds = [1, 2]
    img = Image.new("RGB", (64, 64), (90, 90, 90))
    rows = [_row(prompts[0], 1, True, 0.41, True), _row(prompts[0], 2, False, None, False),
            _row(prompts[1], 1, True, 0.83, False), _row(prompts[1], 2, True, 0.3, True)]
    off = [_row(prompts[0], 1, False, None, False, 0.0), _row(prompts[1], 1, True, 0.9, False, 0.0)]
    tiles = _sheet_tiles(rows, [img] * 4, off, [img] * 2, trigger)
    assert [t.label for t in tiles] == [
        "portrait, looking at the camera\ns1: match d=0.41",
        "portrait, looking at the camera\ns2: no face",
        "portrait, looking at the camera\nLoRA off s1: no face",
        "outdoors in a park, natural light\ns1: other d=0.83",
        "outdoors in a park, natural light\ns2: match d=0.30",
        "outdoors in a park, natural light\nLoRA off s1: other d=0.90",
    ]
    assert [t.accepted for t in tiles] == [True, False, None, False, True, None], "LoRA-off tiles: no verdict border"
    sheet = contact_sheet(tiles, columns=len(seeds) + 1)
    assert sheet.size == (3 * 172, 2 * (172 + 30)), "a row per prompt, two label lines under each tile"


def test_labelled_grid_has_a_row_per_version_and_an_empty_cell_for_what_was_not_generated():
    img = Image.new("RGB", (64, 64), (90, 90, 90))
    from flen_assets.visuals import Tile

    one = labelled_grid([[Tile(img, "no face", False), None]], ["v1\n0% match"], ["portrait\ns1", "park\ns1"])
    two = labelled_grid([[Tile(img, "no face", False), None], [Tile(img, "no face", False)] * 2],
                        ["v1\n0% match", "v2\n0% match"], ["portrait\ns1", "park\ns1"])
    assert one.width == two.width and two.height > one.height
    assert REJECT in set(two.getdata())


# -- a real run: `flen demo`'s v1 and v2 of the sample character on the tiny pack (conftest's demo_project) ----
# (v1 re-materialized after v2 keeps its lora_eval md5: test_flywheel.py's whole-iteration rerun checks it.)

def _materialization(project, partition: str) -> dict:
    instance = get_instance(project)
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("lora_eval"), asset_partitions=[partition]), limit=1).records
    return records[0].asset_materialization.metadata


def _check(project, name: str) -> list:
    instance = get_instance(project)
    history = instance.event_log_storage.get_asset_check_execution_history(
        dg.AssetCheckKey(dg.AssetKey("lora_eval"), name), limit=10)
    return [r.event.dagster_event.event_specific_data for r in history if r.event is not None]


@pytest.mark.slow
def test_the_sheet_has_a_lora_off_column_not_counted_in_the_metrics(demo_project):
    folder = demo_project.partition_dir("lora_eval", "astronaut", "v2")
    config = EvalConfig()
    manifest = pq.read_table(folder / "manifest.parquet").to_pylist()
    off = json.loads((folder / "lora_off.json").read_text())
    seeds = sorted({r["seed"] for r in manifest})
    assert len(off) == len(config.prompts) and all(r["lora_weight"] == 0.0 and r["seed"] == seeds[0] for r in off)
    assert [r["prompt"] for r in off] == list(dict.fromkeys(r["prompt"] for r in manifest)), "same prompts, same order"
    assert all((folder / r["file"]).is_file() for r in off) and all("distance" in r and "face" in r for r in off)
    assert all(r["lora_weight"] == 1.0 for r in manifest), "the LoRA-off images are not in the evaluated set"
    sheet = Image.open(folder / CONTACT_SHEET)
    assert sheet.size == ((len(seeds) + 1) * 172, len(config.prompts) * (172 + 30))
    assert NEUTRAL in set(sheet.convert("RGB").getdata()), "the LoRA-off column has a neutral border"
    meta = _materialization(demo_project, "astronaut|v2")
    assert meta["images"].value == len(config.prompts) * len(seeds)


@pytest.mark.slow
def test_metrics_are_readable_and_side_by_side(demo_project):
    meta = _materialization(demo_project, "astronaut|v2")
    # The tiny pack generates noise: no face, so no distance.
    assert meta["mean_distance"].value == "n/a (no face found)"
    assert meta["diversity"].value == "n/a (fewer than 2 faces found)"
    table = meta["metrics_by_iteration"].value.splitlines()
    assert table[0] == "| metric | v1 | v2 |"
    assert "| identity consistency | 0% | 0% |" in table
    assert "| mean distance | n/a | n/a |" in table and table[-1].startswith("n/a: mean distance: no face found")
    assert "data:image/jpeg;base64," in meta["evolution"].value and "data:image/jpeg;base64," in meta["history"].value
    v1 = _materialization(demo_project, "astronaut|v1")["metrics_by_iteration"].value.splitlines()
    assert v1[0] == "| metric | v1 |", "v1's table stops at v1"


@pytest.mark.slow
def test_the_evolution_grid_has_a_row_per_iteration(demo_project):
    v1 = Image.open(demo_project.partition_dir("lora_eval", "astronaut", "v1") / EVAL_EVOLUTION)
    v2 = Image.open(demo_project.partition_dir("lora_eval", "astronaut", "v2") / EVAL_EVOLUTION)
    assert v1.width == v2.width and v2.height > v1.height
    assert (demo_project.partition_dir("lora_eval", "astronaut", "v2") / EVAL_HISTORY).is_file()
    meta = _materialization(demo_project, "astronaut|v2")
    assert meta["evolution_path"].value.endswith("lora_eval/astronaut/v2/evolution.png")


@pytest.mark.slow
def test_zero_against_zero_is_a_warning_that_says_why(demo_project):
    evaluations = _check(demo_project, "not_worse_than_previous")
    by_message = {e.description: e for e in evaluations}
    v2 = by_message["0% of images match the character in v2 and in v1: the LoRA has not learned the character yet"]
    assert not v2.passed and v2.severity == dg.AssetCheckSeverity.WARN
    v1 = by_message["0% of images match the character in v1: the LoRA has not learned the character yet"]
    assert not v1.passed and v1.metadata["previous"].value == "n/a (v1 has no previous iteration)"
