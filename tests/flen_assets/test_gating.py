"""The one gate path (ImageJudge) of filtered_images and synthetic_batch, called directly on real photos."""

from __future__ import annotations

import matplotlib.cbook
import numpy as np
import pytest
import skimage.data
from PIL import Image

from flen_assets.assets.gating import ImageJudge
from flen_assets.review.policy import ReviewPolicy
from flen_resources.faces import FaceAnalyzer
from flen_resources.identity import Calibration, GateSettings, build_reference

GATES = ["one_face", "identity", "face_size", "sharpness", "duplicate"]


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    return FaceAnalyzer("hog")


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    astro = Image.fromarray(skimage.data.astronaut())
    grace = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    return {"portrait": astro.crop((40, 0, 400, 320)), "side": astro.crop((0, 10, 340, 300)),
            "wide": astro.crop((60, 0, 420, 330)), "grace": grace}


@pytest.fixture(scope="module")
def reference(analyzer, photos):
    names = ["portrait", "side", "wide"]
    emb = np.array([analyzer.analyze(photos[n])[0].embedding for n in names], dtype=np.float64)
    return build_reference(emb, names, Calibration())[0]


def stamp(**row):
    return {"run_id": "r1", "asset": "filtered_images", "character": "astronaut", "iteration": "v1", **row}


def judge(analyzer, reference, policy="auto", humans=None) -> ImageJudge:
    return ImageJudge(analyzer, reference, GateSettings(), ReviewPolicy(policy), humans or {}, stamp)


def test_accepted_image_gets_a_row_per_gate_then_policy_and_final(analyzer, reference, photos):
    j = judge(analyzer, reference)
    judged = j.judge("id-portrait", photos["portrait"], "portrait")
    assert judged.accepted and judged.reason == "passed all gates"
    assert [r["gate"] for r in judged.decision_rows] == [*GATES, "policy", "final"]
    assert all(r["image_id"] == "id-portrait" and r["run_id"] == "r1" for r in judged.decision_rows)
    assert judged.decision_rows[-1]["passed"] is True
    columns = judged.review_columns(reference.threshold)
    assert columns["review_status"] == "accepted" and columns["failed_gates"] == ""
    assert j.verdicts == [judged.verdict]


def test_kept_images_catch_a_later_duplicate(analyzer, reference, photos):
    j = judge(analyzer, reference)
    j.judge("first", photos["portrait"], "first copy")
    again = j.judge("second", photos["portrait"], "second copy")
    assert not again.accepted
    assert again.gate.failed_names == ["duplicate"] and "first copy" in again.reason


def test_required_policy_sends_a_passing_image_to_a_human(analyzer, reference, photos):
    judged = judge(analyzer, reference, "required").judge("id", photos["side"], "side")
    assert judged.verdict.status == "pending" and judged.reason == "awaiting human review"
    assert judged.decision_rows[-2]["gate"] == "policy" and judged.decision_rows[-2]["passed"] is None


def test_a_human_decision_overrides_the_gates(analyzer, reference, photos):
    humans = {"id-grace": {"passed": True}}
    judged = judge(analyzer, reference, humans=humans).judge("id-grace", photos["grace"], "grace")
    assert judged.accepted and judged.verdict.decided_by == "human"
    assert judged.reason.startswith("accepted by a human (identity drift")
    assert judged.decision_rows[-1]["passed"] is True
