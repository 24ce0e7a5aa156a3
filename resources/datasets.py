"""A folder of captioned images as training items: what `flen train` reads.

Two layouts: a training_set partition folder (images/<id>.png + images/<id>.txt) or a flat folder
of images with same-name .txt captions. An image without a caption gets None (the trainer's
default caption). The md5 covers names, bytes and captions, so a changed dataset never resumes
another one's run.
"""

from __future__ import annotations

import hashlib
import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flen_resources.trainers.flux_lora import TrainItem

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def dataset_images(folder: Path) -> list[Path]:
    """The image files of a dataset folder (its images/ subfolder when it has one), sorted by name; hidden ones skipped."""
    images_dir = folder / "images" if (folder / "images").is_dir() else folder
    return sorted(p for p in images_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def dataset_items(folder: Path) -> tuple[list[TrainItem], str]:
    """The images of `folder` with their captions (stripped; None when absent or empty), and an md5 of them all."""
    from flen_resources.trainers.flux_lora import TrainItem  # torch: only when a dataset is read

    digest = hashlib.md5()
    items = []
    for image in dataset_images(folder):
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text().strip() if caption_file.is_file() else None
        digest.update(image.name.encode() + b"\0" + image.read_bytes() + b"\0" + (caption or "").encode() + b"\0")
        items.append(TrainItem(image, caption or None))
    return items, digest.hexdigest()


class PromptError(ValueError):
    """A prompt template a generating asset cannot use; the message names the setting and the fix."""


def prompts_with_trigger(templates: list[str], trigger: str, setting: str) -> list[str]:
    """Each template with `{trigger}` filled in; PromptError naming `setting` for none, a blank or a bad field."""
    if not templates:
        raise PromptError(f"{setting} is empty: give at least one prompt, e.g. \"photo of {{trigger}}, portrait\"")
    prompts = []
    for i, template in enumerate(templates):
        where = f"{setting}[{i}] {template!r}"
        try:  # only a bare {trigger}: str.format would also run {trigger.upper}, {trigger!r} or {trigger:>9999}
            fields = [field for _, *field in string.Formatter().parse(template) if field[0] is not None]
        except ValueError as exc:  # a lone brace
            raise PromptError(f"{where}: {exc}; write a literal brace as {{{{ or }}}}") from exc
        bad = next(("{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
                    for name, spec, conversion in fields if (name, spec, conversion) != ("trigger", "", None)), None)
        if bad is not None:
            raise PromptError(f"{where}: only {{trigger}} can be filled in, not {bad}; write a literal brace as "
                              "{{ or }}")
        prompt = template.format(trigger=trigger)
        if not prompt.strip():
            raise PromptError(f"{setting}[{i}] is blank: give the prompt text, e.g. \"photo of {{trigger}}\"")
        prompts.append(prompt)
    return prompts


def trigger_word(training_set_rows: list[dict], character: str) -> str:
    """The trigger word of a training set: its captions read 'photo of <trigger>[, what changed]'."""
    caption = training_set_rows[0]["caption"] if training_set_rows else ""
    return caption.removeprefix("photo of ").split(",")[0] or f"{character}_flen"

