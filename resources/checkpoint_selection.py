"""Choosing the best checkpoint of a LoRA, not the last one: each checkpoint's identity scores on the
fixed evaluation grid, the promotion rule, and which promotion is in force.

Loss does not track likeness, so `lora_eval` generates the same prompts and seeds with every
checkpoint `flux_lora` kept and scores them here; the rule below promotes one, a person may overrule
it (`flen promote`), and `synthetic_batch` and `flen export` use the promoted checkpoint. Every
score and every promotion is a lineage row (tables `checkpoint_scores` and `promotions`).
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flen_resources.faces import FaceAnalyzer, face_distance
from flen_resources.identity import Reference
from flen_resources.imaging import color_hash, is_near_duplicate, perceptual_hash
from flen_resources.lineage import LineageStore, utcnow
from flen_resources.project import CHECKPOINTS_FILE

# A generation whose face is this close to one training image's face is that image again, not the
# character learned: the same photo re-encoded lands under 0.1 in dlib's space, two photos of one
# person taken minutes apart rarely under 0.25 (dlib calls 0.6 the same person).
COPY_FACE_DISTANCE = 0.15
# Or the whole picture is a near copy of one training image: pHash Hamming distance at most this,
# with matching colours (the near-duplicate gate's rule, identity.GateSettings).
COPY_PHASH_DISTANCE = 4

PROMOTION_RULE = (
    "The checkpoint with the most generations that match the character (dlib distance at or under the calibrated "
    "threshold) and are not memorised copies of a training image (face within "
    f"{COPY_FACE_DISTANCE} of a training face, or a pHash near-duplicate of a training image). "
    "Ties: the larger diversity (mean pairwise distance of the faces), then the smaller mean distance, then the "
    "later step. With no signal at all (no faces, e.g. the tiny random-weight pack) that is the final step.")

SCORE_LABELS = (("identity_pass_rate", "pass rate"), ("memorised_rate", "memorised"),
                ("mean_distance", "mean dist."), ("diversity", "diversity"), ("yaw_spread", "yaw spread"),
                ("face_detected_rate", "faces"))


class PromotionError(ValueError):
    """A promotion that cannot be made; the message names the checkpoint and the fix."""


@dataclass(frozen=True)
class TrainingFaces:
    """What the copy-paste guard compares generations with: the training images' faces and hashes."""

    embeddings: tuple[np.ndarray, ...]
    hashes: tuple[tuple[str, str], ...]  # (pHash, colour hash) per training image

    @classmethod
    def of(cls, images: Sequence[Image.Image], analyzer: FaceAnalyzer) -> TrainingFaces:
        """Faces and hashes of the training images (an image without a face adds only its hashes)."""
        embeddings, hashes = [], []
        for img in images:
            faces = analyzer.analyze(img)
            if faces:
                embeddings.append(faces[0].embedding)
            hashes.append((perceptual_hash(img), color_hash(img)))
        return cls(tuple(embeddings), tuple(hashes))

    def copy_distance(self, embedding: np.ndarray | None) -> float | None:
        """Distance of a face to the nearest training face (None: no face on either side)."""
        if embedding is None or not self.embeddings:
            return None
        return min(face_distance(embedding, e) for e in self.embeddings)

    def is_copy(self, img: Image.Image, embedding: np.ndarray | None) -> bool:
        """Whether a generation is a memorised training image (see COPY_FACE_DISTANCE, COPY_PHASH_DISTANCE)."""
        nearest = self.copy_distance(embedding)
        if nearest is not None and nearest <= COPY_FACE_DISTANCE:
            return True
        phash, colors = perceptual_hash(img), color_hash(img)
        return any(is_near_duplicate(h, c, phash, colors, COPY_PHASH_DISTANCE) for h, c in self.hashes)


@dataclass(frozen=True)
class CheckpointScore:
    """One checkpoint's scores on the fixed evaluation grid (rates are shares of its images)."""

    step: int
    images: int
    identity_pass_rate: float  # same person, whether memorised or not
    memorised_rate: float
    mean_distance: float  # NaN: no face found
    diversity: float  # mean pairwise distance of the faces; NaN: fewer than 2
    yaw_spread: float  # standard deviation of the faces' yaw in degrees; NaN: fewer than 2
    face_detected_rate: float
    memorised_passes: int = 0  # generations that match the character but are copies of a training image

    @property
    def passes(self) -> int:
        """Generations that match the character and are not copies: what the rule ranks by."""
        return round(self.images * self.identity_pass_rate) - self.memorised_passes

    def as_dict(self) -> dict[str, Any]:
        """The scores as JSON-able numbers (NaN stays NaN: evaluation.format_metric reads it)."""
        return asdict(self)


