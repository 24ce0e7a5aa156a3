"""The one gate path of filtered_images and synthetic_batch: identity gates -> review verdict -> decision rows."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dagster as dg
from PIL import Image

from flen_assets.assets.common import PartitionRun
from flen_assets.review.gate import PASSED, Verdict, verdict
from flen_assets.review.policy import POLICIES, ReviewPolicy, character_policy
from flen_resources.faces import FaceAnalyzer
from flen_resources.identity import GateSettings, ImageGate, KeptImages, Reference, gate_image
from flen_resources.lineage import utcnow


def review_policy(run: PartitionRun, override: str, margin: float) -> ReviewPolicy:
    """The review policy of a run: `override` (auto | required | mixed) or the character's own; margin < 0: its own."""
    if override and override not in POLICIES:
        raise dg.Failure(f"unknown review_policy {override!r}: use one of {', '.join(POLICIES)} "
                         "(or leave it empty for the character's own)")
    return character_policy(run.project, run.character, override, None if margin < 0 else margin)


@dataclass(frozen=True)
class Judged:
    """One image after the gates, the review policy and any human decision."""

    gate: ImageGate
    verdict: Verdict
    reason: str
    decision_rows: list[dict[str, Any]]

    @property
    def accepted(self) -> bool:
        return self.verdict.accepted

    def review_columns(self, threshold: float) -> dict[str, Any]:
        """The manifest columns that say where the image stands and why."""
        v = self.verdict
        return dict(accepted=v.accepted, reason=self.reason, gate_reason=self.gate.reason,
                    failed_gates=",".join(self.gate.failed_names), review=v.review_text, review_status=v.status,
                    policy_status=v.policy_status, policy_reason=v.policy_reason, review_source=v.decided_by,
                    identity_threshold=threshold)


class ImageJudge:
    """Gates the images of one partition in turn, remembering kept ones to catch near-duplicates."""

    def __init__(self, analyzer: FaceAnalyzer, reference: Reference, settings: GateSettings, policy: ReviewPolicy,
                 humans: dict[str, dict], stamp: Callable[..., dict[str, Any]], kept: KeptImages | None = None):
        self.analyzer, self.reference, self.settings, self.policy = analyzer, reference, settings, policy
        self.humans, self.stamp = humans, stamp
        self.kept = kept or KeptImages()
        self.verdicts: list[Verdict] = []

    def judge(self, image_id: str, img: Image.Image, label: str) -> Judged:
        """Gate one image, decide it, and build its lineage decision rows (one per gate, the policy's, the final)."""
        gated = gate_image(img, self.analyzer, self.reference, self.kept, self.settings)
        decided = verdict(self.policy, gated.failed_names, gated.distance, self.reference.threshold,
                          self.humans.get(image_id))
        self.verdicts.append(decided)
        if not gated.failed:  # passed the automatic gates: later near-duplicates of it are duplicates, whatever review says
            self.kept.add(gated.measures["phash"], gated.measures["colorhash"], label)
        reason = "awaiting human review" if decided.status == "pending" else gated.reason
        if decided.decided_by == "human":
            reason = f"{decided.status} by a human ({gated.reason})"
        now = utcnow()
        rows = [self.stamp(image_id=image_id, gate=g.gate, passed=g.passed, value=g.value, threshold=g.threshold,
                           reason=g.reason, source="gate", decided_at=now) for g in gated.results]
        # The policy's own verdict (passed NULL: pending); human decisions are rows of their own.
        rows.append(self.stamp(image_id=image_id, gate="policy", passed=PASSED[decided.policy_status],
                               value=gated.distance, threshold=self.reference.threshold,
                               reason=decided.policy_reason, source="policy", decided_at=now))
        rows.append(self.stamp(image_id=image_id, gate="final", passed=PASSED[decided.status], reason=reason,
                               source="gate", decided_at=now))
        return Judged(gated, decided, reason, rows)
