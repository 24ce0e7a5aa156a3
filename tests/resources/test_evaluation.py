"""The evaluation's rules and pictures: comparing iterations, metrics without a value, the history plot."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from flen_resources.evaluation import compare_consistency, format_metric, metrics_table, plot_history, short_prompt

NAN = float("nan")


def test_zero_against_zero_is_not_not_worse():
    verdict = compare_consistency(0.0, 0.0, "v2", "v1")
    assert not verdict.passed
    assert verdict.message == ("0% of images match the character in v2 and in v1: "
                               "the LoRA has not learned the character yet")


@pytest.mark.parametrize("this, previous, previous_iteration, passed, words", [
    (0.0, None, None, False, "0% of images match the character in v1: the LoRA has not learned"),
    (0.0, 0.5, "v1", False, "0% of images match the character in v2 (down from 50% in v1)"),
    (0.25, 0.5, "v1", False, "worse: 25% of images match the character in v2, 50% in v1"),
    (0.5, 0.5, "v1", True, "50% of images match the character in v2, 50% in v1"),
    (0.75, 0.5, "v1", True, "75% of images match the character in v2, 50% in v1"),
    (0.5, None, "v1", True, "no evaluation of v1 to compare with"),
])
def test_not_worse_rule(this, previous, previous_iteration, passed, words):
    iteration = "v1" if previous_iteration is None else "v2"
    verdict = compare_consistency(this, previous, iteration, previous_iteration)
    assert verdict.passed is passed and words in verdict.message, verdict


def test_v1_with_some_matches_passes():
    verdict = compare_consistency(0.25, None, "v1", None)
    assert verdict.passed and "no previous iteration to compare with" in verdict.message


def test_a_metric_without_a_value_reads_as_why():
    assert format_metric("mean_distance", NAN) == "n/a (no face found)"
    assert format_metric("diversity", NAN) == "n/a (fewer than 2 faces found)"
    assert format_metric("something_else", NAN) == "n/a"
    assert format_metric("identity_consistency", 0.25) == "25%"
    assert format_metric("mean_distance", 0.41234) == "0.412"


def test_short_prompt_keeps_what_distinguishes_the_prompt():
    t = "alice_flen"
    assert short_prompt(f"photo of {t}, portrait, looking at the camera", t) == "portrait, looking at the camera"
    assert short_prompt(f"photo of {t} outdoors in a park, natural light", t) == "outdoors in a park, natural light"
    assert short_prompt(f"close-up photo of {t}, soft light", t) == "close-up, soft light"
    assert short_prompt(f"photo of {t}", t) == f"photo of {t}"


def test_metrics_table_has_a_column_per_iteration():
    history = [{"iteration": "v1", "identity_consistency": 0.0, "face_detected_rate": 0.0, "mean_distance": NAN,
                "diversity": NAN},
               {"iteration": "v2", "identity_consistency": 0.5, "face_detected_rate": 1.0, "mean_distance": 0.52,
                "diversity": 0.3}]
    lines = metrics_table(history, [("images", {"v1": "4", "v2": "4"})]).splitlines()
    assert lines[0] == "| metric | v1 | v2 |"
    assert lines[2] == "| identity consistency | 0% | 50% |"
    assert lines[4] == "| mean distance | n/a | 0.520 |"  # narrow cells: the reason is said once, below
    assert lines[6] == "| images | 4 | 4 |"
    assert lines[-1] == "n/a: mean distance: no face found; diversity: fewer than 2 faces found"


def _pixels_near(img: Image.Image, hex_colour: str, tolerance: int = 40) -> int:
    target = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return sum(1 for p in img.convert("RGB").getdata() if all(abs(a - b) <= tolerance for a, b in zip(p, target)))


@pytest.mark.parametrize("history", [
    # equal rates (both 0%, no face): one line used to hide the other
    [{"iteration": "v1", "identity_consistency": 0.0, "face_detected_rate": 0.0, "mean_distance": NAN},
     {"iteration": "v2", "identity_consistency": 0.0, "face_detected_rate": 0.0, "mean_distance": NAN}],
    [{"iteration": "v1", "identity_consistency": 0.25, "face_detected_rate": 0.75, "mean_distance": 0.71},
     {"iteration": "v2", "identity_consistency": 0.5, "face_detected_rate": 1.0, "mean_distance": 0.55},
     {"iteration": "v3", "identity_consistency": 0.75, "face_detected_rate": 1.0, "mean_distance": 0.42}],
    [{"iteration": "v1", "identity_consistency": 0.5, "face_detected_rate": 1.0, "mean_distance": 0.5}],
], ids=["equal-zero", "three", "one"])
def test_history_plot_shows_every_line(tmp_path, history):
    path = plot_history(history, tmp_path / "history.png", "alice")
    img = Image.open(path)
    assert img.width >= 600 and img.height >= 450
    assert _pixels_near(img, "#1f4e79") > 50, "the identity-consistency line is visible"
    assert _pixels_near(img, "#2e8b57") > 50, "the face-detected line is visible"
    if not all(math.isnan(h["mean_distance"]) for h in history):
        assert _pixels_near(img, "#8e44ad") > 20, "the mean-distance line is visible"