def yaw_degrees(landmarks: dict[str, list[tuple[int, int]]] | None) -> float | None:
    """A face's yaw from its landmarks: the nose tip's offset from the eyes' midpoint, against half the eye
    distance, read as the sine of the turn (0: frontal, about ±90: profile). None without landmarks."""
    if not landmarks or not all(k in landmarks for k in ("left_eye", "right_eye", "nose_tip")):
        return None
    left = np.mean(np.asarray(landmarks["left_eye"], dtype=np.float64), axis=0)
    right = np.mean(np.asarray(landmarks["right_eye"], dtype=np.float64), axis=0)
    nose = np.mean(np.asarray(landmarks["nose_tip"], dtype=np.float64), axis=0)
    half = np.linalg.norm(right - left) / 2
    if half < 1e-6:
        return None
    offset = float(np.dot(nose - (left + right) / 2, (right - left) / (2 * half)))
    return math.degrees(math.asin(max(-1.0, min(1.0, offset / half))))


def score_checkpoint(step: int, images: Sequence[Image.Image], analyzer: FaceAnalyzer, reference: Reference,
                     training: TrainingFaces) -> tuple[CheckpointScore, list[dict[str, Any]]]:
    """One checkpoint's scores and a row per image (face, distance, same_person, memorised, copy_distance, yaw)."""
    rows, embeddings, yaws, memorised_passes = [], [], [], 0
    for img in images:
        faces = analyzer.analyze(img, landmarks=True)
        face = faces[0] if faces else None
        dist = reference.distance(face.embedding) if face else None
        same = reference.matches(dist)
        copy = training.is_copy(img, face.embedding if face else None)
        yaw = yaw_degrees(face.landmarks) if face else None
        nearest = training.copy_distance(face.embedding if face else None)
        rows.append({"face": face is not None, "distance": dist, "same_person": same, "memorised": copy,
                     "copy_distance": nearest, "yaw": yaw})
        memorised_passes += same and copy
        if face is not None:
            embeddings.append(face.embedding)
        if yaw is not None:
            yaws.append(yaw)
    n = len(rows) or 1
    dists = [r["distance"] for r in rows if r["distance"] is not None]
    pairs = [face_distance(a, b) for a, b in combinations(embeddings, 2)]
    score = CheckpointScore(
        step=step, images=len(rows), identity_pass_rate=sum(r["same_person"] for r in rows) / n,
        memorised_rate=sum(r["memorised"] for r in rows) / n,
        mean_distance=float(np.mean(dists)) if dists else float("nan"),
        diversity=float(np.mean(pairs)) if pairs else float("nan"),
        yaw_spread=float(np.std(yaws)) if len(yaws) >= 2 else float("nan"),
        face_detected_rate=sum(r["face"] for r in rows) / n, memorised_passes=memorised_passes)
    return score, rows


def _or(value: float, missing: float) -> float:
    return value if math.isfinite(value) else missing


def choose_checkpoint(scores: Sequence[CheckpointScore]) -> CheckpointScore:
    """The checkpoint PROMOTION_RULE promotes."""
    if not scores:
        raise PromotionError("no checkpoint was evaluated")
    return max(scores, key=lambda s: (s.passes, _or(s.diversity, -1.0), -_or(s.mean_distance, math.inf), s.step))


# -- promotions in lineage --------------------------------------------------------------------------

@dataclass(frozen=True)
class Promotion:
    """Which checkpoint of a LoRA version the next steps use, and who chose it."""

    step: int
    chosen_by: str  # "rule" | "person"
    who: str
    reason: str
    lora_md5: str

    def describe(self) -> str:
        """'step 250, promoted by the rule' / 'step 500, promoted by ana: sharper eyes'."""
        if self.chosen_by == "person":
            return f"step {self.step}, promoted by {self.who}" + (f": {self.reason}" if self.reason else "")
        return f"step {self.step}, promoted by the rule"


def promotion_in_force(lineage: LineageStore, character: str, iteration: str, lora_md5: str) -> Promotion | None:
    """The promotion the next steps follow for this LoRA version: a person's latest, else the rule's latest."""
    rows = lineage.rows(
        "SELECT step, chosen_by, who, reason, lora_md5 FROM promotions WHERE character=$c AND iteration=$i "
        "AND lora_md5=$m ORDER BY (chosen_by = 'person') DESC, recorded_at DESC LIMIT 1",
        {"c": character, "i": iteration, "m": lora_md5})
    return Promotion(int(rows[0]["step"]), rows[0]["chosen_by"], rows[0]["who"] or "", rows[0]["reason"] or "",
                     rows[0]["lora_md5"]) if rows else None


