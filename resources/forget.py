"""Right to erasure: find everything derived from one photo through lineage, and remove it for good.

A photo's derived content is its normalized copy, its edits, the training sets, triplets and model
partitions (FLUX LoRA, Qwen-Edit adapter, evaluation, synthetic batch) they reached, the images
generated with those models, and so on down the flywheel. `plan_forget` finds it (a dry run);
`execute_forget` removes it from the working tree, the DVC cache, a local DVC remote and the lineage
Parquet files, and records the erasure in lineage by hash only. The plan is written under
.flen/forget/ before the first step and every step is idempotent, so a killed run is finished by
running it again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from flen_resources.atomic import write_text_atomic
from flen_resources.lineage import LineageStore, utcnow
from flen_resources.project import Project

_SHA256 = re.compile(r"[0-9a-f]{64}")
# Assets whose files are all derived from their training data: a model, and what it generated.
MODEL_ASSETS = {"training_set": ("flux_lora",), "edit_triplets": ("qwen_adapter",),
                "flux_lora": ("lora_eval", "synthetic_batch")}
# Where an identity reference folds its sources' embeddings into one mean.
_FOLDS_SOURCES = {"source_images": ("identity_reference",)}
_SKIP_WALK = {".git", ".dvc", ".venv", "node_modules", "__pycache__"}

Partition = tuple[str, str, str]  # (asset, character, iteration)


class ForgetError(ValueError):
    """A photo or hash that cannot be forgotten here; the message names the cause and the fix."""


@dataclass
class ForgetPlan:
    """Everything derived from one photo, and where it lies; JSON under .flen/forget/ while it runs."""

    target: str  # the photo's sha256
    images: dict[str, list[str]] = field(default_factory=dict)  # "asset character|iteration" -> derived image ids
    partitions: list[list[str]] = field(default_factory=list)  # [asset, character, iteration] to remove
    versions: list[list[str]] = field(default_factory=list)  # [asset, character, iteration, dvc_md5] erased
    objects: list[str] = field(default_factory=list)  # DVC md5s (files and .dir) to remove from cache and remote
    inbox_files: list[str] = field(default_factory=list)  # inbox copies of the photo, relative to the project
    run_folders: list[str] = field(default_factory=list)  # trainers' checkpoints (.flen/runs/...)
    other_files: list[str] = field(default_factory=list)  # copies elsewhere in the project (exports)
    derived_ids: list[str] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def partition_keys(self) -> list[Partition]:
        return [(a, c, i) for a, c, i in self.partitions]


def photo_id(arg: str) -> str:
    """The sha256 a `flen forget` argument names: a 64-hex hash, or the bytes of a photo file."""
    text = arg.strip()
    if _SHA256.fullmatch(text.lower()):
        return text.lower()
    path = Path(text).expanduser()
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    if re.fullmatch(r"[0-9a-fA-F]+", text):
        raise ForgetError(f"{arg!r} is not a sha256: a hash has 64 hex characters (this has {len(text)}); "
                          "give the photo's file or its full sha256")
    if path.exists():
        raise ForgetError(f"{arg} is not a file: give a photo file or its sha256")
    raise ForgetError(f"{arg} does not exist: give the path of a photo file or its 64-hex sha256")


def plan_dir(project: Project) -> Path:
    return project.state_dir / "forget"


def pending_plan(project: Project, target: str) -> ForgetPlan | None:
    """The plan of an erasure of `target` that started and did not finish (None when there is none)."""
    path = plan_dir(project) / f"{target}.json"
    return ForgetPlan(**json.loads(path.read_text())) if path.is_file() else None


def erased_ids(store: LineageStore) -> frozenset[str]:
    """Every content id erased with `flen forget`: source_images refuses to ingest them again."""
    return frozenset(r["erased_id"] for r in store.rows("SELECT DISTINCT erased_id FROM erasures"))


def erasure_of(store: LineageStore, target: str) -> str | None:
    """When `target` was forgotten (as text), or None."""
    rows = store.rows("SELECT max(erased_at) AS at FROM erasures WHERE erased_id = $t AND kind = 'photo'", {"t": target})
    return None if not rows or rows[0]["at"] is None else f"{rows[0]['at']:%Y-%m-%d %H:%M:%S} UTC"


# -- finding what is derived ---------------------------------------------------------------------------

def _dvc_object(root: Path, md5: str) -> Path:
    """Where DVC 3 keeps an object under a cache or remote folder."""
    return root / "files" / "md5" / md5[:2] / md5[2:]


def _dir_listing(roots: Iterable[Path], md5: str) -> list[dict] | None:
    """The (relpath, md5) entries of a .dir object, from the first of `roots` that has it."""
    for root in roots:
        obj = _dvc_object(root, md5)
        if obj.is_file():
            return json.loads(obj.read_text())
    return None


def _stem(relpath: str) -> str:
    return Path(relpath).name.split(".")[0]


def plan_forget(project: Project, store: LineageStore, target: str, remote: Path | None) -> ForgetPlan:
    """Everything derived from the photo `target` (a sha256): images, partitions, versions, DVC objects, copies."""
    if not store.rows("SELECT 1 FROM images WHERE image_id = $t UNION ALL SELECT 1 FROM edges WHERE parent_id = $t "
                      "OR child_id = $t UNION ALL SELECT 1 FROM members WHERE image_id = $t LIMIT 1", {"t": target}):
        raise ForgetError(f"{target} is not a photo this project knows: no image, edge or training-set member of "
                          f"{project.root} has that sha256 (`flen sql \"SELECT image_id, original_name FROM images\"` "
                          "lists them)")
    roots = [project.root / ".dvc" / "cache", *([remote] if remote else [])]
    with store.connect() as con:
        edges = con.sql("SELECT DISTINCT child_id, parent_id, asset, character, iteration, params FROM edges").fetchall()
        touches = con.sql(
            "SELECT image_id, asset, character, iteration FROM images UNION SELECT image_id, asset, character, iteration "
            "FROM members UNION SELECT image_id, asset, character, iteration FROM decisions UNION "
            "SELECT child_id, asset, character, iteration FROM edges").fetchall()
        artifacts = con.sql("SELECT DISTINCT asset, character, iteration, dvc_md5 FROM artifacts").fetchall()
    listings = {md5: _dir_listing(roots, md5) or [] for *_, md5 in artifacts}
    versions_of: dict[Partition, set[str]] = {}
    for asset, character, iteration, md5 in artifacts:
        versions_of.setdefault((asset, character, iteration), set()).add(md5)

    derived: dict[str, Partition | None] = {target: None}
    parts: set[Partition] = set()
    derived_md5: set[str] = set()
    while True:
        before = (len(derived), len(parts), len(derived_md5))
        for child, parent, asset, character, iteration, params in edges:  # edits, normalized copies, generations
            model_parent = any(parent == f"{a}:{m}" or (params and m in params)
                               for a, c, i in parts if a in ("flux_lora", "qwen_adapter")
                               for m in versions_of.get((a, c, i), ()))
            if (parent in derived or model_parent) and child not in derived:
                derived[child] = (asset, character, iteration)
        for image_id, asset, character, iteration in touches:
            if image_id in derived:
                parts.add((asset, character, iteration))
        for asset, character, iteration in list(parts):  # a model trained on derived data, and what it made
            for follower in (*MODEL_ASSETS.get(asset, ()), *_FOLDS_SOURCES.get(asset, ())):
                parts.add((follower, character, iteration))
        for (asset, character, iteration), md5s in versions_of.items():  # copies under other names (carried sources)
            for md5 in md5s:
                listing = listings[md5]
                if (asset, character, iteration) in parts or any(
                        _stem(e["relpath"]) in derived or e["md5"] in derived_md5 for e in listing):
                    parts.add((asset, character, iteration))
                    derived_md5 |= {e["md5"] for e in listing if _owned(e["relpath"], derived)}
        if (len(derived), len(parts), len(derived_md5)) == before:
            break

    plan = ForgetPlan(target=target)
    held: dict[Partition, set[str]] = {p: set() for p in parts}  # the derived images each partition holds
    for image_id, asset, character, iteration in touches:
        if image_id in derived:
            held[(asset, character, iteration)].add(image_id)
    for part in parts:
        for md5 in versions_of.get(part, ()):
            held[part] |= {_stem(e["relpath"]) for e in listings[md5]} & derived.keys()
    plan.images = {f"{a} {c}|{i}": sorted(ids) for (a, c, i), ids in sorted(held.items())}
    plan.derived_ids = sorted(derived)
    plan.partitions = [list(p) for p in sorted(parts)]
    plan.versions = sorted([*p, md5] for p in sorted(parts) for md5 in versions_of.get(p, ()))
    erased_versions = {md5 for *_, md5 in plan.versions}
    kept = {e["md5"] for md5, listing in listings.items() if md5 not in erased_versions for e in listing}
    plan.objects = sorted((derived_md5 - kept) | erased_versions)
    plan.inbox_files = _inbox_copies(project, target)
    plan.run_folders = sorted(project.relative(p) for a, c, i in parts if a in ("flux_lora", "qwen_adapter")
                              for p in (project.state_dir / "runs").glob(f"{a}-{c}-{i}-*"))
    plan.other_files = _copies_elsewhere(project, roots, derived_md5 - kept)
    return plan


def _owned(relpath: str, derived: dict[str, Partition | None]) -> bool:
    """Whether a file of an affected version holds derived content: a derived image (or its caption), or a
    file of the partition itself (manifest, contact sheet, weights); another image's file is not."""
    stem = _stem(relpath)
    return stem in derived or not _SHA256.fullmatch(stem)


