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


# Entry fields that are editor settings: they travel to the editor in the request's params.
EDITOR_FIELDS = ("steps", "true_cfg", "negative_prompt", "loras", "output_area")
# With a camera preset and no explicit stack: the Multiple-angles LoRA, which its author runs with Lightning.
PRESET_LORAS = {"angles": 1.0, "lightning-8step": 1.0}


@dataclass(frozen=True)
class RecipeEntry:
    id: str
    operation: str
    params: dict[str, Any] = field(default_factory=dict)
    prompt: str | None = None
    caption: str = ""
    editor: str | None = None  # None: the recipe's editor

    def request_for(self, parent_id: str, recipe_version: int) -> EditRequest:
        """The edit request for one parent; its seed is stable for (parent, entry, recipe version)."""
        seed = int(hashlib.sha256(f"{parent_id}:{self.id}:{recipe_version}".encode()).hexdigest()[:8], 16)
        return EditRequest(recipe_id=self.id, operation=self.operation, params=dict(self.params),
                           prompt=self.prompt, caption=self.caption, seed=seed)


def _entry(path: Path, index: int, item: dict[str, Any], recipe_editor: str) -> RecipeEntry:
    """One [[entries]] table -> RecipeEntry, expanding camera presets and editor fields."""
    from flen_resources.models.registry import ANGLE_PRESETS

    if "id" not in item:
        raise RecipeError(f"{path}: entry #{index} needs an 'id'")
    editor = item.get("editor") or recipe_editor
    params = dict(item.get("params", {}))
    params.update({k: item[k] for k in EDITOR_FIELDS if k in item})
    prompt = item.get("prompt")
    if "preset" in item:
        if item["preset"] not in ANGLE_PRESETS:
            raise RecipeError(f"{path}: entry {item['id']!r}: unknown camera preset {item['preset']!r}; "
                              f"known: {', '.join(ANGLE_PRESETS)}")
        prompt = ANGLE_PRESETS[item["preset"]] + (f" {prompt}" if prompt else "")
        params.setdefault("loras", dict(PRESET_LORAS))
    operation = item.get("operation") or ("qwen_edit" if editor == "qwen_edit" else None)
    if not operation:
        raise RecipeError(f"{path}: entry {item['id']!r} needs an 'operation'")
    if editor == "qwen_edit" and not prompt:
        raise RecipeError(f"{path}: entry {item['id']!r}: a qwen_edit entry needs a 'prompt' or a 'preset'")
    return RecipeEntry(id=str(item["id"]), operation=str(operation), params=params, prompt=prompt,
                       caption=str(item.get("caption", "")), editor=item.get("editor"))


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


def builtin_recipes() -> list[str]:
    """Names of the recipes shipped with the package."""
    return sorted(p.name.removesuffix(".toml") for p in builtin_recipe_path().parent.iterdir() if p.name.endswith(".toml"))


def load_recipe(path: str | Path | None = None) -> Recipe:
    """Load and validate a recipe: a file path, a built-in name (classic, angles, demo), or None (classic)."""
    if path and str(path) in builtin_recipes():
        path = builtin_recipe_path(str(path))
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
    recipe_editor = str(doc.get("editor", "classic"))
    for i, item in enumerate(doc.get("entries", [])):
        entry = _entry(path, i + 1, item, recipe_editor)
        if entry.id in seen:
            raise RecipeError(f"{path}: entry id {entry.id!r} appears twice")
        seen.add(entry.id)
        entries.append(entry)
    if not entries:
        raise RecipeError(f"{path}: the recipe has no [[entries]]")
    return Recipe(name=str(doc.get("name", path.stem)), version=int(doc.get("version", 1)),
                  editor=recipe_editor, entries=tuple(entries),
                  sha256=hashlib.sha256(raw).hexdigest())
