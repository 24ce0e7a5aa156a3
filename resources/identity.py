"""The identity rule: a character's reference face and calibrated threshold, the gates of one image,
and the identity scores of generated images.

Everything takes plain numbers, images and paths: the assets (`identity_reference`,
`filtered_images`, `lora_eval`, `synthetic_batch`) call it, and it is tested on real embeddings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from flen_resources.atomic import write_text_atomic
from flen_resources.faces import DLIB_SAME_PERSON_DISTANCE, FaceAnalyzer, face_distance
from flen_resources.imaging import color_hash, is_near_duplicate, perceptual_hash, sharpness
from flen_resources.lineage import to_json

REFERENCE_FILE = "reference.json"
MIN_SOURCES_TO_CALIBRATE = 3  # fewer photos give no spread to calibrate from: dlib's default applies


# -- the reference and its threshold --------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """How a character's threshold is calibrated from its sources (see calibrate_threshold)."""

    default_threshold: float = DLIB_SAME_PERSON_DISTANCE
    min_threshold: float = 0.40
    margin: float = 1.25
    outlier_distance: float = DLIB_SAME_PERSON_DISTANCE  # farther from the others: another person


def leave_one_out_distances(embeddings: np.ndarray) -> np.ndarray:
    """Distance of each embedding to the mean of all the others."""
    n = len(embeddings)
    total = embeddings.sum(axis=0)
    return np.array([face_distance(embeddings[i], (total - embeddings[i]) / (n - 1)) for i in range(n)])


def calibrate_threshold(loo: np.ndarray, calibration: Calibration) -> tuple[float, str]:
    """clip(margin x max leave-one-out distance, min, default) with >= 3 sources, else the default; and the rule in words."""
    if len(loo) < MIN_SOURCES_TO_CALIBRATE:
        return calibration.default_threshold, f"fewer than 3 sources: dlib default {calibration.default_threshold}"
    raw = calibration.margin * float(loo.max())
    threshold = float(min(max(raw, calibration.min_threshold), calibration.default_threshold))
    return threshold, (f"clip({calibration.margin} x max leave-one-out distance {loo.max():.3f}, "
                       f"{calibration.min_threshold}, {calibration.default_threshold}) over {len(loo)} sources")


def find_inliers(embeddings: np.ndarray, calibration: Calibration) -> np.ndarray:
    """Mask of the sources within `outlier_distance` of the mean of the others (all, when no majority agrees)."""
    inlier = np.ones(len(embeddings), dtype=bool)
    if len(embeddings) >= MIN_SOURCES_TO_CALIBRATE:
        inlier = leave_one_out_distances(embeddings) <= calibration.outlier_distance
        if inlier.sum() < 2:  # no majority to trust: keep everyone, and the asset's check says so
            inlier[:] = True
    return inlier


@dataclass(frozen=True)
class Reference:
    """A character's identity: the mean face embedding of its sources and the distance that still matches."""

    embedding: np.ndarray
    threshold: float
    rule: str = ""
    n_sources: int = 0
    outliers: tuple[str, ...] = ()

    def distance(self, embedding: np.ndarray) -> float:
        """dlib distance of a face embedding to the reference."""
        return face_distance(embedding, self.embedding)

    def matches(self, distance: float | None) -> bool:
        """Whether a distance (None: no face) is the same person."""
        return distance is not None and distance <= self.threshold

    def save(self, folder: Path) -> Path:
        """Write reference.json into `folder`."""
        return write_text_atomic(folder / REFERENCE_FILE, json.dumps(
            {"embedding": self.embedding.tolist(), "threshold": self.threshold, "rule": self.rule,
             "n_sources": self.n_sources, "outliers": list(self.outliers)}, indent=1))

    @classmethod
    def load(cls, folder: Path) -> Reference:
        """The reference that identity_reference published in `folder`."""
        raw = json.loads((folder / REFERENCE_FILE).read_text())
        return cls(np.array(raw["embedding"], dtype=np.float64), float(raw["threshold"]), raw.get("rule", ""),
                   int(raw.get("n_sources", 0)), tuple(raw.get("outliers", ())))


@dataclass(frozen=True)
class SourceFit:
    """How one source photo relates to the reference built from all of them."""

    name: str
    inlier: bool
    distance: float


def build_reference(embeddings: np.ndarray, names: Sequence[str],
                    calibration: Calibration) -> tuple[Reference, list[SourceFit]]:
    """The reference from the inlier sources, its calibrated threshold, and each source's fit."""
    embeddings = np.asarray(embeddings, dtype=np.float64)
    inlier = find_inliers(embeddings, calibration)
    mean = embeddings[inlier].mean(axis=0)
    loo = leave_one_out_distances(embeddings[inlier]) if inlier.sum() >= MIN_SOURCES_TO_CALIBRATE else np.zeros(0)
    threshold, rule = calibrate_threshold(loo, calibration)
    fits = [SourceFit(name, bool(ok), face_distance(e, mean)) for name, e, ok in zip(names, embeddings, inlier)]
    reference = Reference(mean, threshold, rule, int(inlier.sum()), tuple(f.name for f in fits if not f.inlier))
    return reference, fits


