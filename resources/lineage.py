"""Lineage store: append-only Parquet event files, queried through DuckDB views.

DuckDB allows one writing process per database file, while Dagster steps, the CLI and the review
page all write lineage from their own processes. So no process ever writes a DuckDB file:
every writer appends an immutable Parquet file (written to a temp name, then renamed, so readers
never see half a file) and readers open an in-memory DuckDB whose views glob those files.
`compact()` merges a table's files into one, under an exclusive lock that readers share.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

_TS = pa.timestamp("us", tz="UTC")

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
        SELECT * FROM images
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


class LineageStore:
    """Append-only lineage events under `root`, queried with DuckDB."""

    def __init__(self, root: Path):
        self.root = Path(root)

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
        self._write_atomic(data, path)
        return path

    @staticmethod
    def _write_atomic(data: pa.Table, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
        pq.write_table(data, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)

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

    def _define_views(self, con: duckdb.DuckDBPyConnection) -> None:
        for table in SCHEMAS:
            glob = (self.table_dir(table) / "*.parquet").as_posix()
            con.execute(
                f"CREATE OR REPLACE VIEW {table} AS "
                f"SELECT * FROM read_parquet('{glob}', union_by_name = true)"
            )
        for name, sql in DERIVED_VIEWS.items():
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {sql}")

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An in-memory DuckDB connection with every lineage view defined."""
        self.ensure()
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

    # -- maintenance --------------------------------------------------------------------------
    def compact(self, tables: Sequence[str] | None = None) -> dict[str, int]:
        """Merge each table's event files into one (every table, or `tables`); returns files merged per table."""
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

    def _write_cli_database(self) -> None:
        """lineage.duckdb holds only view definitions, for `duckdb .flen/lineage/lineage.duckdb`."""
        path = self.root / "lineage.duckdb"
        if path.exists():
            return
        with open(self.root / ".cli-db.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                if path.exists():
                    return
                tmp = self.root / f".lineage-{uuid.uuid4().hex[:6]}.duckdb"
                con = duckdb.connect(str(tmp))
                try:
                    self._define_views(con)
                finally:
                    con.close()
                os.replace(tmp, path)
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
