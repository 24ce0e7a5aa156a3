"""What the review page shows and records: a partition's gated images, their parents, and human decisions.

Candidates come from the published partition's manifest (the gate results of filtered_images or
synthetic_batch, and identity_reference's verdict on each source photo); everything about an image file (its path, its parents, the edit or generation
that made it) comes from the lineage store, so only images the lineage knows are ever served.
Human decisions are lineage `decisions` rows (gate `review`, source `human`), appended and never
rewritten: the latest per image wins, `passed` NULL means "undone, back to the policy's verdict".
A decision made in an earlier iteration of the same character and asset carries over (classic
edits are deterministic, so v2 re-creates v1's images byte for byte).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flen_resources.atomic import atomic_path
from flen_resources.lineage import LineageStore, utcnow
from flen_resources.project import (
    MANIFEST,
    InvalidNameError,
    Project,
    flen_command,
    iteration_number,
    validate_iteration,
    validate_slug,
)

REVIEWABLE = ("filtered_images", "synthetic_batch", "identity_reference")  # edits, generations, source photos
STATUSES = ("pending", "accepted", "rejected")
DECISIONS = {"accept": True, "reject": False, "clear": None}
IMAGE_ID_RE = re.compile(r"^[0-9a-f]{64}\Z")
DEFAULT_PORT = 8765
PORT_ENV = "FLEN_REVIEW_PORT"


class UnknownImage(KeyError):
    """An image id that is not a candidate of the partition (or not known to the lineage)."""


def validate_asset(asset: str) -> str:
    """`asset` if the review page handles it, else InvalidNameError."""
    if asset not in REVIEWABLE:
        raise InvalidNameError(f"cannot review {asset!r}: use one of {', '.join(REVIEWABLE)}")
    return asset


def review_port() -> int:
    """The review page's port: $FLEN_REVIEW_PORT, else 8765."""
    return int(os.environ.get(PORT_ENV) or DEFAULT_PORT)


def base_url(host: str = "127.0.0.1", port: int | None = None) -> str:
    """http://HOST:PORT with an IPv6 literal in brackets (http://[::1]:8765)."""
    host = host.strip("[]")
    return f"http://{f'[{host}]' if ':' in host else host}:{port or review_port()}"


def review_url(character: str, iteration: str, asset: str = "filtered_images", port: int | None = None,
               host: str = "127.0.0.1") -> str:
    """The URL of one partition's review page (as `flen review` serves it)."""
    return f"{base_url(host, port)}/review/{character}/{iteration}/{asset}"


def review_command(project: Project, character: str, iteration: str, asset: str = "filtered_images") -> str:
    """The `flen review` command (with --project) that serves a partition's page."""
    return flen_command(project, "review", character, "--iteration", iteration,
                        *(("--asset", asset) if asset != "filtered_images" else ()))


def apply_command(project: Project, character: str, iteration: str, asset: str = "filtered_images") -> str:
    """The command that makes a partition's review decisions count: decisions are lineage rows, read
    when the reviewed asset (and what is downstream of it) is materialized again.

    filtered_images and identity_reference: the training-set chain from that asset (`--from`);
    synthetic_batch: the rest of the iteration from it (`--all`: edit triplets and the Qwen adapter
    wait behind its blocking check), after which training set v(N+1) takes the accepted generations."""
    return flen_command(project, "materialize", character, iteration,
                        *(("--all",) if asset == "synthetic_batch" else ()), "--from", asset)


@dataclass(frozen=True)
class Partition:
    """One reviewable partition: (asset, character, iteration), validated."""

    asset: str
    character: str
    iteration: str

    @classmethod
    def of(cls, asset: str, character: str, iteration: str) -> "Partition":
        return cls(validate_asset(asset), validate_slug(character), validate_iteration(iteration))

    def key(self) -> tuple[str, str, str]:
        return (self.asset, self.character, self.iteration)


COMPACT_EVERY = 500  # decisions a store makes before it compacts the decisions table
SHARED_STORES = 16  # projects one process keeps a shared store for; the least recently used goes first


