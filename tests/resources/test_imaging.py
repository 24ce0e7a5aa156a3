"""decode_image and friends on bad, odd and hostile input: every file is decoded or refused with a code."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from flen_resources.imaging import (
    ImageRejected,
    color_hash,
    decode_image,
    is_near_duplicate,
    perceptual_hash,
    save_png,
    sha256_file,
)


@pytest.fixture(scope="module")
def portrait() -> Image.Image:
    """The astronaut's head and shoulders (one face), 8-bit RGB."""
    return Image.fromarray(skimage.data.astronaut()).crop((40, 0, 400, 320))


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def _rejected(path: Path, **kw) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        decode_image(path, **kw)
    return info.value


# -- refused files ------------------------------------------------------------------------------

def test_truncated_jpeg_is_corrupt(tmp_path, portrait):
    data = _jpeg_bytes(portrait)
    path = _write(tmp_path / "broken.jpg", data[: len(data) // 3])
    exc = _rejected(path)
    assert exc.code == "corrupt"
    assert exc.path == str(path)


def test_jpeg_cut_just_into_the_scan_is_corrupt(tmp_path, portrait):
    data = _jpeg_bytes(portrait)
    sos = data.index(b"\xff\xda")  # start of scan: the header parses, almost no pixel data follows
    exc = _rejected(_write(tmp_path / "header_only.jpg", data[: sos + 64]))
    assert exc.code == "corrupt"


def test_jpeg_cut_inside_its_header_is_not_an_image(tmp_path, portrait):
    data = _jpeg_bytes(portrait)
    sos = data.index(b"\xff\xda")
    exc = _rejected(_write(tmp_path / "header_cut.jpg", data[: sos + 2]))
    assert exc.code == "not_an_image"  # "corrupt header": Pillow cannot even identify it


def test_text_file_named_png_is_not_an_image(tmp_path):
    exc = _rejected(_write(tmp_path / "notes.png", b"this is a text file with an image extension\n"))
    assert exc.code == "not_an_image"


def test_random_bytes_are_not_an_image(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    exc = _rejected(_write(tmp_path / "noise.jpg", data))
    assert exc.code == "not_an_image"


def test_zero_byte_file_is_empty(tmp_path):
    exc = _rejected(_write(tmp_path / "empty.jpg", b""))
    assert exc.code == "empty"


def test_missing_file_is_unreadable(tmp_path):
    exc = _rejected(tmp_path / "gone.jpg")
    assert exc.code == "unreadable"


def test_huge_image_is_too_large(tmp_path):
    # 4 MP against a 1 MP limit: beyond Pillow's own 2x bomb error, refused before decoding.
    path = _save(Image.new("RGB", (2000, 2000), (10, 20, 30)), tmp_path / "huge.png")
    exc = _rejected(path, max_pixels=1_000_000)
    assert exc.code == "too_large"


def test_image_between_limit_and_twice_limit_is_too_large(tmp_path):
    # 1.2 MP: Pillow would only warn here; the warning must still refuse the file.
    path = _save(Image.new("RGB", (1200, 1000), (10, 20, 30)), tmp_path / "big.png")
    exc = _rejected(path, max_pixels=1_000_000)
    assert exc.code == "too_large"


def test_image_just_under_the_limit_decodes(tmp_path):
    path = _save(Image.new("RGB", (1000, 999), (10, 20, 30)), tmp_path / "big_ok.png")
    decoded = decode_image(path, max_pixels=1_000_000)
    assert decoded.image.size == (1000, 999)
    assert decoded.image.mode == "RGB"


def test_pixel_limit_is_restored_after_decoding(tmp_path):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageRejected):
        decode_image(_save(Image.new("RGB", (2000, 2000)), tmp_path / "huge.png"), max_pixels=1_000_000)
    decode_image(_save(Image.new("RGB", (10, 10)), tmp_path / "small.png"), max_pixels=500)
    assert Image.MAX_IMAGE_PIXELS == before


@pytest.mark.parametrize("name, data, kw", [
    ("broken.jpg", "truncated", {}),
    ("notes.png", b"not an image", {}),
    ("empty.jpg", b"", {}),
    ("huge.png", "huge", {"max_pixels": 1_000_000}),
])
def test_rejection_message_names_the_file(tmp_path, portrait, name, data, kw):
    if data == "truncated":
        full = _jpeg_bytes(portrait)
        data = full[: len(full) // 3]
    path = tmp_path / name
    if data == "huge":
        _save(Image.new("RGB", (2000, 2000)), path)
    else:
        path.write_bytes(data)
    exc = _rejected(path, **kw)
    assert name in str(exc)
    assert str(exc).startswith(f"{name}: ")


# -- odd but valid files, normalized to 8-bit RGB -------------------------------------------------

def test_cmyk_jpeg_becomes_rgb(tmp_path, portrait):
    path = _write(tmp_path / "print_cmyk.jpg", _jpeg_bytes(portrait.convert("CMYK")))
    decoded = decode_image(path)
    assert decoded.original_mode == "CMYK"
    assert decoded.format == "JPEG"
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == portrait.size
    # Colours survive the round trip (no inverted or swapped channels).
    diff = np.abs(np.asarray(decoded.image, dtype=float) - np.asarray(portrait, dtype=float)).mean()
    assert diff < 8


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    grey = np.full((40, 50), 32896, dtype=np.uint16)  # 128 * 257: mid grey
    grey[:, :10] = 65535
    grey[:, 10:20] = 0
    path = _save(Image.fromarray(grey), tmp_path / "scan_16bit.png")
    decoded = decode_image(path)
    assert decoded.original_mode.startswith("I")  # I;16 with Pillow >= 10
    assert decoded.image.mode == "RGB"
    px = np.asarray(decoded.image).astype(int)
    assert abs(px[0, 30, 0] - 128) <= 1
    assert (px[0, 30] == px[0, 30, 0]).all()  # grey stays grey
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 15].tolist() == [0, 0, 0]


def test_dark_16bit_png_is_not_brightened(tmp_path):
    # Every value <= 255 in 16-bit terms is nearly black; it must not be read as 8-bit data.
    path = _save(Image.fromarray(np.full((20, 20), 200, dtype=np.uint16)), tmp_path / "dark16.png")
    px = np.asarray(decode_image(path).image).astype(int)
    assert px.max() <= 2


def test_palette_png_with_transparency_is_flattened_on_white(tmp_path):
    img = Image.new("P", (20, 10), 0)
    img.putpalette([0, 0, 0, 200, 30, 40] + [0, 0, 0] * 254)  # index 0: black, index 1: red
    img.paste(1, (10, 0, 20, 10))  # right half red
    path = _save(img, tmp_path / "poster_palette.png", transparency=0)  # index 0 (black) is transparent
    decoded = decode_image(path)
    assert decoded.original_mode == "P"
    assert decoded.image.mode == "RGB"
    px = np.asarray(decoded.image)
    assert px[5, 2].tolist() == [255, 255, 255]  # transparent -> white, not black
    assert px[5, 15].tolist() == [200, 30, 40]


def test_rgba_png_is_flattened_on_white(tmp_path):
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (5, 0, 10, 10))
    px = np.asarray(decode_image(_save(rgba, tmp_path / "alpha.png")).image)
    assert px[0, 0].tolist() == [255, 255, 255]
    assert px[0, 9].tolist() == [0, 0, 255]


def test_exif_rotated_jpeg_is_turned_upright(tmp_path):
    upright = Image.new("RGB", (120, 80), (220, 20, 20))  # landscape: red top half, blue bottom half
    upright.paste((20, 20, 220), (0, 40, 120, 80))
    stored = upright.rotate(90, expand=True)  # stored a quarter turn counter-clockwise...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...with orientation 6: "rotate 90 clockwise to display"
    path = _write(tmp_path / "rotated_exif.jpg", _jpeg_bytes(stored, exif=exif.tobytes()))
    decoded = decode_image(path)
    assert decoded.original_size == (80, 120)
    assert decoded.image.size == (120, 80)  # width and height swapped back
    assert decoded.exif_transposed is True
    px = np.asarray(decoded.image).astype(int)
    assert px[10, 60, 0] > 150 and px[10, 60, 2] < 100  # top is red
    assert px[70, 60, 2] > 150 and px[70, 60, 0] < 100  # bottom is blue


def test_jpeg_without_orientation_is_not_transposed(tmp_path, portrait):
    decoded = decode_image(_write(tmp_path / "plain.jpg", _jpeg_bytes(portrait)))
    assert decoded.exif_transposed is False
    assert decoded.image.size == portrait.size


# -- hashes and content addressing ----------------------------------------------------------------

def test_sha256_file_matches_hashlib(tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # > one 1 MiB chunk
    path = _write(tmp_path / "blob.bin", data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(_write(tmp_path / "empty", b"")) == hashlib.sha256(b"").hexdigest()


def _hashes(img: Image.Image) -> tuple[str, str]:
    return perceptual_hash(img), color_hash(img)


def test_reencoded_copy_is_a_near_duplicate(portrait):
    reencoded = Image.open(io.BytesIO(_jpeg_bytes(portrait))).convert("RGB")
    low_quality = io.BytesIO()
    portrait.save(low_quality, format="JPEG", quality=70)
    for copy in (reencoded, Image.open(low_quality).convert("RGB")):
        assert is_near_duplicate(*_hashes(portrait), *_hashes(copy))


def test_colour_shifted_copy_is_not_a_near_duplicate(portrait):
    warm = Image.blend(portrait, Image.new("RGB", portrait.size, (255, 120, 0)), 0.4)
    swapped = Image.merge("RGB", portrait.split()[::-1])
    grey = portrait.convert("L").convert("RGB")
    for edit in (warm, swapped, grey):
        assert not is_near_duplicate(*_hashes(portrait), *_hashes(edit))


def test_save_png_is_idempotent(tmp_path, portrait):
    first_id, first = save_png(portrait, tmp_path)
    mtime = first.stat().st_mtime_ns
    again_id, again = save_png(portrait.copy(), tmp_path)  # same pixels, another object
    assert (again_id, again) == (first_id, first)
    assert first.name == f"{first_id}.png"
    assert sha256_file(first) == first_id
    assert first.stat().st_mtime_ns == mtime  # not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # no temp files left
    with Image.open(first) as reread:
        assert np.array_equal(np.asarray(reread), np.asarray(portrait))


def test_save_png_different_pixels_different_id(tmp_path, portrait):
    a_id, _ = save_png(portrait, tmp_path)
    b_id, _ = save_png(portrait.transpose(Image.FLIP_LEFT_RIGHT), tmp_path)
    assert a_id != b_id
    assert len(list(tmp_path.glob("*.png"))) == 2


# -- only the formats a photographer sends, judged by their bytes -----------------------------------

def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt, kw", [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {}),
                                     ("TIFF", {"compression": "tiff_lzw"})])
def test_allowed_formats_decode(tmp_path, portrait, fmt, kw):
    path = _write(tmp_path / f"photo.{fmt.lower()}", _encoded(portrait, fmt, **kw))
    decoded = decode_image(path)
    assert decoded.format == fmt
    assert decoded.image.size == portrait.size


def test_mpo_multi_picture_jpeg_decodes(tmp_path, portrait):
    data = _encoded(portrait, "MPO", save_all=True, append_images=[portrait.transpose(Image.FLIP_LEFT_RIGHT)])
    decoded = decode_image(_write(tmp_path / "stereo.jpg", data))
    assert decoded.format == "MPO"
    assert decoded.image.size == portrait.size


@pytest.mark.parametrize("fmt, kind", [("GIF", "GIF"), ("BMP", "BMP"), ("ICO", "ICO"), ("PDF", "PDF"),
                                       ("EPS", "EPS"), ("PSD", "PSD")])
def test_other_formats_are_unsupported_whatever_their_name(tmp_path, fmt, kind):
    if fmt == "PSD":  # Pillow reads PSD but cannot write it: the signature is what counts
        data = b"8BPS\x00\x01" + bytes(20)
    else:
        data = _encoded(Image.new("RGB", (32, 32), (200, 30, 40)), fmt)
    exc = _rejected(_write(tmp_path / "photo.jpg", data))  # the name claims JPEG; the bytes decide
    assert exc.code == "unsupported_format"
    assert str(exc).startswith(f"photo.jpg: {kind} file")
    assert "JPEG, PNG, WEBP, TIFF" in exc.detail


def test_format_comes_from_the_bytes_not_the_name(tmp_path, portrait):
    decoded = decode_image(_write(tmp_path / "really_a_png.jpg", _encoded(portrait, "PNG")))
    assert decoded.format == "PNG"


def test_eps_is_refused_without_running_ghostscript(tmp_path):
    """A fake `gs` first in PATH logs every call: plain Pillow runs it for an EPS, decode_image never does."""
    import subprocess
    import sys

    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "gs_calls.log"
    gs = bindir / "gs"
    gs.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\nexit 1\n")
    gs.chmod(0o755)
    eps = _write(tmp_path / "photo.jpg", _encoded(Image.new("RGB", (16, 16), (1, 2, 3)), "EPS"))
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}

    def run(code: str) -> str:
        proc = subprocess.run([sys.executable, "-c", code, str(eps)], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    out = run("import sys\nfrom flen_resources.imaging import ImageRejected, decode_image\n"
              "try:\n    decode_image(sys.argv[1])\nexcept ImageRejected as exc:\n    print(exc.code)")
    assert out == "unsupported_format"
    assert not calls.exists(), "Ghostscript was started for a refused EPS"
    # The control: the same file through Pillow's open-anything path does reach Ghostscript.
    run("import sys\nfrom PIL import Image\ntry:\n    Image.open(sys.argv[1]).load()\nexcept Exception:\n    pass")
    assert calls.exists()


# -- the pixel limit: JPEGs decode at reduced scale, everything else over it is refused --------------

def test_default_pixel_limit_is_40_mp():
    from flen_resources.imaging import DEFAULT_MAX_PIXELS

    assert DEFAULT_MAX_PIXELS == 40_000_000


def test_big_jpeg_decodes_in_draft_mode_under_the_limit(tmp_path, portrait):
    big = portrait.resize((3000, 2000), Image.BILINEAR)  # 6 MP against a 1 MP limit
    decoded = decode_image(_write(tmp_path / "big.jpg", _jpeg_bytes(big)), max_pixels=1_000_000)
    assert decoded.scale == 4  # 1/2 would still be 1.5 MP
    assert decoded.image.size == (750, 500)
    assert decoded.image.width * decoded.image.height <= 1_000_000
    assert decoded.original_size == (3000, 2000)
    reference = np.asarray(big.resize((750, 500), Image.BOX), dtype=float)
    assert np.abs(np.asarray(decoded.image, dtype=float) - reference).mean() < 8  # the same picture, smaller


def test_big_cmyk_jpeg_with_exif_rotation_decodes_in_draft_mode(tmp_path, portrait):
    exif = Image.Exif()
    exif[0x0112] = 6
    big = portrait.resize((2400, 1600)).convert("CMYK")
    decoded = decode_image(_write(tmp_path / "big.jpg", _jpeg_bytes(big, exif=exif.tobytes())), max_pixels=1_000_000)
    assert (decoded.scale, decoded.original_mode, decoded.exif_transposed) == (2, "CMYK", True)
    assert decoded.image.size == (800, 1200) and decoded.image.mode == "RGB"


def test_jpeg_beyond_what_draft_mode_can_shrink_is_too_large(tmp_path):
    # 1/8 per side is the most libjpeg can skip: 90,000 px / 64 is still over a 1,000 px limit.
    exc = _rejected(_write(tmp_path / "huge.jpg", _jpeg_bytes(Image.new("RGB", (300, 300)))), max_pixels=1_000)
    assert exc.code == "too_large"


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF", "PNG"])
def test_other_formats_over_the_limit_are_too_large(tmp_path, fmt):
    path = _write(tmp_path / f"big.{fmt.lower()}", _encoded(Image.new("RGB", (1100, 1000), (9, 9, 9)), fmt))
    exc = _rejected(path, max_pixels=1_000_000)
    assert exc.code == "too_large"


_PEAK_SCRIPT = """
import re, sys
from flen_resources.imaging import decode_image
def peak_mb():  # VmHWM: this process's peak resident memory (ru_maxrss would include the parent's, via vfork)
    with open("/proc/self/status") as fh:
        return int(re.search(r"VmHWM:\\s+(\\d+) kB", fh.read()).group(1)) // 1024
before = peak_mb()
decoded = decode_image(sys.argv[1], max_pixels=int(sys.argv[2]))
print(decoded.image.width, decoded.image.height, peak_mb() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from Linux's /proc")
def test_big_jpeg_decodes_with_bounded_memory(tmp_path):
    """Peak memory (in a fresh process) of a 48 MP JPEG under a 4 MP limit vs. decoding it whole."""
    import subprocess
    import sys

    big = Image.linear_gradient("L").resize((8000, 6000)).convert("RGB")  # 48 MP: 192 MB once decoded
    path = tmp_path / "big.jpg"
    big.save(path, quality=85)
    del big

    def peak(max_pixels: int) -> tuple[int, int, int]:
        proc = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(path), str(max_pixels)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        width, height, grown_mb = map(int, proc.stdout.split())
        return width, height, grown_mb

    width, height, drafted_mb = peak(4_000_000)
    assert (width, height) == (2000, 1500)  # 1/4 scale: 3 MP
    _, _, whole_mb = peak(60_000_000)  # the control: under a 60 MP limit it decodes whole
    assert whole_mb >= 192, whole_mb  # the measure sees a full decode (48 MP x 4 bytes)...
    assert drafted_mb < 96, drafted_mb  # ...and the drafted one stays near 3 MP x 4 bytes x a few copies


# -- files that are not files -----------------------------------------------------------------------

def test_decode_image_does_not_follow_a_symlink(tmp_path, portrait):
    target = _write(tmp_path / "real.jpg", _jpeg_bytes(portrait))
    os.symlink(target, tmp_path / "link.jpg")
    exc = _rejected(tmp_path / "link.jpg")
    assert exc.code == "symlink"


def test_decode_image_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    exc = _rejected(tmp_path / "pipe.jpg")  # no writer: a blocking open would hang here
    assert exc.code == "not_regular_file"
