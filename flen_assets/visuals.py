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
LINE_H = 13  # pixels per line of label text (the default font)


@dataclass
class Tile:
    """One cell of a contact sheet."""

    image: Image.Image | None  # None for files that could not be decoded
    label: str
    accepted: bool | None = None  # None: no verdict (neutral border)
    flagged: bool = False  # amber border, whatever `accepted` says


def contact_sheet(tiles: Sequence[Tile], thumb: int = 160, columns: int = 6) -> Image.Image:
    """A grid of thumbnails with green (accepted), red (rejected) or amber (flagged) borders and labels
    (one line, or several separated by newlines: the label area grows to fit them)."""
    columns = max(1, min(columns, len(tiles) or 1))
    rows = max(1, -(-len(tiles) // columns))
    lines = max((t.label.count("\n") + 1 for t in tiles), default=1)
    label_h, pad = max(28, 4 + LINE_H * lines), 6
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
        for n, line in enumerate(tile.label.split("\n")):
            draw.text((x + pad, y + thumb + 2 * pad + 2 + n * LINE_H), fit_text(draw, line, cell_w - 2 * pad), fill=(20, 20, 20))
    return sheet


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, cut with an ellipsis where it would run past `width` pixels."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip(" ,") + "…"


def labelled_grid(cells: Sequence[Sequence[Tile | None]], row_labels: Sequence[str], column_labels: Sequence[str],
                  thumb: int = 112, title: str = "") -> Image.Image:
    """A table of thumbnails: a header per column and per row (newlines make several lines; a column's line left
    empty lets the line before it run on), each cell bordered by its verdict like a contact sheet; None is an
    empty cell ("not generated")."""
    pad, gap = 4, 4
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_w = max([int(draw.textlength(part)) for label in row_labels for part in label.split("\n")] + [40]) + 2 * pad
    head_lines = max([c.count("\n") + 1 for c in column_labels] + [1])
    tile_lines = max([t.label.count("\n") + 1 for row in cells for t in row if t is not None and t.label] + [0])
    title_h = LINE_H + 2 * pad if title else 0
    head_h = head_lines * LINE_H + 2 * pad
    cell_w = thumb + 2 * pad + gap
    cell_h = thumb + 2 * pad + tile_lines * LINE_H + gap
    n_cols = max(1, len(column_labels))
    sheet = Image.new("RGB", (row_w + n_cols * cell_w + gap, title_h + head_h + max(1, len(row_labels)) * cell_h + pad),
                      (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((pad, pad), fit_text(draw, title, sheet.width - 2 * pad), fill=(20, 20, 20))
    heads = [label.split("\n") for label in column_labels]
    for c, lines in enumerate(heads):
        x = row_w + c * cell_w
        for n, line in enumerate(lines):
            # A header line may run on over the next columns whose same line is empty (a prompt over its seeds).
            span = 1
            while c + span < len(heads) and not (heads[c + span][n:n + 1] or [""])[0]:
                span += 1
            draw.text((x + pad, title_h + pad + n * LINE_H), fit_text(draw, line, span * cell_w - 2 * pad),
                      fill=(20, 20, 20))
    for r, label in enumerate(row_labels):
        y = title_h + head_h + r * cell_h
        for n, line in enumerate(label.split("\n")):
            draw.text((pad, y + pad + n * LINE_H), line, fill=(20, 20, 20))
        for c, tile in enumerate(cells[r] if r < len(cells) else []):
            x = row_w + c * cell_w
            box = [x + 1, y + 1, x + thumb + 2 * pad - 2, y + thumb + 2 * pad - 2]
            if tile is None or tile.image is None:
                draw.rectangle(box, outline=(200, 200, 200), width=1)
                text = tile.label if tile is not None and tile.label else "not generated"
                draw.text((x + pad + 4, y + pad + thumb // 2 - LINE_H // 2), fit_text(draw, text, thumb - 8),
                          fill=(130, 130, 130))
                continue
            colour = FLAGGED if tile.flagged else NEUTRAL if tile.accepted is None else (ACCEPT if tile.accepted else REJECT)
            draw.rectangle(box, outline=colour, width=3)
            img = ImageOps.contain(tile.image.convert("RGB"), (thumb, thumb))
            sheet.paste(img, (x + pad + (thumb - img.width) // 2, y + pad + (thumb - img.height) // 2))
            for n, line in enumerate(tile.label.split("\n") if tile.label else []):
                draw.text((x + pad, y + thumb + 2 * pad + n * LINE_H), fit_text(draw, line, cell_w - 2 * pad),
                          fill=(20, 20, 20))
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
