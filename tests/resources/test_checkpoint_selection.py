"""Checkpoint selection: the promotion rule, the copy-paste guard and yaw on real dlib faces, and which
promotion is in force (lineage rows: the rule's, a person's)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageOps

from flen_resources.checkpoint_selection import (
    COPY_FACE_DISTANCE,
    CheckpointScore,
    PromotionError,
    TrainingFaces,
    checkpoint_files,
    checkpoint_table,
    choose_checkpoint,
    evaluated_scores,
    promoted_lora,
    promotion_in_force,
    record_promotion,
    score_checkpoint,
    yaw_degrees,
)
from flen_resources.evaluation import plot_checkpoints
from flen_resources.faces import FaceAnalyzer
from flen_resources.identity import Calibration, build_reference
from flen_resources.lineage import LineageStore, utcnow
from flen_resources.project import CHECKPOINTS_FILE

NAN = float("nan")


def _score(step: int, passed: int, memorised: int = 0, diversity: float = NAN, distance: float = NAN,
           images: int = 6) -> CheckpointScore:
    return CheckpointScore(step=step, images=images, identity_pass_rate=passed / images,
                           memorised_rate=memorised / images, mean_distance=distance, diversity=diversity,
                           yaw_spread=NAN, face_detected_rate=passed / images, memorised_passes=memorised)


# -- the rule -----------------------------------------------------------------------------------------

def test_the_most_passing_generations_win_whatever_the_step():
    assert choose_checkpoint([_score(250, 2), _score(500, 5), _score(750, 3)]).step == 500


def test_memorised_copies_do_not_count_as_passes():
    # step 750 matches more often, but four of its matches are training images again
    assert choose_checkpoint([_score(500, 4), _score(750, 6, memorised=4)]).step == 500


def test_ties_go_to_diversity_then_distance_then_the_later_step():
    assert choose_checkpoint([_score(250, 4, diversity=0.5), _score(500, 4, diversity=0.3)]).step == 250
    assert choose_checkpoint([_score(250, 4, diversity=0.4, distance=0.45),
                              _score(500, 4, diversity=0.4, distance=0.40)]).step == 500
    assert choose_checkpoint([_score(250, 4, diversity=0.4, distance=0.4),
                              _score(500, 4, diversity=0.4, distance=0.4)]).step == 500


def test_no_signal_at_all_promotes_the_final_step():
    # the tiny pack: no faces, every score zero or n/a
    assert choose_checkpoint([_score(10, 0), _score(20, 0)]).step == 20


def test_nothing_evaluated_is_an_error():
    with pytest.raises(PromotionError, match="no checkpoint"):
        choose_checkpoint([])


# -- yaw and the copy-paste guard on real faces -------------------------------------------------------

def test_yaw_is_zero_for_a_centred_nose_and_signed_by_its_side():
    eyes = {"left_eye": [(40, 50), (50, 50)], "right_eye": [(70, 50), (80, 50)]}
    assert yaw_degrees({**eyes, "nose_tip": [(60, 70)]}) == pytest.approx(0.0)
    right = yaw_degrees({**eyes, "nose_tip": [(70, 70)]})
    assert right == pytest.approx(math.degrees(math.asin(10 / 15)))
    assert yaw_degrees({**eyes, "nose_tip": [(50, 70)]}) == pytest.approx(-right)
    assert yaw_degrees(None) is None and yaw_degrees({"nose_tip": [(1, 1)]}) is None


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("hog")


@pytest.fixture(scope="module")
def astronaut() -> list[Image.Image]:
    astro = Image.fromarray(skimage.data.astronaut())
    return [astro.crop((40, 0, 400, 320)), astro.crop((0, 10, 340, 300)), astro.crop((60, 0, 420, 330))]


@pytest.fixture(scope="module")
def grace() -> Image.Image:
    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


def test_a_training_image_generated_again_is_memorised_and_another_person_is_no_match(analyzer, astronaut, grace):
    embeddings = np.array([analyzer.analyze(img)[0].embedding for img in astronaut], dtype=np.float64)
    reference, _ = build_reference(embeddings, ["a", "b", "c"], Calibration())
    training = TrainingFaces.of([astronaut[0]], analyzer)
    mirrored = ImageOps.mirror(astronaut[1])
    score, rows = score_checkpoint(250, [astronaut[0], mirrored, grace, Image.new("RGB", (64, 64))],
                                   analyzer, reference, training)
    assert [r["memorised"] for r in rows] == [True, False, False, False]
    assert rows[0]["copy_distance"] < COPY_FACE_DISTANCE < rows[1]["copy_distance"]
    assert [r["same_person"] for r in rows] == [True, True, False, False]
    assert [r["face"] for r in rows] == [True, True, True, False]
    assert score.identity_pass_rate == 0.5 and score.memorised_rate == 0.25 and score.passes == 1
    assert score.face_detected_rate == 0.75
    assert math.isfinite(score.diversity) and math.isfinite(score.yaw_spread) and score.yaw_spread > 0
    # the mirror image turns the head the other way
    head = analyzer.analyze(astronaut[1], landmarks=True)[0]
    turned = analyzer.analyze(mirrored, landmarks=True)[0]
    assert yaw_degrees(head.landmarks) == pytest.approx(-yaw_degrees(turned.landmarks), abs=3.0)


# -- promotions in lineage ------------------------------------------------------------------------------

def _record_eval(store: LineageStore, md5: str, scores: list[CheckpointScore], step: int) -> None:
    now = utcnow()
    stamp = {"run_id": "r1", "asset": "lora_eval", "character": "alice", "iteration": "v1", "lora_md5": md5}
    store.append("checkpoint_scores", [{**stamp, **s.as_dict(), "recorded_at": now} for s in scores])
    store.append("promotions", [{**stamp, "step": step, "chosen_by": "rule", "who": "lora_eval", "reason": "",
                                 "recorded_at": now}])


def test_a_persons_choice_stays_in_force_over_a_later_rule_choice_for_the_same_lora(tmp_path: Path):
    store = LineageStore(tmp_path / "lineage", bucket=None)
    scores = [_score(10, 1, diversity=0.2), _score(20, 2)]
    _record_eval(store, "md5a", scores, 20)
    assert promotion_in_force(store, "alice", "v1", "md5a").describe() == "step 20, promoted by the rule"
    record_promotion(store, "alice", "v1", "md5a", 10, "ana", "sharper eyes")
    _record_eval(store, "md5a", scores, 20)  # lora_eval materialized again
    assert promotion_in_force(store, "alice", "v1", "md5a").describe() == "step 10, promoted by ana: sharper eyes"
    assert promotion_in_force(store, "alice", "v1", "md5b") is None, "a new LoRA version starts from the rule"
    got = evaluated_scores(store, "alice", "v1", "md5a")
    assert [s.step for s in got] == [10, 20] and got[0].diversity == 0.2 and math.isnan(got[1].diversity)


def test_promoting_a_step_that_was_not_evaluated_names_the_steps_and_records_nothing(tmp_path: Path):
    store = LineageStore(tmp_path / "lineage", bucket=None)
    _record_eval(store, "md5a", [_score(10, 1), _score(20, 2)], 20)
    with pytest.raises(PromotionError, match="no checkpoint at step 15: the evaluated steps are 10, 20"):
        record_promotion(store, "alice", "v1", "md5a", 15, "ana", "")
    with pytest.raises(PromotionError, match="materialize lora_eval alice\\|v1 first"):
        record_promotion(store, "alice", "v1", "other", 10, "ana", "")
    assert store.rows("SELECT count(*) AS n FROM promotions WHERE chosen_by='person'")[0]["n"] == 0


def test_the_next_steps_load_the_promoted_files_else_the_final_ones(tmp_path: Path):
    store = LineageStore(tmp_path / "lineage", bucket=None)
    lora = tmp_path / "flux_lora"
    lora.mkdir()
    listed = [{"step": s, "file": f"checkpoints/step-{s:06d}.safetensors",
               "comfyui_file": f"checkpoints/step-{s:06d}_comfyui.safetensors"} for s in (10, 20)]
    (lora / CHECKPOINTS_FILE).write_text(json.dumps(listed))
    final = promoted_lora(store, lora, "alice", "v1", "md5a", "lora.safetensors", "lora_comfyui.safetensors")
    assert (final.step, final.file.name, final.promotion) == (20, "lora.safetensors", None)
    _record_eval(store, "md5a", [_score(10, 3), _score(20, 2)], 10)
    chosen = promoted_lora(store, lora, "alice", "v1", "md5a", "lora.safetensors", "lora_comfyui.safetensors")
    assert (chosen.step, chosen.file, chosen.comfyui_file.name) == (
        10, lora / "checkpoints/step-000010.safetensors", "step-000010_comfyui.safetensors")
    assert chosen.describe() == "step 10, promoted by the rule"


def test_the_table_marks_the_promoted_checkpoint_and_the_plot_is_drawn(tmp_path: Path):
    scores = [_score(10, 3, diversity=0.31, distance=0.42), _score(20, 2)]
    table = checkpoint_table(scores, 10).splitlines()
    assert table[2].startswith("| 10 | 50% | 0% | 0.420 | 0.310 | n/a | 50% | **promoted** |")
    assert table[3].endswith("|  |") and "n/a" in table[3]
    path = plot_checkpoints(scores, 10, tmp_path / "by_step.png", "alice v1")
    assert Image.open(path).size[0] > 500


def test_a_lora_trained_before_checkpoints_were_kept_is_evaluated_at_its_final_step(tmp_path: Path):
    assert checkpoint_files(tmp_path, "lora.safetensors", 1500) == [(1500, tmp_path / "lora.safetensors")]
    listed = [{"step": s, "file": f"checkpoints/step-{s:06d}.safetensors"} for s in (500, 250)]
    (tmp_path / CHECKPOINTS_FILE).write_text(json.dumps(listed))
    assert [step for step, _ in checkpoint_files(tmp_path, "lora.safetensors", 500)] == [250, 500]
