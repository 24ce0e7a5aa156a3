"""Lineage store: append-only Parquet event files, queried through DuckDB views.

DuckDB allows one writing process per database file, while Dagster steps, the CLI and the review
page all write lineage from their own processes. So no process ever writes a DuckDB file:
every writer appends an immutable Parquet file (written to a temp name, then renamed, so readers
never see half a file) and readers open an in-memory DuckDB whose views glob those files.
`compact()` merges a table's files into one, under an exclusive lock that readers share.

In the `cluster` deployment every event file is also an object in the bucket (put before the local
copy is written, so a file no other host can see is never read here), and a reader first fetches
the objects other hosts put: the project folder holds a mirror, the bucket is the record.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from flen_resources.atomic import atomic_path, write_text_atomic
from flen_resources.bucket import Bucket, cluster_bucket
from flen_resources.project import did_you_mean

_TS = pa.timestamp("us", tz="UTC")

# lineage.duckdb is written in this storage format, not the writing library's default: duckdb 2.x
# writes format 69 by default, which the DuckDB CLI on PyPI (duckdb-cli 1.4/1.5) cannot open.
# v1.0.0 is read by every DuckDB since 1.0.
CLI_STORAGE_VERSION = "v1.0.0"
# Bump when the CLI database changes in a way its view SQL does not show, so old files are rewritten.
CLI_DATABASE_FORMAT = 2

SCHEMAS: dict[str, pa.Schema] = {
    # One row per asset materialization (or CLI action) that wrote lineage.
    "runs": pa.schema([
        ("run_id", pa.string()), ("asset", pa.string()), ("character", pa.string()),
        ("iteration", pa.string()), ("code_version", pa.string()), ("params", pa.string()),
        ("models", pa.string()), ("status", pa.string()), ("started_at", _TS),
        ("finished_at", _TS), ("host_pid", pa.string()),
    ]),
    # One row per published partition folder: its DVC md5 is the asset's data version.
    "artifacts": pa.schema([
        ("run_id", pa.string()), ("asset", pa.string()), ("character", pa.string()),
        ("iteration", pa.string()), ("path", pa.string()), ("dvc_md5", pa.string()),
        ("n_files", pa.int64()), ("size_bytes", pa.int64()), ("dvc_file", pa.string()),
        ("created_at", _TS),
    ]),
    # Facts about one image file, keyed by the sha256 of its bytes.
    "images": pa.schema([
        ("image_id", pa.string()), ("run_id", pa.string()), ("asset", pa.string()),
        ("character", pa.string()), ("iteration", pa.string()), ("path", pa.string()),
        ("original_name", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("phash", pa.string()), ("n_faces", pa.int32()), ("face_boxes", pa.string()),
        ("embedding", pa.list_(pa.float32())), ("status", pa.string()), ("reason", pa.string()),
        ("created_at", _TS),
    ]),
    # child <- parent, with what was done: an edit, a normalisation, a generation.
    "edges": pa.schema([
        ("child_id", pa.string()), ("parent_id", pa.string()), ("run_id", pa.string()),
        ("asset", pa.string()), ("character", pa.string()), ("iteration", pa.string()),
        ("operation", pa.string()), ("params", pa.string()), ("prompt", pa.string()),
        ("seed", pa.int64()), ("model", pa.string()), ("created_at", _TS),
    ]),
    # Which images a partition version holds (a training set's manifest, a filtered set's keep list).
    "members": pa.schema([
        ("run_id", pa.string()), ("asset", pa.string()), ("character", pa.string()),
        ("iteration", pa.string()), ("image_id", pa.string()), ("path", pa.string()),
        ("origin", pa.string()), ("caption", pa.string()), ("created_at", _TS),
    ]),
    # Gate results and review decisions; append-only, the latest per (image, gate) wins.
    "decisions": pa.schema([
        ("image_id", pa.string()), ("run_id", pa.string()), ("asset", pa.string()),
        ("character", pa.string()), ("iteration", pa.string()), ("gate", pa.string()),
        ("passed", pa.bool_()), ("value", pa.float64()), ("threshold", pa.float64()),
        ("reason", pa.string()), ("source", pa.string()), ("decided_at", _TS),
    ]),
    # Numbers about a partition (gate statistics, evaluation scores).
    "metrics": pa.schema([
        ("run_id", pa.string()), ("asset", pa.string()), ("character", pa.string()),
        ("iteration", pa.string()), ("name", pa.string()), ("value", pa.float64()),
        ("recorded_at", _TS),
    ]),
    # Every checkpoint's scores on lora_eval's fixed grid (checkpoint_selection.CheckpointScore), per LoRA version.
    "checkpoint_scores": pa.schema([
        ("run_id", pa.string()), ("asset", pa.string()), ("character", pa.string()),
        ("iteration", pa.string()), ("lora_md5", pa.string()), ("step", pa.int64()), ("images", pa.int64()),
        ("identity_pass_rate", pa.float64()), ("memorised_rate", pa.float64()), ("mean_distance", pa.float64()),
        ("diversity", pa.float64()), ("yaw_spread", pa.float64()), ("face_detected_rate", pa.float64()),
        ("memorised_passes", pa.int64()), ("recorded_at", _TS),
    ]),
    # Which checkpoint of a LoRA version the next steps use: the rule's (lora_eval) or a person's (`flen promote`).
    "promotions": pa.schema([
        ("run_id", pa.string()), ("asset", pa.string()), ("character", pa.string()),
        ("iteration", pa.string()), ("lora_md5", pa.string()), ("step", pa.int64()), ("chosen_by", pa.string()),
        ("who", pa.string()), ("reason", pa.string()), ("recorded_at", _TS),
    ]),
    # What `flen forget` erased, by hash only (never a name or a path): the photo, each image derived
    # from it, each partition version that held them (erased_id: its DVC md5).
    "erasures": pa.schema([
        ("erased_id", pa.string()), ("kind", pa.string()), ("asset", pa.string()), ("character", pa.string()),
        ("iteration", pa.string()), ("run_id", pa.string()), ("erased_at", _TS),
    ]),
}

# Convenience views on top of the raw tables; documented in README ("Query lineage with DuckDB").
DERIVED_VIEWS: dict[str, str] = {
    # The latest published version of each partition.
    "latest_artifacts": """
        SELECT * FROM artifacts
        QUALIFY row_number() OVER (PARTITION BY asset, character, iteration ORDER BY created_at DESC) = 1
    """,
    # Members of the latest version of each partition.
    "latest_members": """
        SELECT m.* FROM members m
        JOIN (SELECT asset, character, iteration, run_id FROM members
              QUALIFY row_number() OVER (PARTITION BY asset, character, iteration ORDER BY created_at DESC) = 1) l
        USING (asset, character, iteration, run_id)
        WHERE m.image_id NOT IN (SELECT erased_id FROM erasures)
    """,
    # One row per distinct parent->child step (reruns append identical rows).
    "image_edges": """
        SELECT child_id, parent_id, any_value(operation) AS operation, any_value(params) AS params,
               any_value(prompt) AS prompt, any_value(seed) AS seed, any_value(model) AS model
        FROM edges GROUP BY child_id, parent_id
    """,
    # The latest decision per image and gate.
    "latest_decisions": """
        SELECT * FROM decisions
        QUALIFY row_number() OVER (PARTITION BY image_id, asset, character, iteration, gate ORDER BY decided_at DESC) = 1
    """,
    # One row per image id, from where its content was first seen (its origin).
    "image_facts": """
        SELECT * FROM images WHERE image_id NOT IN (SELECT erased_id FROM erasures)
        QUALIFY row_number() OVER (PARTITION BY image_id ORDER BY created_at) = 1
    """,
}

TRACE_SQL = """
WITH RECURSIVE
  roots AS (
    SELECT image_id, path, origin, caption FROM latest_members
    WHERE asset = $asset AND character = $character AND iteration = $iteration
  ),
  ancestry(root_id, image_id, depth, operation, params, model) AS (
    SELECT image_id, image_id, 0, NULL::VARCHAR, NULL::VARCHAR, NULL::VARCHAR FROM roots
    UNION ALL
    SELECT a.root_id, e.parent_id, a.depth + 1, e.operation, e.params, e.model
    FROM ancestry a JOIN image_edges e ON e.child_id = a.image_id
    WHERE a.depth < 32 AND e.parent_id <> e.child_id
  )
