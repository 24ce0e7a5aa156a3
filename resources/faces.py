"""Face detection and 128-d identity embeddings with face_recognition (dlib)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

with warnings.catch_warnings():
    # face_recognition_models imports pkg_resources, which warns about its own deprecation.
    warnings.simplefilter("ignore")
    import face_recognition

# dlib's documented operating point: pairs of photos closer than this are the same person.
DLIB_SAME_PERSON_DISTANCE = 0.6


@dataclass(frozen=True)
class Face:
    """One detected face: box as (top, right, bottom, left) pixels, and its embedding."""

    box: tuple[int, int, int, int]
    embedding: np.ndarray
    # dlib's 68-point landmarks by feature ('nose_tip', 'left_eye', ...), in `image` pixels; only when asked for.
    landmarks: dict[str, list[tuple[int, int]]] | None = None

    @property
    def size(self) -> int:
        """The shorter side of the face box in pixels."""
        top, right, bottom, left = self.box
        return int(min(bottom - top, right - left))

    @property
    def area(self) -> int:
        top, right, bottom, left = self.box
        return int((bottom - top) * (right - left))


def face_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Euclidean distance between two 128-d embeddings (dlib's metric)."""
    return float(np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)))


class FaceAnalyzer:
    """Finds faces and embeds them. `hog` runs on any CPU; `cnn` wants a CUDA build of dlib."""

    def __init__(self, model: Literal["hog", "cnn"] = "hog", upsample: int = 1, num_jitters: int = 1,
                 max_side: int = 1024):
        self.model = model
        self.upsample = upsample
        self.num_jitters = num_jitters
        self.max_side = max_side

    def analyze(self, image: Image.Image, landmarks: bool = False) -> list[Face]:
        """All faces in `image`, largest first, with boxes (and landmarks when asked) in `image`'s own pixels."""
        scale = min(1.0, self.max_side / max(image.size))
        work = image if scale == 1.0 else image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        pixels = np.asarray(work.convert("RGB"))
        boxes = face_recognition.face_locations(pixels, number_of_times_to_upsample=self.upsample, model=self.model)
        if not boxes:
            return []
        encodings = face_recognition.face_encodings(pixels, boxes, num_jitters=self.num_jitters)
        marks = face_recognition.face_landmarks(pixels, boxes, model="large") if landmarks else [None] * len(boxes)
        faces = [
            Face(box=tuple(int(round(v / scale)) for v in box), embedding=np.asarray(enc, dtype=np.float32),
                 landmarks=None if mark is None else
                 {k: [(int(round(x / scale)), int(round(y / scale))) for x, y in pts] for k, pts in mark.items()})
            for box, enc, mark in zip(boxes, encodings, marks)
        ]
        return sorted(faces, key=lambda f: f.area, reverse=True)
