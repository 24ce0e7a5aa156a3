"""Enrichment recipes: versioned, user-editable TOML lists of edits."""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources as pkg_resources
from pathlib import Path
from typing import Any

from flen_resources.editors import EditRequest
from flen_resources.models.registry import DEFAULT_EDIT_MODEL, LORAS, QWEN_EDIT_MODELS, lora_mismatch


class RecipeError(ValueError):
    """A recipe file that cannot be used; the message names the file and the entry."""


# Entry fields that are editor settings: they travel to the editor in the request's params.
EDITOR_FIELDS = ("steps", "true_cfg", "negative_prompt", "loras", "output_area")
# With a camera preset and no explicit stack, per editor model: 2509 takes the Multiple-angles LoRA,
# which its author runs with Lightning; 2511 turns the camera by itself (its model card) and takes Lightning.
PRESET_LORAS = {"qwen-image-edit-2509": {"angles": 1.0, "lightning-8step": 1.0},
                "qwen-image-edit-2511": {"lightning-8step-2511": 1.0}}
# The recipe's setting that chooses the Qwen-Image-Edit release of all its qwen_edit entries.
EDIT_MODEL_SETTING = "edit_model"


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


def _entry(path: Path, index: int, item: dict[str, Any], recipe_editor: str, edit_model: str) -> RecipeEntry:
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
        params.setdefault("loras", dict(PRESET_LORAS[edit_model]))
    operation = item.get("operation") or ("qwen_edit" if editor == "qwen_edit" else None)
    if not operation:
        raise RecipeError(f"{path}: entry {item['id']!r} needs an 'operation'")
    if editor == "qwen_edit" and not prompt:
        raise RecipeError(f"{path}: entry {item['id']!r}: a qwen_edit entry needs a 'prompt' or a 'preset'")
    for name in dict(params.get("loras") or {}):
        why = lora_mismatch(str(name), edit_model)
        if why:  # said at load, before any edit: the releases share an architecture, so loading would not tell
            raise RecipeError(f"{path}: entry {item['id']!r}: {why}, or set {EDIT_MODEL_SETTING} = "
                              f"\"{LORAS[str(name)].model}\" at the top of the recipe")
    return RecipeEntry(id=str(item["id"]), operation=str(operation), params=params, prompt=prompt,
                       caption=str(item.get("caption", "")), editor=item.get("editor"))


@dataclass(frozen=True)
class PruneRule:
    """The opt-in `[prune]` table: entries whose edits of this character passed the identity gate less often
    than `min_pass_rate` in earlier iterations (over at least `min_edits`) are dropped, or down-weighted:
    their LoRA weights times `factor` (an entry without LoRAs is dropped)."""

    min_pass_rate: float
    action: str = "drop"  # drop | down-weight
    factor: float = 0.5
    min_edits: int = 4

    def apply(self, entries: tuple[RecipeEntry, ...], records: dict[str, tuple[float, int]]
              ) -> tuple[tuple[RecipeEntry, ...], list[dict[str, Any]]]:
        """(the entries to run, what was done and why); `records`: entry id -> (pass rate, gated edits)."""
        kept: list[RecipeEntry] = []
        changes: list[dict[str, Any]] = []
        for entry in entries:
            rate, edits = records.get(entry.id, (1.0, 0))
            if edits < self.min_edits or rate >= self.min_pass_rate:
                kept.append(entry)
                continue
            loras = entry.params.get("loras") or {}
            why = {"entry": entry.id, "pass_rate": round(rate, 3), "edits": edits, "min_pass_rate": self.min_pass_rate}
            if self.action == "down-weight" and loras:
                weighted = {name: round(w * self.factor, 4) for name, w in loras.items()}
                kept.append(replace(entry, params={**entry.params, "loras": weighted}))
                changes.append({**why, "action": "down-weighted", "loras": weighted})
            else:
                changes.append({**why, "action": "dropped"})
        return tuple(kept), changes


@dataclass(frozen=True)
class Recipe:
    name: str
    version: int
    editor: str
    entries: tuple[RecipeEntry, ...]
    sha256: str  # of the file's bytes, recorded in lineage
    prune: PruneRule | None = None  # opt-in: see PruneRule
    edit_model: str = DEFAULT_EDIT_MODEL  # the Qwen-Image-Edit release of its qwen_edit entries (EDIT_MODEL_SETTING)


def _prune_rule(path: Path, table: Any) -> PruneRule | None:
    """The `[prune]` table, checked; None when the recipe has none."""
    if table is None:
        return None
    if not isinstance(table, dict) or not isinstance(table.get("min_pass_rate"), (int, float)) \
            or not 0 <= table["min_pass_rate"] <= 1:
        raise RecipeError(f"{path}: [prune] needs min_pass_rate = a number from 0 to 1, e.g. min_pass_rate = 0.3")
    action = table.get("action", "drop")
    if action not in ("drop", "down-weight"):
        raise RecipeError(f"{path}: [prune] action {action!r} is not one of drop, down-weight")
    factor, min_edits = table.get("factor", 0.5), table.get("min_edits", 4)
    if not isinstance(factor, (int, float)) or not 0 < factor < 1:
        raise RecipeError(f"{path}: [prune] factor {factor!r} must be a number between 0 and 1, e.g. 0.5")
    if not isinstance(min_edits, int) or min_edits < 1:
        raise RecipeError(f"{path}: [prune] min_edits {min_edits!r} must be a whole number of at least 1")
    return PruneRule(float(table["min_pass_rate"]), action, float(factor), min_edits)


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
    edit_model = doc.get(EDIT_MODEL_SETTING, DEFAULT_EDIT_MODEL)
    if edit_model not in QWEN_EDIT_MODELS:
        raise RecipeError(f"{path}: {EDIT_MODEL_SETTING} = {edit_model!r} is not an editor model; use one of "
                          + ", ".join(f'"{m}"' for m in QWEN_EDIT_MODELS))
    for i, item in enumerate(doc.get("entries", [])):
        entry = _entry(path, i + 1, item, recipe_editor, edit_model)
        if entry.id in seen:
            raise RecipeError(f"{path}: entry id {entry.id!r} appears twice")
        seen.add(entry.id)
        entries.append(entry)
    if not entries:
        raise RecipeError(f"{path}: the recipe has no [[entries]]")
    return Recipe(name=str(doc.get("name", path.stem)), version=int(doc.get("version", 1)),
                  editor=recipe_editor, entries=tuple(entries),
                  sha256=hashlib.sha256(raw).hexdigest(), prune=_prune_rule(path, doc.get("prune")),
                  edit_model=edit_model)
