"""The identity rule on real dlib embeddings of photos installed packages ship (astronaut, Grace Hopper)."""

from __future__ import annotations

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from flen_resources.faces import DLIB_SAME_PERSON_DISTANCE, FaceAnalyzer
from flen_resources.identity import (
    REFERENCE_FILE,
    Calibration,
    GateSettings,
    KeptImages,
    Reference,
    build_reference,
    calibrate_threshold,
    gate_image,
    leave_one_out_distances,
    score_generations,
)
from flen_resources.imaging import color_hash, perceptual_hash


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("hog")


@pytest.fixture(scope="module")
def astronaut_crops() -> list[Image.Image]:
    astro = Image.fromarray(skimage.data.astronaut())
    return [astro.crop((40, 0, 400, 320)), astro.crop((0, 10, 340, 300)), astro.crop((60, 0, 420, 330)),
            astro.crop((120, 40, 320, 210)).resize((400, 340), Image.LANCZOS)]


@pytest.fixture(scope="module")
def grace() -> Image.Image:
    return Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")


@pytest.fixture(scope="module")
def embeddings(analyzer, astronaut_crops, grace) -> np.ndarray:
    faces = [analyzer.analyze(img) for img in [*astronaut_crops, grace]]
    assert all(len(f) == 1 for f in faces)
    return np.array([f[0].embedding for f in faces], dtype=np.float64)


@pytest.fixture(scope="module")
def reference(embeddings) -> Reference:
    ref, _ = build_reference(embeddings, ["a", "b", "c", "d", "grace"], Calibration())
    return ref


def test_leave_one_out_is_the_distance_to_the_mean_of_the_others():
    vecs = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    loo = leave_one_out_distances(vecs)
    assert loo == pytest.approx([np.hypot(1, 1), np.hypot(2, 1), np.hypot(1, 2)])


def test_fewer_than_three_sources_take_dlibs_default():
    threshold, rule = calibrate_threshold(np.array([0.1, 0.2]), Calibration())
    assert threshold == DLIB_SAME_PERSON_DISTANCE
    assert "fewer than 3" in rule


@pytest.mark.parametrize("loo_max, expected", [(0.1, 0.40), (0.4, 0.5), (0.9, DLIB_SAME_PERSON_DISTANCE)])
def test_threshold_is_the_margin_times_the_spread_clipped(loo_max, expected):
    threshold, _ = calibrate_threshold(np.array([0.0, loo_max / 2, loo_max]), Calibration())
    assert threshold == pytest.approx(expected)


def test_another_person_is_left_out_of_the_reference(embeddings):
    ref, fits = build_reference(embeddings, ["a", "b", "c", "d", "grace"], Calibration())
    assert [f.inlier for f in fits] == [True, True, True, True, False]
    assert ref.outliers == ("grace",) and ref.n_sources == 4
    assert Calibration.min_threshold <= ref.threshold <= DLIB_SAME_PERSON_DISTANCE
    assert all(ref.matches(f.distance) for f in fits[:4])
    assert not ref.matches(fits[4].distance)
    assert np.allclose(ref.embedding, embeddings[:4].mean(axis=0))


def test_without_a_majority_everyone_stays(embeddings):
    _, fits = build_reference(embeddings[[0, 4]], ["a", "grace"], Calibration())
    assert all(f.inlier for f in fits)


def test_reference_round_trips_through_its_file(tmp_path, reference):
    path = reference.save(tmp_path)
    assert path.name == REFERENCE_FILE
    loaded = Reference.load(tmp_path)
    assert np.array_equal(loaded.embedding, reference.embedding)
    assert (loaded.threshold, loaded.rule, loaded.n_sources, loaded.outliers) == \
        (reference.threshold, reference.rule, reference.n_sources, reference.outliers)


def test_the_character_passes_every_gate(analyzer, reference, astronaut_crops):
    gated = gate_image(astronaut_crops[0], analyzer, reference, KeptImages(), GateSettings())
    assert gated.failed == [] and gated.reason == "passed all gates"
    assert [g.gate for g in gated.results] == ["one_face", "identity", "face_size", "sharpness", "duplicate"]
    assert gated.distance is not None and gated.distance <= reference.threshold


def test_another_person_fails_identity_only(analyzer, reference, grace):
    gated = gate_image(grace, analyzer, reference, KeptImages(), GateSettings())
    assert gated.failed_names == ["identity"]
    assert "identity drift" in gated.reason


def test_no_face_fails_one_face_identity_and_size(analyzer, reference):
    camera = Image.fromarray(skimage.data.camera()).convert("RGB")
    gated = gate_image(camera, analyzer, reference, KeptImages(), GateSettings())
    assert gated.failed_names == ["one_face", "identity", "face_size", "sharpness"]
    assert gated.distance is None and gated.measures["face_box"] is None


def test_a_near_duplicate_of_a_kept_image_is_caught(analyzer, reference, astronaut_crops):
    img = astronaut_crops[0]
    kept = KeptImages()
    kept.add(perceptual_hash(img), color_hash(img), "portrait.jpg")
    gated = gate_image(img, analyzer, reference, kept, GateSettings())
    assert gated.failed_names == ["duplicate"]
    assert gated.measures["duplicate_of"] == "portrait.jpg"


def test_gate_settings_decide_face_size(analyzer, reference, astronaut_crops):
    gated = gate_image(astronaut_crops[0], analyzer, reference, KeptImages(), GateSettings(min_face_px=10_000))
    assert gated.failed_names == ["face_size"]


def test_generations_are_scored_against_the_reference(analyzer, reference, astronaut_crops, grace):
    camera = Image.fromarray(skimage.data.camera()).convert("RGB")
    metrics, rows = score_generations([astronaut_crops[1], grace, camera], analyzer, reference)
    assert [r["same_person"] for r in rows] == [True, False, False]
    assert metrics["identity_consistency"] == pytest.approx(1 / 3)
    assert metrics["face_detected_rate"] == pytest.approx(2 / 3)
    assert metrics["diversity"] > 0.6  # the one pair is two different people
