"""Pictures for the Dagster UI: contact sheets and inline thumbnails."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

ACCEPT = (46, 160, 67)
REJECT = (207, 34, 46)
NEUTRAL = (110, 110, 110)
FLAGGED = (230, 140, 0)  # amber: kept out until a person decides (an identity outlier among the sources)


@dataclass
class Tile:
    """One cell of a contact sheet."""

    image: Image.Image | None  # None for files that could not be decoded
    label: str
    accepted: bool | None = None  # None: no verdict (neutral border)
    flagged: bool = False  # amber border, whatever `accepted` says


def contact_sheet(tiles: Sequence[Tile], thumb: int = 160, columns: int = 6) -> Image.Image:
    """A grid of thumbnails with green (accepted), red (rejected) or amber (flagged) borders and labels."""
    columns = max(1, min(columns, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // columns))
    label_h, pad = 28, 6
    cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + label_h
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    for i, tile in enumerate(tiles):
        x, y = (i % columns) * cell_w, (i // columns) * cell_h
        colour = FLAGGED if tile.flagged else NEUTRAL if tile.accepted is None else (ACCEPT if tile.accepted else REJECT)
        draw.rectangle([x + 2, y + 2, x + cell_w - 3, y + thumb + 2 * pad - 3], outline=colour, width=4)
        if tile.image is not None:
            img = ImageOps.contain(tile.image.convert("RGB"), (thumb, thumb))
            sheet.paste(img, (x + pad + (thumb - img.width) // 2, y + pad + (thumb - img.height) // 2))
        else:
            draw.line([x + pad, y + pad, x + pad + thumb, y + pad + thumb], fill=REJECT, width=3)
            draw.line([x + pad + thumb, y + pad, x + pad, y + pad + thumb], fill=REJECT, width=3)
        text = tile.label if len(tile.label) <= 26 else tile.label[:25] + "…"
        draw.text((x + pad, y + thumb + 2 * pad + 2), text, fill=(20, 20, 20))
    return sheet


def markdown_thumbnail(img: Image.Image, width: int = 640, alt: str = "contact sheet") -> str:
    """Inline JPEG as a Markdown image (Dagster renders it in the asset's metadata)."""
    small = img.copy()
    if small.width > width:
        small = small.resize((width, max(1, round(small.height * width / small.width))), Image.LANCZOS)
    buf = io.BytesIO()
    small.convert("RGB").save(buf, format="JPEG", quality=80)
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()})"


def save_sheet(img: Image.Image, path: Path) -> Path:
    """Write a contact sheet PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