def _file_key(path: Path) -> tuple[int, int, int] | None:
    """What identifies one version of a file (a republished manifest is a new inode)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def status_of(human: dict | None, policy_status: str) -> tuple[str, str]:
    """(status, who decided): the one status rule. A human decision (passed true/false) wins over the
    policy's verdict; no decision, or an undone one (passed NULL), leaves the policy's verdict."""
    if human is not None and human["passed"] is not None:
        return ("accepted" if human["passed"] else "rejected"), "human"
    return policy_status, "policy"


class ReviewStore:
    """Reads candidates and records human decisions for the review page, the gate and the sensor."""

    # (project root, lineage folder) -> this process's shared store; see shared().
    _shared: OrderedDict[tuple[Path, Path], ReviewStore] = OrderedDict()
    _shared_lock = threading.Lock()

    def __init__(self, project: Project, lineage: LineageStore | None = None, session: str = "",
                 compact_every: int = COMPACT_EVERY):
        self.project = project
        self.lineage = lineage or LineageStore(project.lineage_dir)
        self.session = session or f"review:{os.getpid()}:{int(time.time())}"
        self.compact_every = compact_every
        self._since_compaction = 0
        self._lock = threading.RLock()
        # partition -> (manifest version, candidates, ids whose lineage facts they were built from)
        self._candidates: dict[tuple, tuple[tuple | None, list[dict], frozenset[str]]] = {}
        self._fact_files: dict[str, frozenset[str]] | None = None  # images/edges files already seen
        self._listed: dict[str, tuple[int, int]] = {}  # table -> (folder mtime, wall clock) of its last listing
        self._decision_files: frozenset[str] = frozenset()  # decision files already read
        self._human_rows: dict[tuple[str, str], dict[str, dict[str, dict]]] = {}  # (asset, character) -> id -> iteration -> row
        self._humans: dict[tuple, dict[str, dict]] = {}  # partition -> id -> latest human decision
        self._items: dict[tuple, tuple[list[dict], list[dict]]] = {}  # partition -> (candidates, items)
        self._paths: dict[str, Path] = {}
        self._last_decided: datetime | None = None

    @classmethod
    def shared(cls, project: Project, lineage: LineageStore | None = None) -> ReviewStore:
        """This process's one store for (project root, lineage folder), made on first use."""
        # Sharing is safe because no cached view is used unchecked: candidates are keyed by the
        # manifest's file version, and every read first rechecks the images/edges/decisions folders
        # (_unchanged), so rows that another process or LineageStore appended are read before answering.
        lineage = lineage or LineageStore(project.lineage_dir)
        key = (project.root.resolve(), lineage.root.resolve())
        with cls._shared_lock:
            store = cls._shared.get(key)
            if store is None:
                store = cls._shared[key] = cls(project, lineage)
            cls._shared.move_to_end(key)
            while len(cls._shared) > SHARED_STORES:
                cls._shared.popitem(last=False)
            return store

    @classmethod
    def _forget_shared(cls) -> None:
        """Start a forked child with no shared store (a parent thread may hold a store's lock)."""
        cls._shared_lock = threading.Lock()
        cls._shared = OrderedDict()

    def _unchanged(self, table: str) -> bool:
        """True when `table`'s folder surely has no file this store has not listed: its mtime is the
        one seen before the last listing, and that listing began well after that mtime (a file added
        later gets a later mtime, even with coarse file-system timestamps, as git's racy-clean check)."""
        seen = self._listed.get(table)
        if seen is None:
            return False
        try:
            mtime = self.lineage.table_dir(table).stat().st_mtime_ns
        except FileNotFoundError:
            return False
        # A whole-second mtime hints at a coarse file system (1 s, or 2 s on FAT): a file added in
        # the same tick would leave the mtime as it was, so the listing must start after that tick.
        slack = 2_000_000_000 if mtime % 1_000_000_000 == 0 else 100_000_000
        return mtime == seen[0] and seen[1] - seen[0] > slack

    def _listing(self, table: str) -> None:
        """Note the folder's mtime and the wall clock just before listing `table`."""
        try:
            mtime = self.lineage.table_dir(table).stat().st_mtime_ns
        except FileNotFoundError:
            self._listed.pop(table, None)
            return
        self._listed[table] = (mtime, time.time_ns())

    # -- partitions ---------------------------------------------------------------------------
    def manifest_path(self, part: Partition) -> Path:
        return self.project.partition_dir(*part.key()) / MANIFEST

    def partitions(self) -> list[Partition]:
        """Every published reviewable partition, newest iteration first."""
        found = []
        for asset in REVIEWABLE:
            root = self.project.data_dir / asset
            for char_dir in sorted(root.iterdir()) if root.is_dir() else []:
                for it_dir in sorted(char_dir.iterdir()) if char_dir.is_dir() else []:
                    try:
                        part = Partition.of(asset, char_dir.name, it_dir.name)
                    except InvalidNameError:
                        continue  # not a partition folder (a .dvc pointer, a stray file)
                    if (it_dir / MANIFEST).is_file():
                        found.append(part)
        return sorted(found, key=lambda p: (p.character, -iteration_number(p.iteration), p.asset))

    # -- candidates (manifest + lineage facts), cached while nothing changed on disk ---------
    def _refresh_facts(self) -> None:
        """Drop the cached candidates whose lineage facts changed: new images/edges files are read
        (ids only) and only partitions whose images or parents they mention are reloaded; a write
        for another character or run costs a small read, not a reload. When files disappeared
        (compaction), every partition is reloaded."""
        with self._lock:
            if self._fact_files is None:  # nothing cached yet: just note what exists
                for t in ("images", "edges"):
                    self._listing(t)
                self._fact_files = {t: self.lineage.files(t) for t in ("images", "edges")}
                return
            touched: set[str] = set()
            full = False
            for table, cols in (("images", ["image_id"]), ("edges", ["child_id", "parent_id"])):
                if self._unchanged(table):
                    continue
                self._listing(table)
                names, data, whole = self.lineage.read_files(table, self._fact_files[table], columns=cols)
                self._fact_files[table] = names
                full |= whole
                for col in cols:
                    touched.update(v for v in data.column(col).to_pylist() if v)
            if full:
                self._candidates.clear()
            elif touched:
                for key in [k for k, v in self._candidates.items() if not touched.isdisjoint(v[2])]:
                    del self._candidates[key]

    def candidates(self, part: Partition) -> list[dict]:
        """The gated images of a partition with their parents and policy verdict (no human decisions).
        Cached while the manifest is the same file and no lineage write touched these images."""
        manifest = self.manifest_path(part)
        with self._lock:
            self._refresh_facts()
            version = _file_key(manifest)
            cached = self._candidates.get(part.key())
            if cached and cached[0] == version:
                return cached[1]
            rows = pq.read_table(manifest).to_pylist() if version is not None else []
            ids = [r["image_id"] for r in rows if r.get("image_id")]
            edges, paths = self._facts(ids)
            items = []
            for order, row in enumerate(rows):
                if not row.get("image_id"):
                    continue
                # A row whose file the lineage does not know under data/ is still a candidate (the
                # gate counts it, so the page must let a human decide it) but marked file_missing and
                # never served: image_path() refuses it.
                items.append(self._candidate(part, order, row, edges.get(row["image_id"], []), paths))
            relevant = frozenset(ids) | {e["parent_id"] for es in edges.values() for e in es}
            self._candidates[part.key()] = (version, items, relevant)
            self._paths.update(paths)
            return items

    def _facts(self, ids: Sequence[str]) -> tuple[dict[str, list[dict]], dict[str, Path]]:
        """Lineage edges of `ids` and the files of `ids` and of their parents (those that exist)."""
        if not ids:
            return {}, {}
        wanted = pa.table({"image_id": pa.array(list(ids), pa.string())})
        with self.lineage.connect() as con:
            con.register("wanted", wanted)
            edge_rows = con.sql(
                "SELECT child_id, parent_id, operation, prompt, seed, model, params FROM image_edges "
                "WHERE child_id IN (SELECT image_id FROM wanted) AND parent_id <> child_id").to_arrow_table().to_pylist()
            parent_ids = pa.table({"image_id": pa.array(sorted({e["parent_id"] for e in edge_rows}), pa.string())})
            con.register("parents", parent_ids)
            path_rows = con.sql(
                "SELECT image_id, path FROM images WHERE image_id IN (SELECT image_id FROM wanted) "
                "OR image_id IN (SELECT image_id FROM parents) ORDER BY created_at DESC").to_arrow_table().to_pylist()
        edges: dict[str, list[dict]] = {}
        for e in edge_rows:
            edges.setdefault(e["child_id"], []).append(e)
        paths: dict[str, Path] = {}
        for r in path_rows:
            if r["image_id"] in paths or not r["path"] or not IMAGE_ID_RE.match(r["image_id"] or ""):
                continue
            resolved = self._inside_data(r["path"])
            if resolved is not None:
                paths[r["image_id"]] = resolved
        return edges, paths

    def _inside_data(self, stored: str) -> Path | None:
        """A lineage path as a file under data/, or None (missing, or pointing anywhere else)."""
        path = (self.project.root / stored).resolve()
        if not path.is_relative_to(self.project.data_dir.resolve()) or not path.is_file():
            return None
        return path

    @staticmethod
    def _candidate(part: Partition, order: int, row: dict, edges: list[dict], paths: dict[str, Path]) -> dict:
        failed = [g for g in (row.get("failed_gates") or "").split(",") if g]
        # Manifests written before review policies have no policy_status: their verdict was `accepted`
        # (identity_reference's before its sources were reviewable: every inlier was used).
        policy_status = row.get("policy_status") or ("accepted" if row.get("accepted", row.get("inlier")) else "rejected")
        distance = row.get("identity_distance")
        parents = []
        for e in edges:
            pid = e["parent_id"]
            if pid in paths:
                parents.append({"id": pid, "kind": "image", "label": row.get("parent_name") or pid[:12]})
            else:  # a generation's parent is the LoRA (flux_lora:<md5>), not an image file
                parents.append({"id": None, "kind": "model", "label": pid})
        edge = edges[0] if edges else {}
        prompt = edge.get("prompt") or row.get("prompt")
        operation = edge.get("operation") or row.get("operation")
        if part.asset == "synthetic_batch":
            title = prompt or "generation"
        elif part.asset == "identity_reference":
            title = f"source photo · {row.get('original_name') or ''}"
        else:
            title = " · ".join(dict.fromkeys(x for x in (row.get("recipe_id"), operation) if x)) or "edit"
        return {
            "id": row["image_id"], "order": order, "title": title, "operation": operation, "prompt": prompt,
            "seed": edge.get("seed") if edge.get("seed") is not None else row.get("seed"),
            "model": edge.get("model") or row.get("model"), "caption": row.get("caption"),
            "distance": None if distance is None else float(distance),
            "threshold": row.get("identity_threshold"),
            "gate_passed": not failed if "failed_gates" in row else bool(row.get("accepted")),
            "failed_gates": failed, "reason": row.get("gate_reason") or row.get("reason") or "", "policy_status": policy_status,
            "policy_reason": row.get("policy_reason") or row.get("review") or "", "parents": parents,
            "file_missing": row["image_id"] not in paths,
            # The status the published partition holds (its manifest): a human decision made since
            # differs from it until the asset is materialized again (apply_command).
            "published_status": row.get("review_status"),
        }

    # -- human decisions (read incrementally: only decision files this store has not seen) -------
    def _refresh_decisions(self, own: tuple[Path | None, list[dict]] | None = None) -> None:
        """Take in the human review rows of every decision file not read yet (all of them after a
        compaction), and patch the cached decisions and items of the images they touch. The cache
        only ever holds what the files it read contain, so a concurrent writer is never absorbed."""
        import pyarrow.compute as pc

        with self._lock:
            if own is None and self._unchanged("decisions"):
                return
            self._listing("decisions")
            known = self._decision_files
            new_rows: list[dict] = []
            if own is not None and own[0] is not None:  # the file this store just wrote: its rows are in hand
                known = known | {own[0].name}
                new_rows = own[1]
            where = (pc.field("source") == "human") & (pc.field("gate") == "review")
            names, table, full = self.lineage.read_files("decisions", known, where)
            changed: dict[tuple[str, str], set[str]] = {}
            if full:  # files were merged (compaction): start over, and recheck every image seen before
                for key, by_id in self._human_rows.items():
                    changed.setdefault(key, set()).update(by_id)
                self._human_rows = {}
                new_rows = []  # the full read has them
            for r in new_rows + table.select(["image_id", "asset", "character", "iteration", "passed", "reason",
                                              "decided_at"]).to_pylist():
                if not r["image_id"] or not r["iteration"] or r["decided_at"] is None:
                    continue
                slot = self._human_rows.setdefault((r["asset"], r["character"]), {}).setdefault(r["image_id"], {})
                old = slot.get(r["iteration"])
                if old is None or r["decided_at"] >= old["decided_at"]:
                    slot[r["iteration"]] = r
                    changed.setdefault((r["asset"], r["character"]), set()).add(r["image_id"])
            self._decision_files = names
            for key, humans in self._humans.items():
                ids = changed.get(key[:2])
                if not ids:
                    continue
                for image_id in ids:
                    latest = self._latest_human(key, image_id)
                    if latest is None:
                        humans.pop(image_id, None)
                    else:
                        humans[image_id] = latest
                cached = self._items.get(key)
                if cached:  # patch the decided items instead of rebuilding all of them
                    candidates, listed = cached
                    self._items[key] = (candidates, [self._with_status(i, humans.get(i["id"])) if i["id"] in ids
                                                     else i for i in listed])

    def _latest_human(self, key: tuple[str, str, str], image_id: str) -> dict | None:
        """The latest human decision on `image_id` made in the partition's iteration or an earlier one."""
        asset, character, iteration = key
        upto = iteration_number(iteration)
        best = None
        for it, row in self._human_rows.get((asset, character), {}).get(image_id, {}).items():
            try:
                if iteration_number(it) > upto:
                    continue
            except (InvalidNameError, ValueError):
                continue
            if best is None or row["decided_at"] >= best["decided_at"]:
                best = row
        return best

    def human_decisions(self, part: Partition) -> dict[str, dict]:
        """The latest human decision per image of this partition's character and asset, up to its iteration."""
        with self._lock:  # a copy: later refreshes patch the cached dict, and a shared store outlives the caller
            return dict(self._human_decisions(part))

    def _human_decisions(self, part: Partition) -> dict[str, dict]:
        """human_decisions, as the cached dict that refreshes patch in place."""
        with self._lock:
            self._refresh_decisions()
            cached = self._humans.get(part.key())
            if cached is None:
                cached = {}
                for image_id in self._human_rows.get(part.key()[:2], {}):
                    latest = self._latest_human(part.key(), image_id)
                    if latest is not None:
                        cached[image_id] = latest
                self._humans[part.key()] = cached
            return cached

    def items(self, part: Partition) -> list[dict]:
        """Candidates with their current status: the human decision if any, else the policy's.
        Cached while the candidates do not change; new decisions patch only the items they touch."""
        candidates = self.candidates(part)
        with self._lock:
            humans = self._human_decisions(part)
            cached = self._items.get(part.key())
            if cached and cached[0] is candidates:
                return cached[1]
            out = [self._with_status(cand, humans.get(cand["id"])) for cand in candidates]
            self._items[part.key()] = (candidates, out)
            return out

    @staticmethod
    def _with_status(cand: dict, human: dict | None) -> dict:
        status, by = status_of(human, cand["policy_status"])
        return {**cand, "status": status, "decided_by": by,
                "human": status if by == "human" else None,
                "decided_at": human["decided_at"].isoformat() if human else None,
                "decided_in": human["iteration"] if human else None}

    @staticmethod
    def counts(items: Iterable[dict]) -> dict[str, int]:
        """pending / accepted / rejected / all / gate_failed / human / unapplied counts (unapplied: images whose
        status differs from the published partition's, decided since it was materialized)."""
        items = list(items)
        c = Counter(i["status"] for i in items)
        return {**{s: c.get(s, 0) for s in STATUSES}, "all": len(items),
                "gate_failed": sum(not i["gate_passed"] for i in items),
                "human": sum(i["decided_by"] == "human" for i in items),
                "unapplied": sum(i.get("published_status") is not None and i["status"] != i["published_status"]
                                 for i in items)}

    def statuses(self, part: Partition) -> dict[str, str]:
        """image id -> accepted | rejected | pending for every candidate of the partition (exactly the
        images the page lists, those whose file is missing included), human decisions applied: the
        view of the blocking check, training_set and the sensor."""
        return {i["id"]: i["status"] for i in self.items(part)}

    def pending(self, part: Partition) -> int:
        """How many images of the partition still wait for a human."""
        return sum(s == "pending" for s in self.statuses(part).values())

    def _now(self) -> datetime:
        """A strictly increasing timestamp, so an undo right after a decision always sorts after it."""
        with self._lock:
            now = utcnow()
            if self._last_decided is not None and now <= self._last_decided:
                now = self._last_decided + timedelta(microseconds=1)
            self._last_decided = now
            return now

    def decide(self, part: Partition, ids: Sequence[str], decision: str, reason: str = "") -> list[dict]:
        """Record one human decision (accept, reject, clear) for each id; returns each id's previous
        human decision (for undo). Unknown ids raise UnknownImage before anything is written."""
        if decision not in DECISIONS:
            raise ValueError(f"unknown decision {decision!r}: use one of {', '.join(DECISIONS)}")
        with self._lock:  # one decision at a time per store: read, append and re-read as one step
            items = {i["id"]: i for i in self.items(part)}
            unknown = [i for i in ids if i not in items]
            if unknown:
                raise UnknownImage(f"not candidates of {part.asset} {part.character}|{part.iteration}: "
                                   + ", ".join(str(u)[:16] for u in unknown[:5]))
            if not ids:
                return []
            passed = DECISIONS[decision]
            default_reason = {"accept": "accepted by a human", "reject": "rejected by a human",
                              "clear": "undone: back to the policy's verdict"}[decision]
            now = self._now()
            rows = [{"image_id": i, "run_id": self.session, "asset": part.asset, "character": part.character,
                     "iteration": part.iteration, "gate": "review", "passed": passed,
                     "value": items[i]["distance"], "threshold": items[i]["threshold"],
                     "reason": reason or default_reason, "source": "human", "decided_at": now}
                    for i in dict.fromkeys(ids)]
            written = self.lineage.append("decisions", rows)
            self._since_compaction += 1
            if self.compact_every and self._since_compaction >= self.compact_every:
                self.lineage.compact(["decisions"])  # lock-safe with other writers; one file per decision adds up
                self._since_compaction = 0
            self._refresh_decisions((written, rows))  # our own file, and any another process wrote meanwhile
            return [{"id": i, "previous": items[i]["human"]} for i in dict.fromkeys(ids)]

    def bulk(self, part: Partition, decision: str, side: str, score: float, scope: str = "pending") -> list[dict]:
        """Decide every image of `scope` (pending, or all) whose identity distance is below or above `score`."""
        if side not in ("below", "above"):
            raise ValueError("side must be 'below' or 'above'")
        if scope not in ("pending", "all"):
            raise ValueError("scope must be 'pending' or 'all'")
        op = "<=" if side == "below" else ">="
        with self._lock:  # choose and decide on the same view
            chosen = [i["id"] for i in self.items(part)
                      if (scope == "all" or i["status"] == "pending") and i["distance"] is not None
                      and (i["distance"] <= score if side == "below" else i["distance"] >= score)]
            return self.decide(part, chosen, decision, f"bulk {decision}: identity distance {op} {score:g}")

    # -- files ------------------------------------------------------------------------------
    def image_path(self, image_id: str) -> Path:
        """The file of an image the lineage knows; UnknownImage for anything else."""
        if not isinstance(image_id, str) or not IMAGE_ID_RE.match(image_id):
            raise UnknownImage(image_id)
        with self._lock:
            known = self._paths.get(image_id)
        if known is not None and known.is_file():
            return known
        for row in self.lineage.rows("SELECT path FROM images WHERE image_id = $id ORDER BY created_at DESC",
                                     {"id": image_id}):
            resolved = self._inside_data(row["path"]) if row["path"] else None
            if resolved is not None:
                with self._lock:
                    self._paths[image_id] = resolved
                return resolved
        raise UnknownImage(image_id)

    def thumbnail(self, image_id: str, size: int = 256) -> Path:
        """A cached JPEG thumbnail of a known image; UnknownImage, or ImageRejected when it does not decode."""
        from PIL import Image

        from flen_resources.imaging import decode_image

        source = self.image_path(image_id)
        thumb = self.project.state_dir / "cache" / "thumbs" / str(size) / f"{image_id}.jpg"
        if thumb.is_file():  # ids are content hashes: a cached thumbnail is never stale
            return thumb
        # The safe decoder, not Image.open: the source is untrusted (EXIF turned, alpha flattened too).
        img = decode_image(source).image
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        with atomic_path(thumb) as tmp:  # a concurrent request sees no thumbnail or the whole file
            img.save(tmp, format="JPEG", quality=85)
        return thumb


os.register_at_fork(after_in_child=ReviewStore._forget_shared)
