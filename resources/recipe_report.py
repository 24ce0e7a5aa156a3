"""Which edits keep the character: per recipe entry, how often its edits pass the identity gate, how
often a person accepts them, and their mean identity distance; per character and across all.

Read from the published partitions: filtered_images' manifest holds each edit's identity distance,
threshold and review outcome, enriched_images' manifest holds its recipe entry, prompt and LoRA stack.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from flen_resources.project import ITERATION_RE, MANIFEST, Project, iteration_number

# One row per gated edit of the published filtered_images partitions, with its recipe entry.
EDITS_SQL = """
WITH filtered AS (
  SELECT * FROM read_parquet($filtered, filename = true, union_by_name = true)
), enriched AS (
  SELECT image_id, recipe, recipe_id, operation, prompt, adapters
  FROM read_parquet($enriched, union_by_name = true)
  QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY recipe_id) = 1
)
SELECT split_part(f.filename, '/', -3) AS character, f.recipe_id, e.recipe, coalesce(e.prompt, e.operation) AS what,
       coalesce(e.adapters, '[]') AS adapters, f.identity_distance AS distance,
       f.identity_distance IS NOT NULL AND f.identity_distance <= f.identity_threshold AS identity_passed,
       f.review_source = 'human' AS human, f.accepted
FROM filtered f LEFT JOIN enriched e USING (image_id)
WHERE f.recipe_id IS NOT NULL AND f.recipe_id <> ''
ORDER BY character, f.recipe_id
"""


@dataclass(frozen=True)
class EntryStats:
    """One recipe entry's record: for one character, or across all (character None)."""

    character: str | None
    recipe_id: str
    recipe: str
    what: str  # the prompt, or the classic operation
    loras: str  # the LoRA stack and weights: `angles 1 + lightning-8step 1`, or none
    edits: int
    identity_pass_rate: float
    human_reviewed: int
    human_acceptance_rate: float | None  # None: no person reviewed its edits
    mean_distance: float | None  # None: no face in any of its edits


def recipe_report(project: Project, characters: Sequence[str] = (), across: bool = False) -> list[EntryStats]:
    """Every recipe entry's stats per character (or, `across`, over all the characters), from the published partitions."""
    return entry_stats(_manifests(project, "filtered_images", characters),
                       _manifests(project, "enriched_images", characters), across)


def entry_stats(filtered: Sequence[Path], enriched: Sequence[Path], across: bool = False) -> list[EntryStats]:
    """Every recipe entry's stats over these filtered_images and enriched_images manifests (their folders:
    data/<asset>/<character>/<vN>/, or a staging folder of the same shape)."""
    if not filtered or not enriched:
        return []
    with duckdb.connect() as con:
        cursor = con.execute(EDITS_SQL, {"filtered": [str(p) for p in filtered], "enriched": [str(p) for p in enriched]})
        names = [d[0] for d in cursor.description]
        edits = [dict(zip(names, row)) for row in cursor.fetchall()]
    groups: dict[tuple, list[dict]] = {}
    for edit in edits:
        key = (None if across else edit["character"], edit["recipe_id"], lora_stack(edit["adapters"]))
        groups.setdefault(key, []).append(edit)
    return [_stats(key, rows) for key, rows in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0])))]


def entry_pass_rates(project: Project, character: str, before: int) -> dict[str, tuple[float, int]]:
    """Each recipe entry's identity pass rate for `character` over its published gated edits of the iterations
    before v`before`, and their count (a rerun of vN reads what the first run read)."""
    stats = entry_stats(_manifests(project, "filtered_images", [character], before),
                        _manifests(project, "enriched_images", [character], before), across=True)
    records: dict[str, tuple[float, int]] = {}
    for s in stats:  # one row per LoRA stack: weigh them into one rate per entry
        rate, edits = records.get(s.recipe_id, (0.0, 0))
        total = edits + s.edits
        records[s.recipe_id] = ((rate * edits + s.identity_pass_rate * s.edits) / total, total)
    return records


def lora_stack(adapters_json: str) -> str:
    """The LoRA stack of an edit as `name weight + ...` (versions left out: they change every iteration)."""
    stack = json.loads(adapters_json or "[]")
    return " + ".join(f"{a.get('name', '?')} {a.get('weight', 1.0):g}" for a in stack) or "none"


def _stats(key: tuple, rows: list[dict]) -> EntryStats:
    character, recipe_id, stack = key
    human = [r for r in rows if r["human"]]
    distances = [r["distance"] for r in rows if r["distance"] is not None]
    return EntryStats(character=character, recipe_id=recipe_id, recipe=rows[0]["recipe"] or "",
                      what=rows[0]["what"] or "", loras=stack, edits=len(rows),
                      identity_pass_rate=sum(bool(r["identity_passed"]) for r in rows) / len(rows),
                      human_reviewed=len(human),
                      human_acceptance_rate=sum(bool(r["accepted"]) for r in human) / len(human) if human else None,
                      mean_distance=sum(distances) / len(distances) if distances else None)


def _manifests(project: Project, asset: str, characters: Sequence[str], before: int | None = None) -> list[Path]:
    """The manifests of `asset`'s published partitions (of `characters`, or of all; of iterations before v`before`)."""
    root = project.data_dir / asset
    folders = [root / c for c in characters] if characters else sorted(p for p in root.glob("*") if p.is_dir())
    found = [m for f in folders for m in sorted(f.glob(f"v*/{MANIFEST}")) if ITERATION_RE.match(m.parent.name)]
    return [m for m in found if before is None or iteration_number(m.parent.name) < before]


def report_markdown(stats: Sequence[EntryStats]) -> str:
    """The report as a Markdown table (asset metadata, `flen recipes report --markdown`)."""
    if not stats:
        return "no gated edits yet"
    who = stats[0].character is not None
    lines = [("| character " if who else "") + "| entry | edit | LoRAs | edits | identity pass | human accepted | "
             "mean distance |", ("|---" if who else "") + "|---|---|---|---:|---:|---:|---:|"]
    for s in stats:
        lines.append((f"| {s.character} " if who else "") + f"| {s.recipe_id} | {_short(s.what)} | {s.loras} | {s.edits} | "
                     f"{s.identity_pass_rate:.0%} | {_human(s)} | {_distance(s)} |")
    return "\n".join(lines)


def _short(text: str, width: int = 48) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def _human(s: EntryStats) -> str:
    return "n/a (none reviewed)" if s.human_acceptance_rate is None else f"{s.human_acceptance_rate:.0%} of {s.human_reviewed}"


def _distance(s: EntryStats) -> str:
    return "n/a (no face)" if s.mean_distance is None else f"{s.mean_distance:.3f}"
