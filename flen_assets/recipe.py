"""Enrichment recipes: versioned, user-editable TOML lists of edits."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from importlib import resources as pkg_resources
from pathlib import Path
from typing import Any

from flen_resources.editors import EditRequest


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class RecipeEntry:
    id: str
    operation: str
    params: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    caption: str = ""

    def request_for(self, parent_id: str, recipe_version: int) -> EditRequest:
        """The edit request for one parent; its seed is stable for (parent, entry, recipe version)."""
        seed = int(hashlib.sha256(f"{parent_id}:{self.id}:{recipe_version}".encode()).hexdigest()[:8], 16)
        return EditRequest(recipe_id=self.id, operation=self.operation, params=dict(self.params),
                           prompt=self.prompt, caption=self.caption, seed=seed)


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    editor: str
    entries: tuple[RecipeEntry, ...]
    sha256: str  # of the file's bytes, recorded in lineage


def builtin_recipe_path(name: str = "classic") -> Path:
    """Path of a recipe shipped with the package."""
    return Path(str(pkg_resources.files("flen_assets") / "recipes" / f"{name}.toml"))


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Load and validate a recipe file (the built-in classic recipe when `path` is None)."""
    path = Path(path) if path else builtin_recipe_path()
    try:
        raw = path.read_bytes()
        doc = tomllib.loads(raw.decode("utf-8"))
    except FileNotFoundError as exc:
        raise RecipeError(f"recipe file {path} does not exist") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RecipeError(f"recipe file {path} is not valid TOML: {exc}") from exc
    entries = []
    seen: set[str] = set()
    for i, item in enumerate(doc.get("entries", [])):
        if "id" not in item or "operation" not in item:
            raise RecipeError(f"{path}: entry #{i + 1} needs an 'id' and an 'operation'")
        if item["id"] in seen:
            raise RecipeError(f"{path}: entry id {item['id']!r} appears twice")
        seen.add(item["id"])
        entries.append(RecipeEntry(id=str(item["id"]), operation=str(item["operation"]),
                                   params=dict(item.get("params", {})), prompt=item.get("prompt"),
                                   caption=str(item.get("caption", ""))))
    if not entries:
        raise RecipeError(f"{path}: the recipe has no [[entries]]")
    return Recipe(name=str(doc.get("name", path.stem)), version=int(doc.get("version", 1)),
                  editor=str(doc.get("editor", "classic")), entries=tuple(entries),
                  sha256=hashlib.sha256(raw).hexdigest())
