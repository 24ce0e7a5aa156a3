"""Decoding untrusted image files safely, and the image measurements the gates use."""

from __future__ import annotations

import hashlib
import io
import os
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: larger files are refused as possible decompression bombs


class ImageRejected(Exception):
    """A file that cannot be used; `code` is a stable reason id, the message names the file."""

    def __init__(self, path: Path | str, code: str, detail: str):
        self.path = str(path)
        self.code = code
        self.detail = detail
        super().__init__(f"{Path(path).name}: {detail}")


@dataclass
class DecodedImage:
    """An image decoded to 8-bit RGB with EXIF orientation applied."""

    image: Image.Image
    format: str
    original_mode: str
    original_size: tuple[int, int]
    exif_transposed: bool


def _imagehash():
    """The imagehash module, imported on first use: only the hashes need it, and the editors and
    trainers that import this module also run where it is not installed (the GPU benchmark machine)."""
    import imagehash

    return imagehash


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: 16-bit scaled, alpha flattened on white, CMYK/palette converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1e-9)
        return Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" or img.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an untrusted file to RGB, or raise ImageRejected with a reason naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageRejected(path, "unreadable", f"cannot read file ({exc.strerror})") from exc
    if size == 0:
        raise ImageRejected(path, "empty", "empty file (0 bytes)")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
            Image.MAX_IMAGE_PIXELS = max_pixels
            # face_recognition turns this on globally; a truncated photo must be an error here.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                img = Image.open(io.BytesIO(data))
                fmt = img.format or "unknown"
                if img.width * img.height > max_pixels:
                    raise Image.DecompressionBombError("too many pixels")
                img.load()
            finally:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_truncated
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected(
            path, "too_large", f"image is larger than the {max_pixels / 1e6:g} MP limit (possible decompression bomb)"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(path, "not_an_image", "not an image Pillow can read (wrong extension or corrupt header)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(path, "corrupt", f"corrupt or truncated image data ({exc})") from exc
    original_mode, original_size = img.mode, img.size
    orientation = _orientation(img)
    transposed = ImageOps.exif_transpose(img)
    return DecodedImage(
        image=_to_rgb(transposed),
        format=fmt,
        original_mode=original_mode,
        original_size=original_size,
        exif_transposed=orientation not in (None, 1),
    )


def _orientation(img: Image.Image) -> int | None:
    try:
        return img.getexif().get(0x0112)
    except Exception:  # a broken EXIF block is not worth rejecting the photo for
        return None


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longer side is at most `max_side` (never upscales)."""
    if max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.LANCZOS)


def perceptual_hash(img: Image.Image) -> str:
    """64-bit pHash as hex."""
    return str(_imagehash().phash(img))


def phash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex pHashes."""
    return _imagehash().hex_to_hash(a) - _imagehash().hex_to_hash(b)


def color_hash(img: Image.Image) -> str:
    """Colour-distribution hash (imagehash.colorhash) as hex."""
    return str(_imagehash().colorhash(img))


def is_near_duplicate(phash_a: str, color_a: str, phash_b: str, color_b: str, max_phash: int = 4,
                      max_color: int = 1) -> bool:
    """Same structure (pHash) and same colours: a re-encode, resize or copy, not a new view.

    pHash alone ignores colour, so a warm-light or black-and-white edit would count as a copy of
    its parent; requiring the colour hash to match too keeps such edits.
    """
    return (phash_distance(phash_a, phash_b) <= max_phash
            and _imagehash().hex_to_flathash(color_a, 3) - _imagehash().hex_to_flathash(color_b, 3) <= max_color)


def sharpness(img: Image.Image, box: tuple[int, int, int, int] | None = None) -> float:
    """Variance of the Laplacian of the grey image (or of `box` = (top, right, bottom, left))."""
    grey = np.asarray(img.convert("L"), dtype=np.float64)
    if box is not None:
        top, right, bottom, left = box
        grey = grey[max(top, 0):bottom, max(left, 0):right]
    if grey.shape[0] < 3 or grey.shape[1] < 3:
        return 0.0
    lap = (-4 * grey[1:-1, 1:-1] + grey[:-2, 1:-1] + grey[2:, 1:-1] + grey[1:-1, :-2] + grey[1:-1, 2:])
    return float(lap.var())


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (no timestamps), so equal pixels give equal bytes and sha256."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temp name in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_png(img: Image.Image, folder: Path) -> tuple[str, Path]:
    """Save as <sha256>.png in `folder`; returns (sha256, path). Content-addressed, so idempotent."""
    data = png_bytes(img)
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"{digest}.png"
    if not path.exists():
        write_bytes_atomic(path, data)
    return digest, path
