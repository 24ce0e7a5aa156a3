"""Decoding untrusted image files safely, and the image measurements the gates use."""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from flen_resources.atomic import write_bytes_atomic

# 40 MP: one decoded image stays near 160 MB (Pillow holds RGB as 4 bytes per pixel). JPEGs above it (45-61 MP
# camera bodies, phones' 48 MP modes) are decoded at reduced scale (see decode_bytes); other formats are refused.
DEFAULT_MAX_PIXELS = 40_000_000
# JPEG's DCT lets libjpeg decode at 1/2, 1/4 or 1/8 scale: a JPEG up to 64x the limit still fits once reduced.
JPEG_MAX_DRAFT_FACTOR = 8

# What a photographer sends, decoded by well-worn libraries: JPEG (MPO is the multi-picture JPEG some
# cameras write, opened by the same plugin), PNG, WebP, TIFF (scans and exports). Deliberately out:
# EPS/PDF (Ghostscript, a PostScript interpreter), GIF/BMP/ICO/PSD/JPEG 2000/AVIF and Pillow's dozens of
# rare formats: no photo needs them and each decoder is attack surface. HEIC (phones) only when the
# pillow-heif plugin is installed (see _heif_registered).
ALLOWED_KINDS = ("JPEG", "PNG", "WEBP", "TIFF")
ALLOWED_PILLOW_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "TIFF", "HEIF"})

