"""Text rendering of a lineage trace (`flen lineage`)."""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import groupby


def _params(text: str | None) -> str:
    if not text:
        return ""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    if not value:
        return ""
    return " " + ", ".join(f"{k}={v}" for k, v in value.items())


def render_tree(asset: str, character: str, iteration: str, rows: list[dict]) -> str:
    """One block per member: the member, then each ancestor step down to the source file."""
    by_root: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_root[row["root_id"]].append(row)
    origins = {k: len(list(g)) for k, g in groupby(sorted(r[0]["origin"] or "?" for r in by_root.values()))}
    lines = [f"{asset} {character}|{iteration}: {len(by_root)} images "
             f"({', '.join(f'{n} {o}' for o, n in origins.items())})"]
    for root_id, chain in sorted(by_root.items(), key=lambda kv: (kv[1][0]["origin"] or "", kv[1][0]["member_path"])):
        chain.sort(key=lambda r: r["depth"])
        head = chain[0]
        lines.append(f"● {head['member_path']}  [{head['origin']}]  \"{head['caption']}\"")
        if len(chain) == 1 and head["image_asset"] == "source_images":
            # The source file was already in normal form (a PNG): the member is the file itself.
            lines.append(f"└─ identical to source file {head['original_name']!r} ({head['image_path']})")
        for depth, step in enumerate(chain[1:], start=1):
            indent = "   " * (depth - 1)
            where = step["original_name"] if step["image_asset"] == "source_images" and step["depth"] == len(chain) - 1 else ""
            target = f"source file {where!r} ({step['image_path']})" if where else (step["image_path"] or step["image_id"][:12])
            lines.append(f"{indent}└─ {step['operation']}{_params(step['params'])} [{step['model']}] <- {target}")
    return "\n".join(lines)


CHAIN = ["flux_lora", "training_set", "filtered_images", "enriched_images", "identity_reference", "source_images",
         "lora_eval", "synthetic_batch", "edit_triplets", "qwen_adapter"]


def render_header(runs: list[dict], artifacts: dict[str, str], character: str, iteration: str) -> str:
    """Partition-level lineage: each asset's version, models, and what it read from v(N-1)."""
    by_asset = {r["asset"]: r for r in runs}
    lines = [f"versions of {character}|{iteration} (DVC md5) and their inputs:"]
    for asset in CHAIN:
        if asset not in artifacts:
            continue
        run = by_asset.get(asset, {})
        params = json.loads(run.get("params") or "{}")
        models = json.loads(run.get("models") or "{}")
        extra = []
        if "training_set_md5" in params:
            extra.append(f"trained on training_set {params['training_set_md5'][:12]}")
        for inp in params.get("previous_iteration_inputs", []):
            extra.append(f"reads {inp['asset']} {inp['iteration']} ({inp['dvc_md5'][:12]})")
        if models:
            extra.append("models " + ", ".join(str(v) if not isinstance(v, list) else ", ".join(v)
                                                for v in models.values()))
        lines.append(f"  {asset:19s} {artifacts[asset][:12]}" + (f"  — {'; '.join(extra)}" if extra else ""))
    return "\n".join(lines)
