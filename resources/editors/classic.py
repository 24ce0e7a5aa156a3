"""The `classic` editor: deterministic, identity-preserving image operations on the CPU.

Each operation keeps the face's geometry recognisable (mirror, mild zoom and rotation, light,
colour, background blur), so its outputs should pass the identity gate; the gate still checks.
Numeric parameters may be given as [low, high]: the value is drawn from the request's seed, so
the same seed always gives the same image.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from flen_resources.editors.base import EditJob, EditRequest, EditResult, Progress

VERSION = "1"
Box = tuple[int, int, int, int]


def _resolve(params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Draw every [low, high] range from the seed; other values pass through."""
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for key in sorted(params):
        value = params[key]
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            out[key] = round(rng.uniform(float(value[0]), float(value[1])), 4)
        else:
            out[key] = value
    return out


def _face_center(img: Image.Image, box: Box | None) -> tuple[float, float]:
    if box is None:
        return img.width / 2, img.height / 2
    top, right, bottom, left = box
    return (left + right) / 2, (top + bottom) / 2


def mirror(img: Image.Image, box: Box | None) -> Image.Image:
    """Horizontal flip."""
    return ImageOps.mirror(img)


def zoom(img: Image.Image, box: Box | None, factor: float = 1.3) -> Image.Image:
    """Crop around the face by `factor` (>1 zooms in) and scale back to the original size."""
    w, h = img.size
    cw, ch = w / factor, h / factor
    cx, cy = _face_center(img, box)
    left = min(max(cx - cw / 2, 0), w - cw)
    top = min(max(cy - ch / 2, 0), h - ch)
    return img.resize((w, h), Image.LANCZOS, box=(left, top, left + cw, top + ch))


def rotate(img: Image.Image, box: Box | None, degrees: float = 5.0) -> Image.Image:
    """Rotate about the centre, then crop just enough to hide the empty corners."""
    rotated = img.rotate(degrees, resample=Image.BICUBIC)
    theta = math.radians(abs(degrees))
    w, h = img.size
    # The largest centred box of the original aspect that stays inside the rotated frame.
    factor = math.cos(theta) + math.sin(theta) * max(w / h, h / w)
    cw, ch = w / factor, h / factor
    left, top = (w - cw) / 2, (h - ch) / 2
    return rotated.resize((w, h), Image.LANCZOS, box=(left, top, left + cw, top + ch))


def lighting(img: Image.Image, box: Box | None, brightness: float = 1.0, contrast: float = 1.0,
             gamma: float = 1.0) -> Image.Image:
    """Brightness, contrast and gamma."""
    out = ImageEnhance.Brightness(img).enhance(brightness)
    out = ImageEnhance.Contrast(out).enhance(contrast)
    if gamma != 1.0:
        lut = [min(255, round(255 * (i / 255) ** (1 / gamma))) for i in range(256)]
        out = out.point(lut * 3)
    return out


def color_temperature(img: Image.Image, box: Box | None, shift: float = 0.1) -> Image.Image:
    """Warm (shift > 0) or cool (shift < 0) white balance."""
    arr = np.asarray(img, dtype=np.float32)
    gains = np.array([1 + shift, 1 + shift * 0.2, 1 - shift], dtype=np.float32)
    return Image.fromarray(np.clip(arr * gains, 0, 255).astype(np.uint8), "RGB")


def background_blur(img: Image.Image, box: Box | None, radius: float = 6.0, margin: float = 1.8) -> Image.Image:
    """Blur everything outside a soft ellipse around the face (a shallow depth of field)."""
    if box is None:
        return img.filter(ImageFilter.GaussianBlur(radius))
    top, right, bottom, left = box
    cx, cy = (left + right) / 2, (top + bottom) / 2
    rx, ry = (right - left) * margin / 2, (bottom - top) * margin * 1.2 / 2
    yy, xx = np.mgrid[0:img.height, 0:img.width]
    dist = ((xx - cx) / max(rx, 1)) ** 2 + ((yy - cy) / max(ry, 1)) ** 2
    keep = np.clip(1.5 - dist, 0, 1)[..., None]  # 1 inside the ellipse, fading out beyond it
    sharp = np.asarray(img, dtype=np.float32)
    blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    return Image.fromarray((sharp * keep + blurred * (1 - keep)).astype(np.uint8), "RGB")


def grayscale(img: Image.Image, box: Box | None) -> Image.Image:
    """Black-and-white photo."""
    return ImageOps.grayscale(img).convert("RGB")


OPERATIONS: dict[str, Callable[..., Image.Image]] = {
    "mirror": mirror,
    "zoom": zoom,
    "rotate": rotate,
    "lighting": lighting,
    "color_temperature": color_temperature,
    "background_blur": background_blur,
    "grayscale": grayscale,
}


class ClassicEditor:
    """Deterministic image operations, recorded like any other editor (model `classic/1`)."""

    name = "classic"

    def model_id(self) -> str:
        return f"classic/{VERSION}"

    def edit_batch(self, jobs: Sequence[EditJob], progress: Progress | None = None) -> list[EditResult]:
        """Each job's edit, in order (every edit is independent and cheap: nothing to share)."""
        results = []
        for job in jobs:
            results.append(self.edit(job.images, job.request, face_box=job.face_box))
            if progress is not None:
                progress()
        return results

    def edit(self, images: Sequence[Image.Image], request: EditRequest,
             face_box: Box | None = None) -> EditResult:
        """Apply `request.operation` to the first image."""
        if not images:
            raise ValueError("the classic editor needs one input image, got none")
        op = OPERATIONS.get(request.operation)
        if op is None:
            raise ValueError(
                f"recipe entry {request.recipe_id!r}: unknown classic operation {request.operation!r}; "
                f"available: {', '.join(sorted(OPERATIONS))}"
            )
        params = _resolve(request.params, request.seed)
        try:
            image = op(images[0].convert("RGB"), face_box, **params)
        except TypeError as exc:
            raise ValueError(f"recipe entry {request.recipe_id!r}: bad parameters {params} for {request.operation}: {exc}") from exc
        return EditResult(image=image, operation=request.operation, params=params, model=self.model_id(),
                          prompt=request.prompt, seed=request.seed)