# Opening an untrusted directory entry: never through a symlink (O_NOFOLLOW), never blocking on a FIFO
# (O_NONBLOCK), never adopting a terminal (O_NOCTTY); what was opened is then checked with fstat.
_OPEN_FLAGS = (os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NOCTTY", 0))
_CHUNK = 1 << 20


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
    scale: int = 1  # a JPEG over the pixel limit is decoded at 1/scale (draft mode)


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


def entry_kind(mode: int) -> tuple[str, str] | None:
    """(reason_code, what it is) for a directory entry's st_mode that is not a regular file; None if it is."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symlink", "symbolic link, not followed (photos are copied, never linked)"
    if stat.S_ISDIR(mode):
        return "subfolder", "subfolder, not read (photos must sit directly in the folder)"
    if stat.S_ISFIFO(mode):
        return "not_regular_file", "named pipe (FIFO), not a regular file"
    if stat.S_ISSOCK(mode):
        return "not_regular_file", "socket, not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not_regular_file", "device file, not a regular file"
    return "not_regular_file", "not a regular file"


def open_regular(name: str | Path, dir_fd: int | None = None) -> int:
    """A read-only fd on the regular file `name` (relative to `dir_fd`), never through a symlink."""
    try:
        fd = os.open(name, _OPEN_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK):  # O_NOFOLLOW met a link (EMLINK on the BSDs)
            raise ImageRejected(name, *entry_kind(stat.S_IFLNK)) from exc
        if exc.errno == errno.ENXIO:  # a socket, or a device without a driver
            raise ImageRejected(name, "not_regular_file", "socket or device, not a regular file") from exc
        raise ImageRejected(name, "unreadable", f"cannot read file ({exc.strerror})") from exc
    # What was opened is what gets read: checking the fd (not the path again) leaves no window to swap it.
    kind = entry_kind(os.fstat(fd).st_mode)
    if kind is not None:
        os.close(fd)
        raise ImageRejected(name, *kind)
    return fd


def file_size_limit(max_pixels: int) -> int:
    """Most bytes an accepted file may have: its pixels uncompressed at 16-bit RGBA, plus 64 MiB of metadata."""
    return max_pixels * 8 + (64 << 20)


def read_regular(name: str | Path, dir_fd: int | None = None, max_bytes: int | None = None) -> bytes:
    """All bytes of the regular file `name`, read from one fd opened by open_regular."""
    fd = open_regular(name, dir_fd)
    try:
        size = os.fstat(fd).st_size
        if max_bytes is not None and size > max_bytes:
            raise _too_many_bytes(name, size, max_bytes)
        chunks, total = [], 0
        while chunk := os.read(fd, _CHUNK):
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:  # it grew while being read
                raise _too_many_bytes(name, total, max_bytes)
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise ImageRejected(name, "unreadable", f"cannot read file ({exc.strerror})") from exc
    finally:
        os.close(fd)


def _too_many_bytes(name: str | Path, size: int, max_bytes: int) -> ImageRejected:
    return ImageRejected(name, "too_large", f"file is {size / 1e6:.0f} MB, more than the {max_bytes / 1e6:.0f} MB limit")


# Magic numbers: the file kind comes from the bytes, never from the name. Allowed kinds and the common
# kinds people drop by mistake (so the refusal can name them); anything else is "not an image".
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"II+\x00", "TIFF"), (b"MM\x00+", "TIFF"),  # classic, BigTIFF
    (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"8BPS", "PSD"), (b"\x00\x00\x01\x00", "ICO"), (b"icns", "ICNS"), (b"qoif", "QOI"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"), (b"DDS ", "DDS"),
    (b"SIMPLE  =", "FITS"), (b"\x89HDF", "HDF5"), (b"\xd7\xcd\xc6\x9a", "WMF"), (b"<?xml", "XML/SVG"),
    (b"<svg", "SVG"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"), (b"\x7fELF", "ELF executable"),
    (b"MZ", "Windows executable"), (b"#!", "script"),
)
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx")


def sniff_kind(head: bytes) -> str | None:
    """The kind of file its first bytes announce (JPEG, PNG, WEBP, TIFF, HEIF, EPS, ...), or None."""
    if head[:4] == b"RIFF":
        return "WEBP" if head[8:12] == b"WEBP" else "RIFF (not WebP)"
    if head[4:8] == b"ftyp":  # ISO base media: HEIC, AVIF, MP4, MOV
        brands = head[8:12] + head[16:32]  # major brand, then the first compatible brands
        if any(b in brands for b in _HEIF_BRANDS):
            return "HEIF"
        return "AVIF" if b"avif" in brands or b"avis" in brands else "ISO media (MP4/MOV)"
    return next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)


@functools.cache
def _heif_registered() -> bool:
    """Whether HEIC decodes here: only with the pillow-heif plugin installed (registered on first use)."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return "HEIF" in Image.OPEN


def allowed_kinds() -> tuple[str, ...]:
    """The kinds decode_bytes accepts (Pillow format ids): ALLOWED_KINDS, plus HEIF with pillow-heif."""
    return ALLOWED_KINDS + (("HEIF",) if _heif_registered() else ())


def decode_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an untrusted file to RGB, read once without following links; or raise ImageRejected."""
    return decode_bytes(read_regular(path, max_bytes=file_size_limit(max_pixels)), path, max_pixels)


def decode_bytes(data: bytes, name: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an untrusted file's bytes to RGB, or raise ImageRejected with a reason naming the file."""
    if not data:
        raise ImageRejected(name, "empty", "empty file (0 bytes)")
    kind = sniff_kind(data[:64])
    if kind is None:
        raise ImageRejected(name, "not_an_image",
                            "not an image: no known file signature (wrong extension or corrupt header)")
    if kind not in allowed_kinds():
        raise ImageRejected(name, "unsupported_format", f"{kind} file: only {', '.join(allowed_kinds())} are accepted")
    try:
        with _pillow_limits(kind, max_pixels):
            # formats=[kind]: only the plugin the magic bytes named may parse it, whatever Pillow could open.
            img = Image.open(io.BytesIO(data), formats=[kind])
            if img.format not in ALLOWED_PILLOW_FORMATS:  # a plugin's factory handing over to another format
                raise ImageRejected(name, "unsupported_format", f"{img.format} file: not an accepted format")
            original_size = img.size
            scale = _fit_pixel_limit(img, name, max_pixels)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _too_many_pixels(name, max_pixels) from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected(name, "not_an_image", f"not a readable {kind} (corrupt header)") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected(name, "corrupt", f"corrupt or truncated image data ({exc})") from exc
    original_mode = img.mode
    orientation = _orientation(img)
    transposed = ImageOps.exif_transpose(img)
    return DecodedImage(
        image=_to_rgb(transposed),
        format=img.format or kind,
        original_mode=original_mode,
        original_size=original_size,
        exif_transposed=orientation not in (None, 1),
        scale=scale,
    )


@contextmanager
def _pillow_limits(kind: str, max_pixels: int) -> Iterator[None]:
    """Pillow's bomb guard set to our limit (64x for JPEG, which draft mode shrinks), truncation an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        old_limit, old_truncated = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
        Image.MAX_IMAGE_PIXELS = max_pixels * (JPEG_MAX_DRAFT_FACTOR ** 2 if kind == "JPEG" else 1)
        # face_recognition turns this on globally; a truncated photo must be an error here.
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = old_limit, old_truncated


def _fit_pixel_limit(img: Image.Image, name: Path | str, max_pixels: int) -> int:
    """Before decoding: 1 if `img` fits, else the JPEG draft scale (2, 4, 8) that fits; else too_large."""
    width, height = img.size
    if width * height <= max_pixels:
        return 1
    if img.format in ("JPEG", "MPO"):
        # libjpeg decodes at 1/scale directly: memory is that of the reduced image, and the pipeline
        # downsizes to max_side (1024) anyway, so nothing it uses is lost.
        for scale in (2, 4, JPEG_MAX_DRAFT_FACTOR):
            if -(-width // scale) * -(-height // scale) <= max_pixels:
                drafted = img.draft("RGB", (max(1, width // scale), max(1, height // scale)))
                if drafted is not None and img.width * img.height <= max_pixels:
                    return round(width / drafted[1][2])  # the scale libjpeg will use (box = size / scale)
                break
    raise _too_many_pixels(name, max_pixels)


def _too_many_pixels(name: Path | str, max_pixels: int) -> ImageRejected:
    return ImageRejected(name, "too_large",
                         f"image is larger than the {max_pixels / 1e6:g} MP limit (possible decompression bomb)")


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


def save_png(img: Image.Image, folder: Path) -> tuple[str, Path]:
    """Save as <sha256>.png in `folder`; returns (sha256, path). Content-addressed, so idempotent."""
    data = png_bytes(img)
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"{digest}.png"
    if not path.exists():
        write_bytes_atomic(path, data)
    return digest, path
