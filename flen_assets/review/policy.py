"""Review policies: which gated images a human must look at, per character.

`auto` decides every image by the automatic gates (the default). `required` sends every image
that passed the gates to a human (those that failed stay rejected; a human may still rescue one).
`mixed` decides the clear cases by identity distance and sends the borderline ones to a human:
within `margin` of the identity threshold on either side.

A character's policy lives in data/review_policies.toml (`flen character policy NAME POLICY`), next
to the data it governs; an asset's config may override it for one run.
"""

from __future__ import annotations

import fcntl
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from flen_resources.atomic import write_text_atomic
from flen_resources.project import Project, validate_slug

POLICIES = ("auto", "required", "mixed")
DEFAULT_MARGIN = 0.05
POLICY_FILE = "review_policies.toml"

Status = Literal["accepted", "rejected", "pending"]


@dataclass(frozen=True)
class ReviewPolicy:
    """A character's review policy and, for `mixed`, the borderline margin around the threshold."""

    policy: str = "auto"
    margin: float = DEFAULT_MARGIN

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown review policy {self.policy!r}: use one of {', '.join(POLICIES)}")
        if not 0 <= self.margin < 10:
            raise ValueError(f"review margin {self.margin} must be in [0, 10)")

    def classify(self, failed_gates: Sequence[str], distance: float | None,
                 threshold: float | None) -> tuple[Status, str]:
        """The policy's verdict on one gated image, before any human decision, and why."""
        passed = not failed_gates
        prefix = f"policy {self.policy}: "
        if self.policy == "auto":
            return ("accepted", prefix + "auto-accepted") if passed else ("rejected", prefix + "auto-rejected")
        if self.policy == "required":
            return ("pending", prefix + "awaiting human review") if passed else ("rejected", prefix + "auto-rejected")
        # mixed: only the identity distance decides what is borderline.
        if distance is None or threshold is None:
            return ("accepted", prefix + "auto-accepted") if passed else ("rejected", prefix + "auto-rejected")
        if passed and distance <= threshold - self.margin:
            return "accepted", prefix + f"clear: distance {distance:.3f} <= {threshold:.3f} - {self.margin:g}"
        if passed or (set(failed_gates) == {"identity"} and distance <= threshold + self.margin):
            return "pending", prefix + f"borderline: distance {distance:.3f} within {self.margin:g} of {threshold:.3f}"
        return "rejected", prefix + "auto-rejected"


    def classify_source(self, failed_gates: Sequence[str]) -> tuple[Status, str]:
        """The policy's verdict on one of the character's own photos: kept unless it failed the identity check,
        then auto rejects it and required or mixed ask a human (who may accept it either way)."""
        prefix = f"policy {self.policy}: "
        if not failed_gates:
            return "accepted", prefix + "source photo matches the reference"
        if self.policy == "auto":
            return "rejected", prefix + "identity outlier among the sources: auto-rejected (accept it on the review page)"
        return "pending", prefix + "identity outlier among the sources: awaiting human review"


def policy_file(project: Project) -> Path:
    return project.data_dir / POLICY_FILE


def load_policies(project: Project) -> dict[str, ReviewPolicy]:
    """Every character's policy from data/review_policies.toml (empty when the file is absent)."""
    path = policy_file(project)
    if not path.is_file():
        return {}
    raw = tomllib.loads(path.read_text())
    out = {}
    for name, entry in raw.items():
        validate_slug(name)
        out[name] = ReviewPolicy(str(entry.get("policy", "auto")), float(entry.get("margin", DEFAULT_MARGIN)))
    return out


def character_policy(project: Project, character: str, override: str = "", margin: float | None = None) -> ReviewPolicy:
    """The policy that applies to `character`: `override` when set, else its own, else auto."""
    own = load_policies(project).get(validate_slug(character), ReviewPolicy())
    policy = override or own.policy
    return ReviewPolicy(policy, own.margin if margin is None else margin)


def set_character_policy(project: Project, character: str, policy: ReviewPolicy) -> Path:
    """Write one character's policy (under a lock, atomically: two CLIs at once lose nothing)."""
    validate_slug(character)
    path = policy_file(project)
    path.parent.mkdir(parents=True, exist_ok=True)
    project.locks_dir.mkdir(parents=True, exist_ok=True)
    with open(project.locks_dir / "review_policies.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            policies = {**load_policies(project), character: policy}
            lines = ["# Review policy per character: auto | required | mixed (written by `flen character policy`)."]
            for name in sorted(policies):
                lines += ["", f"[{name}]", f'policy = "{policies[name].policy}"', f"margin = {policies[name].margin!r}"]
            write_text_atomic(path, "\n".join(lines) + "\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
