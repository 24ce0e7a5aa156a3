"""The embedded sample character, built from photos that installed packages ship.

scikit-image's `astronaut` (Eileen Collins, public domain NASA photo) gives the character in
several framings and encodings; matplotlib's `grace_hopper.jpg` is another person (an identity
outlier); `camera` shows no detectable face; a truncated JPEG, a text file named .png and an exact
duplicate show bad-input handling. Nothing is downloaded.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import matplotlib.cbook
import numpy as np
import skimage.data
from PIL import Image

SAMPLE_CHARACTER = "astronaut"


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sample_files() -> dict[str, bytes]:
    """File name -> bytes of the sample inbox."""
    astro = Image.fromarray(skimage.data.astronaut())
    portrait = astro.crop((40, 0, 400, 320))
    closeup = astro.crop((120, 40, 320, 210)).resize((400, 340), Image.LANCZOS)
    side = astro.crop((0, 10, 340, 300))
    wide = astro.crop((60, 0, 420, 330))
    # Stored rotated a quarter turn, with EXIF orientation 6 saying how to display it upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = astro.crop((80, 20, 380, 290)).rotate(90, expand=True)
    grey16 = np.asarray(astro.crop((20, 0, 380, 310)).convert("L"), dtype=np.uint16) * 257
    cam = Image.fromarray(skimage.data.camera())
    grace = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    portrait_bytes = _jpeg(portrait)
    return {
        "portrait.jpg": portrait_bytes,
        "closeup.png": _png(closeup),
        "side_light.jpg": _jpeg(side.point(lambda v: min(255, int(v * 1.1)))),
        "rotated_exif.jpg": _jpeg(rotated, exif=exif.tobytes()),
        "print_cmyk.jpg": _jpeg(wide.convert("CMYK")),
        "scan_16bit.png": _png(Image.fromarray(grey16)),
        "poster_palette.png": _png(portrait.quantize(colors=200)),
        "portrait_copy.jpg": portrait_bytes,  # exact duplicate
        "group_photo.png": _png(astro),  # the full frame: dlib finds two faces
        "grace_hopper.jpg": _jpeg(grace),  # another person
        "cameraman.png": _png(cam),  # no detectable face
        "broken.jpg": portrait_bytes[: len(portrait_bytes) // 3],  # truncated download
        "notes.png": b"this is a text file with an image extension\n",
    }


def write_sample_inbox(dest: Path) -> list[Path]:
    """Write the sample photos into `dest` (replacing it); returns the files."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    paths = []
    for name, data in sample_files().items():
        (dest / name).write_bytes(data)
        paths.append(dest / name)
    return paths
