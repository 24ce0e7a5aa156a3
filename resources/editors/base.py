"""The editor interface every backend implements (classic now; qwen_edit plugs in the same way)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image


class UnknownEditorError(ValueError):
    """An editor backend name that is not registered."""


@dataclass(frozen=True)
class EditRequest:
    """One recipe entry applied to one parent: what to do, with which parameters and seed."""

    recipe_id: str
    operation: str
    params: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    caption: str = ""
    seed: int = 0


@dataclass
class EditResult:
    """The edited image and everything lineage needs to reproduce it."""

    image: Image.Image
    operation: str
    params: dict[str, Any]
    model: str
    prompt: str | None = None
    seed: int = 0
    adapters: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class EditJob:
    """One edit of a batch: the input images, the request and the first image's face box (top, right, bottom, left)."""

    images: Sequence[Image.Image]
    request: EditRequest
    face_box: tuple[int, int, int, int] | None = None


# Called once per finished edit of a batch (e.g. a tqdm bar's update), so long batches show progress.
Progress = Callable[[], object]


@runtime_checkable
class Editor(Protocol):
    """An editor backend. `face_box` (top, right, bottom, left) of the first image helps local edits."""

    name: str

    def edit(self, images: Sequence[Image.Image], request: EditRequest,
             face_box: tuple[int, int, int, int] | None = None) -> EditResult: ...

    def edit_batch(self, jobs: Sequence[EditJob], progress: Progress | None = None) -> list[EditResult]: ...

    def model_id(self) -> str: ...


EDITORS = ("classic", "qwen_edit")


def get_editor(name: str, **options: Any) -> Editor:
    """The editor backend registered under `name`, built with `options`."""
    if name == "classic":
        from flen_resources.editors.classic import ClassicEditor

        return ClassicEditor(**options)
    if name == "qwen_edit":
        from flen_resources.editors.qwen_edit import QwenEditEditor

        return QwenEditEditor(**options)
    raise UnknownEditorError(f"unknown editor backend {name!r}; available: {', '.join(EDITORS)}")