# -- the gates of one image -----------------------------------------------------------------------

@dataclass(frozen=True)
class GateSettings:
    """Thresholds of the gates besides identity (whose threshold comes from the Reference)."""

    min_face_px: int = 40  # shorter side of the face box
    min_face_sharpness: float = 20.0  # variance of the Laplacian inside the face box
    near_duplicate_distance: int = 4  # pHash Hamming distance (with matching colours) to a kept image


@dataclass(frozen=True)
class GateResult:
    """One gate's outcome on one image."""

    gate: str
    passed: bool
    value: float | None
    threshold: float | None
    reason: str


@dataclass
class KeptImages:
    """Hashes of the images kept so far, so a later near-duplicate of one is caught."""

    hashes: list[tuple[str, str, str]] = field(default_factory=list)  # (phash, colour hash, label)

    def duplicate_of(self, phash: str, colors: str, max_distance: int) -> str | None:
        """The label of a kept image this one nearly duplicates, if any."""
        return next((label for h, c, label in self.hashes if is_near_duplicate(h, c, phash, colors, max_distance)),
                    None)

    def add(self, phash: str, colors: str, label: str) -> None:
        """Remember one more kept image."""
        self.hashes.append((phash, colors, label))


@dataclass(frozen=True)
class ImageGate:
    """Every gate's result on one image, and what was measured."""

    results: list[GateResult]
    measures: dict[str, Any]

    @property
    def failed(self) -> list[GateResult]:
        """The gates the image failed."""
        return [g for g in self.results if not g.passed]

    @property
    def failed_names(self) -> list[str]:
        """Names of the failed gates, in gate order."""
        return [g.gate for g in self.failed]

    @property
    def reason(self) -> str:
        """The gates' verdict in words."""
        return "; ".join(g.reason for g in self.failed) if self.failed else "passed all gates"

    @property
    def distance(self) -> float | None:
        """Identity distance to the reference (None: no face)."""
        return self.measures["identity_distance"]


def gate_image(img: Image.Image, analyzer: FaceAnalyzer, reference: Reference, kept: KeptImages,
               settings: GateSettings) -> ImageGate:
    """Run every gate on one image: one face, identity, face size, face sharpness, near-duplicates."""
    faces = analyzer.analyze(img)
    face = faces[0] if faces else None
    phash, colors = perceptual_hash(img), color_hash(img)
    threshold = reference.threshold
    results = [GateResult("one_face", len(faces) == 1, float(len(faces)), 1.0,
                          "one face" if len(faces) == 1 else ("no face found" if not faces else f"{len(faces)} faces found"))]
    dist = reference.distance(face.embedding) if face else None
    results.append(GateResult("identity", reference.matches(dist), dist, threshold,
                              "no face to compare" if dist is None else
                              (f"same person (distance {dist:.3f} <= {threshold:.3f})" if dist <= threshold
                               else f"identity drift: distance {dist:.3f} > {threshold:.3f}")))
    size = face.size if face else 0
    results.append(GateResult("face_size", size >= settings.min_face_px, float(size), float(settings.min_face_px),
                              f"face {size}px" + ("" if size >= settings.min_face_px else f" < {settings.min_face_px}px")))
    sharp = sharpness(img, face.box) if face else 0.0
    results.append(GateResult("sharpness", sharp >= settings.min_face_sharpness, sharp, settings.min_face_sharpness,
                              f"face sharpness {sharp:.1f}" + ("" if sharp >= settings.min_face_sharpness else " too blurry")))
    dup = kept.duplicate_of(phash, colors, settings.near_duplicate_distance)
    results.append(GateResult("duplicate", dup is None, None, float(settings.near_duplicate_distance),
                              "unique" if dup is None else f"near-duplicate of {dup}"))
    measures = dict(n_faces=len(faces), identity_distance=dist, face_size=size, face_sharpness=sharp, phash=phash,
                    colorhash=colors, duplicate_of=dup, face_box=to_json(face.box) if face else None)
    return ImageGate(results, measures)


# -- scoring generations ---------------------------------------------------------------------------

def score_generations(images: Sequence[Image.Image], analyzer: FaceAnalyzer,
                      reference: Reference) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Identity metrics of generated images (consistency, face rate, mean distance, diversity) and per-image rows."""
    rows, embeddings = [], []
    for img in images:
        faces = analyzer.analyze(img)
        dist = reference.distance(faces[0].embedding) if faces else None
        rows.append({"face": bool(faces), "distance": dist, "same_person": reference.matches(dist)})
        if faces:
            embeddings.append(faces[0].embedding)
    n = len(rows) or 1
    dists = [r["distance"] for r in rows if r["distance"] is not None]
    pairs = [face_distance(a, b) for a, b in combinations(embeddings, 2)]
    return {"identity_consistency": sum(r["same_person"] for r in rows) / n,
            "face_detected_rate": sum(r["face"] for r in rows) / n,
            "mean_distance": float(np.mean(dists)) if dists else float("nan"),
            "diversity": float(np.mean(pairs)) if pairs else float("nan")}, rows
