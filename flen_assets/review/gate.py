"""The review gate inside the assets: policy verdict + human decision per image, the blocking check,
and the link from a partition's Dagster metadata to its review page."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg

from flen_assets.review.policy import ReviewPolicy
from flen_assets.review.store import Partition, ReviewStore, apply_command, review_command, review_url, status_of
from flen_resources.lineage import LineageStore
from flen_resources.project import Project


# The review checks (@asset_check in assets/curation.py and assets/lora.py) are partitioned like their
# assets, one status per character x iteration in the UI; partitions on asset checks are a Dagster
# preview feature in 1.13, which warns each time such a check is defined. Only that one warning is
# silenced (by its message); every other PreviewWarning still shows.
def silence_partitioned_check_preview() -> None:
    warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec is currently in preview",
                            category=dg.PreviewWarning)


silence_partitioned_check_preview()

PASSED = {"accepted": True, "rejected": False, "pending": None}


@dataclass(frozen=True)
class Verdict:
    """Where one image stands: its status, the policy's own verdict, and who decided."""

    status: str  # accepted | rejected | pending
    policy_status: str
    policy_reason: str
    decided_by: str  # policy | human

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    @property
    def review_text(self) -> str:
        if self.decided_by == "human":
            return f"human review: {self.status} ({self.policy_reason})"
        return self.policy_reason


def verdict(policy: ReviewPolicy, failed_gates: Sequence[str], distance: float | None, threshold: float | None,
            human: dict | None) -> Verdict:
    """The policy's verdict on one gated image, overridden by a human decision when there is one."""
    policy_status, reason = policy.classify(failed_gates, distance, threshold)
    status, decided_by = status_of(human, policy_status)
    return Verdict(status, policy_status, reason, decided_by)


def source_verdict(policy: ReviewPolicy, failed_gates: Sequence[str], human: dict | None) -> Verdict:
    """The policy's verdict on one source photo (ReviewPolicy.classify_source), overridden by a human decision."""
    policy_status, reason = policy.classify_source(failed_gates)
    status, decided_by = status_of(human, policy_status)
    return Verdict(status, policy_status, reason, decided_by)


def human_decisions(project: Project, lineage: LineageStore, asset: str, character: str,
                    iteration: str) -> dict[str, dict]:
    """Latest human decision per image id for a partition (carried over from earlier iterations)."""
    return ReviewStore.shared(project, lineage).human_decisions(Partition.of(asset, character, iteration))


def review_metadata(project: Project, asset: str, character: str, iteration: str, verdicts: Sequence[Verdict],
                    policy: ReviewPolicy) -> dict[str, Any]:
    """Materialization metadata: the review page link, the commands (serve it, apply its decisions),
    and where the review stands."""
    pending = sum(v.status == "pending" for v in verdicts)
    return {
        "review_page": dg.MetadataValue.url(review_url(character, iteration, asset)),
        "review_command": dg.MetadataValue.md(f"`{review_command(project, character, iteration, asset)}`"),
        "apply_review_command": dg.MetadataValue.md(f"`{apply_command(project, character, iteration, asset)}`"),
        "review_policy": policy.policy,
        "review_pending": pending,
        "human_decisions": sum(v.decided_by == "human" for v in verdicts),
    }


def review_check(project: Project, lineage: LineageStore, asset: str, character: str,
                 iteration: str) -> dg.AssetCheckResult:
    """Passes when no image of the partition waits for a human (decisions made since count too)."""
    part = Partition.of(asset, character, iteration)
    statuses = ReviewStore.shared(project, lineage).statuses(part)
    pending = sum(s == "pending" for s in statuses.values())
    url = review_url(character, iteration, asset)
    return dg.AssetCheckResult(
        passed=pending == 0, severity=dg.AssetCheckSeverity.ERROR,
        description=(f"{pending} image(s) await human review: run `{review_command(project, character, iteration, asset)}` "
                     f"and open {url}, then apply the decisions with "
                     f"`{apply_command(project, character, iteration, asset)}`") if pending else "every image is decided",
        metadata={"pending": pending, "accepted": sum(s == "accepted" for s in statuses.values()),
                  "rejected": sum(s == "rejected" for s in statuses.values()),
                  "review_page": dg.MetadataValue.url(url)})


def reviewed_statuses(project: Project, lineage: LineageStore, asset: str, character: str, iteration: str,
                      reader: str) -> dict[str, str]:
    """image id -> status with human decisions applied; dg.Failure when any image is still pending,
    so nothing trains on an unreviewed set (`reader` names who asks, for the message)."""
    statuses = ReviewStore.shared(project, lineage).statuses(Partition.of(asset, character, iteration))
    pending = sum(s == "pending" for s in statuses.values())
    if pending:
        raise dg.Failure(f"{reader} reads {asset} {character}|{iteration}, where {pending} image(s) await human "
                         f"review: run `{review_command(project, character, iteration, asset)}` (then open "
                         f"{review_url(character, iteration, asset)}) and decide them first")
    return statuses