def evaluated_scores(lineage: LineageStore, character: str, iteration: str, lora_md5: str) -> list[CheckpointScore]:
    """Every checkpoint's latest scores for this LoRA version, by step."""
    rows = lineage.rows(
        "SELECT * FROM checkpoint_scores WHERE character=$c AND iteration=$i AND lora_md5=$m "
        "QUALIFY row_number() OVER (PARTITION BY step ORDER BY recorded_at DESC) = 1 ORDER BY step",
        {"c": character, "i": iteration, "m": lora_md5})
    fields = CheckpointScore.__dataclass_fields__
    return [CheckpointScore(**{k: (float("nan") if v is None and k != "step" else v)
                               for k, v in r.items() if k in fields}) for r in rows]


def check_step(step: int, scores: Sequence[CheckpointScore], character: str, iteration: str) -> CheckpointScore:
    """The evaluated checkpoint at `step`, or a PromotionError listing the steps that exist."""
    for score in scores:
        if score.step == step:
            return score
    if not scores:
        raise PromotionError(f"lora_eval {character}|{iteration} has evaluated no checkpoint of the current LoRA: "
                             f"materialize lora_eval {character}|{iteration} first")
    steps = ", ".join(str(s.step) for s in scores)
    raise PromotionError(f"{character} {iteration} has no checkpoint at step {step}: the evaluated steps are {steps}")


def checkpoint_table(scores: Sequence[CheckpointScore], promoted: int | None) -> str:
    """A Markdown table, one row per checkpoint, the promoted one marked."""
    lines = ["| step | " + " | ".join(label for _, label in SCORE_LABELS) + " | |",
             "|---:|" + "---:|" * len(SCORE_LABELS) + "---|"]
    for s in scores:
        cells = [_score_text(key, getattr(s, key)) for key, _ in SCORE_LABELS]
        lines.append(f"| {s.step} | " + " | ".join(cells) + f" | {'**promoted**' if s.step == promoted else ''} |")
    return "\n".join(lines)


def _score_text(key: str, value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    if key.endswith("_rate"):
        return f"{100 * value:.0f}%"
    return f"{value:.1f}°" if key == "yaw_spread" else f"{value:.3f}"


def kept_checkpoints(lora_dir: Path) -> list[dict[str, Any]]:
    """flux_lora's list of kept checkpoints (step, file, comfyui_file, loss); empty for a LoRA trained without."""
    listed = lora_dir / CHECKPOINTS_FILE
    return json.loads(listed.read_text()) if listed.is_file() else []


def checkpoint_files(lora_dir: Path, final_file: str, final_step: int) -> list[tuple[int, Path]]:
    """(step, LoRA file) of every checkpoint flux_lora published; only the final file for a LoRA without them."""
    listed = kept_checkpoints(lora_dir)
    if listed:
        return [(int(c["step"]), lora_dir / c["file"]) for c in sorted(listed, key=lambda c: int(c["step"]))]
    return [(final_step, lora_dir / final_file)]


@dataclass(frozen=True)
class PromotedLora:
    """The LoRA files the next steps use for a version: the promoted checkpoint's, else the final ones."""

    step: int | None  # None: a LoRA trained before checkpoints were kept
    file: Path
    comfyui_file: Path
    promotion: Promotion | None  # None: no evaluation promoted one yet (the final step is used)

    def describe(self) -> str:
        """'step 250, promoted by the rule' / 'the final step (no promotion recorded)'."""
        return self.promotion.describe() if self.promotion else "the final step (no promotion recorded)"


def promoted_lora(lineage: LineageStore, lora_dir: Path, character: str, iteration: str, lora_md5: str,
                  final_file: str, final_comfyui_file: str) -> PromotedLora:
    """Which files of flux_lora's folder the next steps load: the promotion in force, else the final ones."""
    listed = kept_checkpoints(lora_dir)
    promotion = promotion_in_force(lineage, character, iteration, lora_md5)
    chosen = next((c for c in listed if promotion is not None and int(c["step"]) == promotion.step), None)
    if chosen is not None:
        return PromotedLora(int(chosen["step"]), lora_dir / chosen["file"], lora_dir / chosen["comfyui_file"],
                            promotion)
    final_step = max((int(c["step"]) for c in listed), default=None)
    return PromotedLora(final_step, lora_dir / final_file, lora_dir / final_comfyui_file, None)


def record_promotion(lineage: LineageStore, character: str, iteration: str, lora_md5: str, step: int, who: str,
                     reason: str) -> Promotion:
    """A person's promotion of an evaluated checkpoint, appended to lineage; PromotionError for a step never evaluated."""
    check_step(step, evaluated_scores(lineage, character, iteration, lora_md5), character, iteration)
    lineage.append("promotions", [{
        "run_id": f"cli-promote-{uuid.uuid4().hex[:12]}", "asset": "lora_eval", "character": character,
        "iteration": iteration, "lora_md5": lora_md5, "step": step, "chosen_by": "person", "who": who,
        "reason": reason, "recorded_at": utcnow()}])
    return Promotion(step, "person", who, reason, lora_md5)