def _inbox_copies(project: Project, target: str) -> list[str]:
    """Inbox files (of any character) whose bytes are the photo."""
    found = []
    inbox = project.inbox_dir
    for folder in sorted(inbox.iterdir()) if inbox.is_dir() else []:
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in sorted(folder.iterdir()):
            if entry.is_file() and not entry.is_symlink() and hashlib.sha256(entry.read_bytes()).hexdigest() == target:
                found.append(project.relative(entry))
    return found


def _md5(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def _copies_elsewhere(project: Project, roots: list[Path], md5s: set[str]) -> list[str]:
    """Files outside data/ (exports, copies) with the content of a derived DVC object; only files of a
    derived object's size are hashed."""
    sizes = {obj.stat().st_size for md5 in md5s for root in roots if (obj := _dvc_object(root, md5)).is_file()}
    found = []
    for top, dirs, files in os.walk(project.root):
        here = Path(top)
        dirs[:] = [d for d in dirs if d not in _SKIP_WALK and not (here == project.root and d in ("data", "inbox", ".flen"))]
        for name in files:
            path = here / name
            if not path.is_symlink() and path.stat().st_size in sizes and _md5(path) in md5s:
                found.append(project.relative(path))
    return sorted(found)


# -- removing it ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ForgetDone:
    """What an erasure removed."""

    partitions: int
    objects: int
    lineage_rows: int
    remote_note: str | None


def write_plan(project: Project, plan: ForgetPlan) -> Path:
    """Write the plan before the first step: a killed erasure is finished by running it again."""
    path = plan_dir(project) / f"{plan.target}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(asdict(plan), indent=1))
    return path


def execute_forget(project: Project, store: LineageStore, plan: ForgetPlan, remote: Path | None,
                   has_remote: bool, dvc_lock, wipe: Callable[[list[Partition]], bool]) -> ForgetDone:
    """Remove what `plan` lists, step by idempotent step; `wipe` forgets the partitions' materializations."""
    if store.bucket is not None:
        raise ForgetError("flen forget does not run in the cluster deployment yet: its lineage bucket keeps every "
                          "event object as written; run it on a local project")
    path = write_plan(project, plan)
    with dvc_lock:  # no publish swaps a folder in while its blobs go
        for rel in plan.inbox_files:
            (project.root / rel).unlink(missing_ok=True)
        for asset, character, iteration in plan.partition_keys():
            folder = project.partition_dir(asset, character, iteration)
            shutil.rmtree(folder, ignore_errors=True)
            folder.with_name(folder.name + ".dvc").unlink(missing_ok=True)
        for rel in [*plan.run_folders, *plan.other_files]:
            target = project.root / rel
            shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        removed = 0
        for root in [project.root / ".dvc" / "cache", *([remote] if remote else [])]:
            for md5 in plan.objects:
                obj = _dvc_object(root, md5)
                if obj.is_file():
                    obj.unlink()
                    removed += 1
    note = None
    if has_remote and remote is None:
        note = (f"the default DVC remote is not a local folder: {len(plan.objects)} object(s) were not removed from "
                "it (files/md5/<2>/<30> of each md5 in the plan); remove them with your storage's tools")
    _record(store, plan)
    dropped = _erase_rows(store, plan)
    if not wipe(plan.partition_keys()):
        note = " ".join(filter(None, [note, "the Dagster instance cannot wipe partitions (SQLite storage): the UI "
                                            "still lists their last materializations, each with an 'erased' observation"]))
    path.unlink(missing_ok=True)
    return ForgetDone(partitions=len(plan.partitions), objects=removed, lineage_rows=dropped, remote_note=note)


def _record(store: LineageStore, plan: ForgetPlan) -> None:
    """The erasure in lineage, by hash only: the photo, each derived image, each erased partition version."""
    done = {(r["erased_id"], r["kind"]) for r in store.rows("SELECT erased_id, kind FROM erasures")}
    now = utcnow()
    where = {i: key for key, ids in reversed(plan.images.items()) for i in ids}
    rows = []
    for image_id in plan.derived_ids:
        asset, _, part = where.get(image_id, "source_images ?|?").partition(" ")
        character, _, iteration = part.partition("|")
        kind = "photo" if image_id == plan.target else "image"
        rows.append(dict(erased_id=image_id, kind=kind, asset=asset, character=character, iteration=iteration))
    rows += [dict(erased_id=md5, kind="version", asset=a, character=c, iteration=i) for a, c, i, md5 in plan.versions]
    rows = [{**r, "run_id": plan.run_id, "erased_at": now} for r in rows if (r["erased_id"], r["kind"]) not in done]
    # The photo's row goes last: it says the erasure is complete.
    rows.sort(key=lambda r: r["kind"] == "photo")
    store.append("erasures", rows)


def _erase_rows(store: LineageStore, plan: ForgetPlan) -> int:
    """Rewrite the lineage files that hold a derived image (its path, embedding) or an erased version."""
    ids = pa.array(plan.derived_ids, pa.string())
    versions = pa.array([f"{a}\x1f{c}\x1f{i}\x1f{m}" for a, c, i, m in plan.versions], pa.string())

    def by_image(column: str) -> Callable[[pa.Table], pa.Array]:
        return lambda t: pc.invert(pc.fill_null(pc.is_in(t[column], ids), False))

    def edges(t: pa.Table) -> pa.Array:
        return pc.and_(by_image("child_id")(t), by_image("parent_id")(t))

    def artifacts(t: pa.Table) -> pa.Array:
        key = pc.binary_join_element_wise(t["asset"], t["character"], t["iteration"], t["dvc_md5"], "\x1f")
        return pc.invert(pc.fill_null(pc.is_in(key, versions), False))

    keep = {"images": by_image("image_id"), "members": by_image("image_id"), "decisions": by_image("image_id"),
            "edges": edges, "artifacts": artifacts}
    return sum(store.rewrite(table, rule) for table, rule in keep.items())