SELECT r.path AS member_path, r.origin, r.caption, a.root_id, a.depth, a.image_id,
       a.operation, a.params, a.model, f.path AS image_path, f.original_name, f.asset AS image_asset,
       f.iteration AS image_iteration
FROM ancestry a JOIN roots r ON r.image_id = a.root_id
LEFT JOIN image_facts f ON f.image_id = a.image_id
ORDER BY r.path, a.depth
"""


def utcnow() -> datetime:
    """Timezone-aware now, the timestamp type of every lineage table."""
    return datetime.now(timezone.utc)


def to_json(value: Any) -> str:
    """Stable JSON for params/models columns."""
    return json.dumps(value, sort_keys=True, default=str)


def _sql_literal(text: str) -> str:
    """A SQL string literal (paths may hold quotes)."""
    return "'" + text.replace("'", "''") + "'"


# What `flen versions` prints (32 hex + '.dir' for a folder) or a prefix of its hex part.
_MD5 = re.compile(r"(?P<hex>[0-9a-f]{32})(?:\.dir)?|(?P<prefix>[0-9a-f]{8,31})")


class VersionLookupError(ValueError):
    """An md5 given to look up a partition version is malformed, unknown or ambiguous."""


@dataclass(frozen=True)
class Version:
    """One published version of a partition: its DVC md5 and the .dvc text that restores it."""

    dvc_md5: str
    dvc_file: str
    created_at: datetime


def md5_prefix(md5: str) -> str | None:
    """The lower-case hex that a typed md5 must start a DVC md5 with, or None when it is not one."""
    match = _MD5.fullmatch(md5.lower())
    return None if match is None else match["hex"] or match["prefix"]


_FROM_DEPLOYMENT = object()


class LineageStore:
    """Append-only lineage events under `root` (mirrored from the bucket in a cluster), queried with DuckDB."""

    def __init__(self, root: Path, bucket: Bucket | None | object = _FROM_DEPLOYMENT):
        self.root = Path(root)
        self.bucket: Bucket | None = cluster_bucket() if bucket is _FROM_DEPLOYMENT else bucket  # type: ignore[assignment]

    # -- layout -------------------------------------------------------------------------------
    def table_dir(self, table: str) -> Path:
        if table not in SCHEMAS:
            raise KeyError(f"unknown lineage table {table!r}; known: {', '.join(SCHEMAS)}")
        return self.root / table

    def ensure(self) -> None:
        """Create the table folders, each with an empty schema file so globs always match."""
        for table, schema in SCHEMAS.items():
            folder = self.table_dir(table)
            folder.mkdir(parents=True, exist_ok=True)
            seed = folder / "_schema.parquet"
            if not seed.exists():
                self._write_atomic(schema.empty_table(), seed)
        self._write_cli_database()

    # -- writing ------------------------------------------------------------------------------
    def append(self, table: str, rows: Sequence[Mapping[str, Any]]) -> Path | None:
        """Append rows as one new immutable Parquet file; safe from any number of processes."""
        if not rows:
            return None
        self.ensure()
        schema = SCHEMAS[table]
        unknown = set().union(*(r.keys() for r in rows)) - set(schema.names)
        if unknown:
            raise ValueError(f"lineage table {table!r} has no column(s) {sorted(unknown)}")
        data = pa.Table.from_pylist([dict(r) for r in rows], schema=schema)
        name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}.parquet"
        path = self.table_dir(table) / name
        if self.bucket is not None:  # the bucket first: an event only this host could see would be lost
            sink = pa.BufferOutputStream()
            pq.write_table(data, sink, compression="zstd")
            self.bucket.put(self.bucket.settings.lineage_key(table, name), sink.getvalue().to_pybytes())
        self._write_atomic(data, path)
        return path

    def fetch(self, tables: Sequence[str] | None = None) -> int:
        """Copy the event objects other hosts put in the bucket into the local mirror; returns how many."""
        if self.bucket is None:
            return 0
        fetched = 0
        for table in tables or SCHEMAS:
            folder = self.table_dir(table)
            folder.mkdir(parents=True, exist_ok=True)
            local = {e.name for e in os.scandir(folder)}
            for name in sorted(self.bucket.names(self.bucket.settings.lineage_key(table)) - local):
                with atomic_path(folder / name) as tmp:
                    tmp.write_bytes(self.bucket.get(self.bucket.settings.lineage_key(table, name)))
                fetched += 1
        return fetched

    @staticmethod
    def _write_atomic(data: pa.Table, path: Path) -> None:
        with atomic_path(path) as tmp:
            pq.write_table(data, tmp, compression="zstd")

    # -- reading ------------------------------------------------------------------------------
    @contextmanager
    def _shared(self, exclusive: bool = False) -> Iterator[None]:
        """Readers share this lock; compaction takes it exclusively before deleting files."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".compact.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def cli_base(self) -> Path:
        """The folder lineage.duckdb's paths are relative to: the project root for <project>/.flen/lineage."""
        return self.root.parent.parent if self.root.parent.name == ".flen" else self.root

    def _view_statements(self, relative_to: Path | None = None) -> list[str]:
        """CREATE VIEW statements for every view; table globs are absolute, or relative to `relative_to`."""
        statements = []
        for table in SCHEMAS:
            folder = self.table_dir(table)
            if relative_to is not None:
                folder = Path(os.path.relpath(folder, relative_to))
            glob = (folder / "*.parquet").as_posix()
            statements.append(f"CREATE OR REPLACE VIEW {table} AS "
                              f"SELECT * FROM read_parquet({_sql_literal(glob)}, union_by_name = true)")
        statements += [f"CREATE OR REPLACE VIEW {name} AS {sql}" for name, sql in DERIVED_VIEWS.items()]
        return statements

    def _define_views(self, con: duckdb.DuckDBPyConnection) -> None:
        for statement in self._view_statements():
            con.execute(statement)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection with every lineage view defined."""
        self.ensure()
        self.fetch()
        with self._shared():
            con = duckdb.connect(":memory:")
            try:
                self._define_views(con)
                yield con
            finally:
                con.close()

    def query(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> pa.Table:
        """Run SQL against the lineage views and return an Arrow table."""
        with self.connect() as con:
            return con.sql(sql, params=params or None).to_arrow_table()

    def rows(self, sql: str, params: Mapping[str, Any] | Sequence[Any] | None = None) -> list[dict]:
        """Run SQL and return a list of dicts."""
        return self.query(sql, params).to_pylist()

    def files(self, table: str) -> frozenset[str]:
        """The names of a table's event files now."""
        folder = self.table_dir(table)
        self.fetch([table])
        if not folder.is_dir():
            return frozenset()
        return frozenset(e.name for e in os.scandir(folder) if e.name.endswith(".parquet") and e.name != "_schema.parquet")

    def read_files(self, table: str, known: frozenset[str] = frozenset(), where: Any = None,
                   columns: Sequence[str] | None = None) -> tuple[frozenset[str], pa.Table, bool]:
        """Incremental read: the names of the table's files now, the rows (matching the pyarrow
        expression `where`) of the files not in `known`, and whether that was a full read. When a
        file of `known` is gone (compaction merged it), every file is read and `full` is True.
        Listing and reading happen under the shared lock, so compaction cannot delete a file between."""
        import pyarrow.dataset as ds

        folder = self.table_dir(table)
        if not folder.is_dir():
            self.ensure()
        names = self.files(table)
        if names == known:  # nothing new, nothing merged: no lock, no read
            return names, SCHEMAS[table].empty_table().select(list(columns) if columns else SCHEMAS[table].names), False
        with self._shared():
            names = self.files(table)
            full = not known <= names
            fresh = sorted(names if full else names - known)
            if not fresh:
                empty = SCHEMAS[table].empty_table()
                return names, empty.select(list(columns)) if columns else empty, full
            data = ds.dataset([str(folder / n) for n in fresh], schema=SCHEMAS[table], format="parquet")
            return names, data.to_table(columns=list(columns) if columns else None, filter=where), full

    def trace(self, character: str, iteration: str, asset: str = "training_set") -> list[dict]:
        """Every member of a partition with each of its ancestors, nearest first."""
        return self.rows(TRACE_SQL, {"asset": asset, "character": character, "iteration": iteration})

    def unpublished_reason(self, asset: str, character: str, iteration: str) -> str:
        """Why `asset` of character|iteration has no published version: the first of character, iteration
        and asset the lineage does not know, with the closest names it knows."""
        published = self.rows("SELECT DISTINCT asset, character, iteration FROM artifacts")
        characters = {r["character"] for r in published}
        if not characters:
            return "nothing is published yet: materialize it first"
        if character not in characters:
            return f"no character {character!r} has published anything{did_you_mean(character, characters)}"
        iterations = {r["iteration"] for r in published if r["character"] == character}
        if iteration not in iterations:
            return f"{character} has no published iteration {iteration}{did_you_mean(iteration, iterations, 'it has')}"
        assets = {r["asset"] for r in published if r["character"] == character and r["iteration"] == iteration}
        if asset in assets:  # `flen lineage` of a published partition that recorded no images
            return f"{asset} of {character}|{iteration} is published with no images to trace"
        return (f"{asset} of {character}|{iteration} is not published{did_you_mean(asset, assets, 'published')}: "
                "materialize it first")

    def find_version(self, asset: str, character: str, iteration: str, md5: str) -> Version:
        """The published version whose DVC md5 is `md5` (32 hex, '.dir' optional) or starts with its 8+ hex."""
        versions_cmd = f"`flen versions {asset} {character} {iteration}`"
        prefix = md5_prefix(md5)
        if prefix is None:
            raise VersionLookupError(f"md5 {md5!r} is not a DVC md5: give the full 32-hex md5 or a unique prefix "
                                     f"of 8+ hex characters from {versions_cmd}")
        # starts_with on validated hex, never LIKE: '%' or '_' in user input would match anything.
        rows = self.rows(
            "SELECT dvc_md5, arg_max(dvc_file, created_at) AS dvc_file, max(created_at) AS created_at FROM artifacts "
            "WHERE asset = $a AND character = $c AND iteration = $i AND starts_with(lower(dvc_md5), $p) "
            "GROUP BY dvc_md5 ORDER BY created_at DESC",
            {"a": asset, "c": character, "i": iteration, "p": prefix})
        if not rows:
            raise VersionLookupError(f"no version {md5} of {asset} {character}|{iteration}; see {versions_cmd}")
        if len(rows) > 1:
            found = ", ".join(f"{r['dvc_md5']} ({r['created_at']:%Y-%m-%d %H:%M:%S})" for r in rows)
            raise VersionLookupError(f"md5 prefix {md5!r} matches {len(rows)} versions of {asset} "
                                     f"{character}|{iteration}: {found}; give more characters")
        return Version(**rows[0])

    # -- maintenance --------------------------------------------------------------------------
    def compact(self, tables: Sequence[str] | None = None) -> dict[str, int]:
        """Merge each table's event files into one (every table, or `tables`); returns files merged per table."""
        if self.bucket is not None:  # the bucket's objects are the record and stay as written; merging the mirror would fetch them again
            return {table: 0 for table in tables or SCHEMAS}
        self.ensure()
        merged: dict[str, int] = {}
        with self._shared(exclusive=True):
            for table in tables or SCHEMAS:
                schema = SCHEMAS[table]
                files = sorted(p for p in self.table_dir(table).glob("*.parquet") if p.name != "_schema.parquet")
                if len(files) < 2:
                    merged[table] = 0
                    continue
                data = pa.concat_tables([pq.read_table(f, schema=schema) for f in files])
                out = self.table_dir(table) / f"{time.time_ns():020d}-compacted-{uuid.uuid4().hex[:8]}.parquet"
                self._write_atomic(data, out)
                for f in files:
                    f.unlink()
                merged[table] = len(files)
        return merged

    def rewrite(self, table: str, keep: Callable[[pa.Table], pa.Array]) -> int:
        """Rewrite each event file of `table` that holds rows `keep` rejects (a boolean mask per file), without
        them; returns the rows dropped. Each file is replaced atomically under the exclusive lock, so a
        rerun after a crash finishes the job. Not in a cluster: the bucket's objects stay as written."""
        if self.bucket is not None:
            raise RuntimeError("lineage rows cannot be rewritten in the cluster deployment: the bucket keeps every event")
        self.ensure()
        schema = SCHEMAS[table]
        dropped = 0
        with self._shared(exclusive=True):
            for path in sorted(p for p in self.table_dir(table).glob("*.parquet") if p.name != "_schema.parquet"):
                data = pq.read_table(path, schema=schema)
                mask = keep(data)
                kept = data.filter(mask)
                if kept.num_rows == data.num_rows:
                    continue
                dropped += data.num_rows - kept.num_rows
                self._write_atomic(kept, path)
        return dropped

    @staticmethod
    def _cli_fingerprint(statements: Sequence[str]) -> str:
        """What lineage.duckdb must have been written with to be current."""
        text = "\n".join([str(CLI_DATABASE_FORMAT), CLI_STORAGE_VERSION, *statements])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @staticmethod
    def _cli_database_current(path: Path, marker: Path, fingerprint: str) -> bool:
        """Whether lineage.duckdb exists and its marker says it was written with `fingerprint`."""
        try:
            return path.is_file() and marker.read_text().strip() == fingerprint
        except FileNotFoundError:
            return False

    def _write_cli_database(self) -> None:
        """lineage.duckdb holds only view definitions, for the duckdb CLI run from the project root.

        Its paths are relative to `cli_base()`, so a moved or copied project reads its own files; it is
        (re)written, atomically, when missing or when its definitions are not this code's (the marker)."""
        path, marker = self.root / "lineage.duckdb", self.root / ".cli-db.version"
        base = self.cli_base()
        statements = self._view_statements(relative_to=base)
        fingerprint = self._cli_fingerprint(statements)
        if self._cli_database_current(path, marker, fingerprint):
            return
        with open(self.root / ".cli-db.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if self._cli_database_current(path, marker, fingerprint):
                    return
                tmp = self.root / f".lineage-{uuid.uuid4().hex[:6]}.duckdb"
                try:
                    self._write_views_file(tmp, base, statements)
                    os.replace(tmp, path)
                finally:
                    tmp.unlink(missing_ok=True)
                    tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
                # The marker goes last: a crash in between leaves it stale, and the next call rewrites.
                write_text_atomic(marker, fingerprint + "\n")
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _write_views_file(file: Path, base: Path, statements: Sequence[str]) -> None:
        """A new DuckDB file in CLI_STORAGE_VERSION holding `statements`, bound with relative paths from `base`."""
        con = duckdb.connect(":memory:")
        try:
            with _searchable(base.absolute()) as search_path:
                # CREATE VIEW binds its globs now: the relative paths resolve through file_search_path,
                # not the current directory (a process-wide setting other threads rely on).
                con.execute(f"SET file_search_path = {_sql_literal(search_path)}")
                con.execute(f"ATTACH {_sql_literal(str(file.absolute()))} AS cli (STORAGE_VERSION '{CLI_STORAGE_VERSION}')")
                con.execute("USE cli")
                for statement in statements:
                    con.execute(statement)
                con.execute("USE memory")
                con.execute("DETACH cli")  # checkpoints: the file is complete, with no WAL beside it
        finally:
            con.close()


@contextmanager
def _searchable(base: Path) -> Iterator[str]:
    """A path to `base` that fits DuckDB's comma-separated file_search_path (a symlink when it holds a comma)."""
    if "," not in str(base):
        yield str(base)
        return
    with tempfile.TemporaryDirectory() as tmp:
        link = Path(tmp) / "base"
        link.symlink_to(base.resolve(), target_is_directory=True)
        yield str(link)
