"""Lineage store: concurrent appends from many processes, compaction under load, trace, CLI database."""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
import traceback
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from flen_resources.lineage import SCHEMAS, LineageStore, Version, VersionLookupError, md5_prefix

# Rows each append writes, per table: several rows into several tables at once.
ROWS_PER_APPEND = {"images": 3, "edges": 2, "decisions": 4, "members": 1}
SPAWN = mp.get_context("spawn")  # fresh interpreters, as Dagster step processes and the CLI are


# -- worker processes (module level so 'spawn' can import them) ---------------------------------------
def _rows(table: str, writer: int, i: int) -> list[dict]:
    now = datetime.now(timezone.utc)
    run_id = f"w{writer}"
    base = dict(run_id=run_id, asset="source_images", character=f"c{writer % 2}", iteration="v1")
    n = ROWS_PER_APPEND[table]
    if table == "images":
        return [dict(base, image_id=f"img-{writer}-{i}-{k}", path=f"p/{writer}/{i}/{k}.png", width=8, height=8,
                     embedding=[0.5] * 4, status="accepted", created_at=now) for k in range(n)]
    if table == "edges":
        return [dict(base, child_id=f"img-{writer}-{i}-{k + 1}", parent_id=f"img-{writer}-{i}-{k}",
                     operation="normalize", seed=k, created_at=now) for k in range(n)]
    if table == "decisions":
        return [dict(base, image_id=f"img-{writer}-{i}-0", gate=f"g{k}", passed=bool(k % 2), value=float(k),
                     decided_at=now) for k in range(n)]
    return [dict(base, image_id=f"img-{writer}-{i}-{k}", path=f"m/{k}", origin="source", created_at=now)
            for k in range(n)]


def _writer(root: str, writer: int, appends: int, start, midway, errors) -> None:
    try:
        store = LineageStore(Path(root))
        start.wait(60)
        for i in range(appends):
            if i == appends // 2:  # half-way: wait until the reader has seen the store mid-write
                midway.wait(60)
            for table in ROWS_PER_APPEND:
                store.append(table, _rows(table, writer, i))
    except BaseException:
        errors.put(f"writer {writer}: {traceback.format_exc()}")
        raise


def _reader(root: str, expected: dict[str, int], ready, midway, stop, errors, results) -> None:
    """Query counts (and a join through the derived views) until told to stop; counts never go down.

    Reports how many rounds saw the writers mid-way (some rows, not all), proof that it overlapped them."""
    try:
        store = LineageStore(Path(root))
        last: dict[str, int] = {}
        partial = 0
        while True:
            stopping = stop.is_set()
            for table in ROWS_PER_APPEND:
                n = store.rows(f"SELECT count(*) AS n FROM {table}")[0]["n"]
                if n < last.get(table, 0):
                    raise AssertionError(f"{table} went from {last[table]} to {n} rows")
                if n > expected[table]:
                    raise AssertionError(f"{table} has {n} rows, more than the {expected[table]} written")
                last[table] = n
            store.rows("SELECT count(*) AS n FROM image_edges e JOIN image_facts f ON f.image_id = e.child_id")
            if 0 < sum(last.values()) < sum(expected.values()):
                partial += 1
                midway.set()
            ready.set()
            if stopping:
                break
        results.put(("reader", partial, last))
    except BaseException:
        errors.put(f"reader: {traceback.format_exc()}")
        raise


def _compactor(root: str, stop, errors, results) -> None:
    try:
        store = LineageStore(Path(root))
        rounds = merged = 0
        while not stop.is_set():
            merged += sum(store.compact().values())
            rounds += 1
            time.sleep(0.05)
        results.put(("compactor", rounds, merged))
    except BaseException:
        errors.put(f"compactor: {traceback.format_exc()}")
        raise


def _drain(queue) -> list:
    out = []
    while True:
        try:
            out.append(queue.get(timeout=0.5))
        except Exception:
            return out


def _run_concurrently(root: Path, writers: int, appends: int, compact: bool) -> dict:
    """Writers, a reader and optionally a compactor, each in its own spawned process."""
    # The store does not exist yet: the first appends and reads race to create it too.
    start, ready, midway, stop = SPAWN.Event(), SPAWN.Event(), SPAWN.Event(), SPAWN.Event()
    errors, results = SPAWN.Queue(), SPAWN.Queue()
    ws = [SPAWN.Process(target=_writer, args=(str(root), w, appends, start, midway, errors)) for w in range(writers)]
    others = [SPAWN.Process(target=_reader, args=(str(root), _expected(writers, appends), ready, midway, stop,
                                                        errors, results))]
    if compact:
        others.append(SPAWN.Process(target=_compactor, args=(str(root), stop, errors, results)))
    for p in ws + others:
        p.start()
    ready.wait(120)  # the reader has queried once: its interpreter is up
    time.sleep(0.5)  # so are the writers', most likely
    start.set()
    for p in ws:
        p.join(300)
    stop.set()
    for p in others:
        p.join(300)
    for p in ws + others:  # never leave a hung process behind
        if p.is_alive():
            p.terminate()
            p.join(10)
    errs = _drain(errors)
    assert not errs, "\n".join(errs)
    assert [p.exitcode for p in ws + others] == [0] * len(ws + others)
    stats = {name: (a, b) for name, a, b in _drain(results)}
    assert stats["reader"][0] >= 1, "the reader queried while the writers were mid-way"
    return stats


def _expected(writers: int, appends: int) -> dict[str, int]:
    return {t: writers * appends * n for t, n in ROWS_PER_APPEND.items()}


def _counts(store: LineageStore) -> dict[str, int]:
    return {t: store.rows(f"SELECT count(*) AS n FROM {t}")[0]["n"] for t in ROWS_PER_APPEND}


# -- (a) many processes append while another queries --------------------------------------------------
def test_concurrent_appends_from_many_processes_lose_nothing(tmp_path: Path):
    writers, appends = 6, 50
    root = tmp_path / "lineage"
    _run_concurrently(root, writers, appends, compact=False)
    store = LineageStore(root)
    assert _counts(store) == _expected(writers, appends)
    per_writer = store.rows("SELECT run_id, count(*) AS n FROM images GROUP BY run_id ORDER BY run_id")
    assert per_writer == [{"run_id": f"w{w}", "n": appends * ROWS_PER_APPEND["images"]} for w in range(writers)]
    distinct = store.rows("SELECT count(DISTINCT image_id) AS n FROM images")[0]["n"]
    assert distinct == writers * appends * ROWS_PER_APPEND["images"], "no row written twice"
    for table in ROWS_PER_APPEND:  # one file per append, no temp files left behind
        assert len(list((root / table).glob("*.parquet"))) == writers * appends + 1
        assert not list((root / table).glob(".*.tmp"))


# -- (b) compaction while writers still append ---------------------------------------------------------
def test_compaction_during_writes_keeps_every_row(tmp_path: Path):
    writers, appends = 4, 40
    root = tmp_path / "lineage"
    stats = _run_concurrently(root, writers, appends, compact=True)
    rounds, merged = stats["compactor"]
    assert rounds >= 2 and merged > 0, f"compaction ran during the writes ({rounds} rounds, {merged} files merged)"
    store = LineageStore(root)
    assert _counts(store) == _expected(writers, appends)
    store.compact()
    assert _counts(store) == _expected(writers, appends)
    for table in SCHEMAS:
        data = [p for p in (root / table).glob("*.parquet") if p.name != "_schema.parquet"]
        assert len(data) <= 1, f"{table}: {len(data)} files after a final compaction"
    assert store.rows("SELECT count(DISTINCT image_id) AS n FROM images")[0]["n"] == _expected(writers, appends)["images"]


# -- (c) trace and latest_members on a small synthetic graph -------------------------------------------
def test_trace_walks_member_to_original_and_latest_members_picks_latest_run(tmp_path: Path):
    store = LineageStore(tmp_path / "lineage")
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    stamp = dict(character="alice", iteration="v1")
    store.append("images", [
        dict(stamp, image_id="orig", run_id="r-src", asset="source_images", path="data/source_images/alice/v1/originals/orig.jpg",
             original_name="portrait.jpg", status="accepted", created_at=t0),
        dict(stamp, image_id="norm", run_id="r-src", asset="source_images", path="data/source_images/alice/v1/images/norm.png",
             original_name="portrait.jpg", status="accepted", created_at=t0),
        dict(stamp, image_id="enr", run_id="r-enr", asset="enriched_images", path="data/enriched_images/alice/v1/images/enr.png",
             status="generated", created_at=t0 + timedelta(minutes=1)),
        # A later sighting of the same content must not replace where it was first seen.
        dict(stamp, image_id="norm", run_id="r-src2", asset="source_images", path="elsewhere/norm.png",
             status="accepted", created_at=t0 + timedelta(hours=1)),
    ])
    store.append("edges", [
        dict(stamp, child_id="norm", parent_id="orig", run_id="r-src", asset="source_images", operation="normalize",
             params='{"max_side": 1024}', model="pillow", created_at=t0),
        dict(stamp, child_id="enr", parent_id="norm", run_id="r-enr", asset="enriched_images", operation="zoom",
             params='{"factor": 1.2}', seed=7, model="classic/1", created_at=t0 + timedelta(minutes=1)),
        # a rerun appends the same step again: the trace still shows it once
        dict(stamp, child_id="enr", parent_id="norm", run_id="r-enr2", asset="enriched_images", operation="zoom",
             params='{"factor": 1.2}', seed=7, model="classic/1", created_at=t0 + timedelta(minutes=2)),
    ])
    old = dict(stamp, asset="training_set", run_id="r-old", created_at=t0 + timedelta(minutes=5))
    new = dict(stamp, asset="training_set", run_id="r-new", created_at=t0 + timedelta(minutes=10))
    store.append("members", [dict(old, image_id="norm", path="ts/norm.png", origin="source"),
                             dict(old, image_id="enr", path="ts/enr.png", origin="enriched")])
    store.append("members", [dict(new, image_id="enr", path="ts/enr.png", origin="enriched", caption="photo of x")])
    # another partition's members do not leak in
    store.append("members", [dict(new, character="bob", image_id="orig", path="ts/bob.png", origin="source")])

    latest = store.rows("SELECT run_id, image_id FROM latest_members WHERE character = 'alice' AND asset = 'training_set'")
    assert latest == [{"run_id": "r-new", "image_id": "enr"}]
    assert {r["run_id"] for r in store.rows("SELECT run_id FROM latest_members")} == {"r-new"}

    rows = store.trace("alice", "v1")
    assert [(r["depth"], r["image_id"], r["operation"]) for r in rows] == [
        (0, "enr", None), (1, "norm", "zoom"), (2, "orig", "normalize")]
    assert all(r["root_id"] == "enr" and r["member_path"] == "ts/enr.png" and r["origin"] == "enriched" for r in rows)
    assert rows[0]["caption"] == "photo of x"
    assert rows[1]["model"] == "classic/1" and rows[1]["params"] == '{"factor": 1.2}'
    assert rows[1]["image_path"] == "data/source_images/alice/v1/images/norm.png", "image facts come from the first sighting"
    assert rows[2]["original_name"] == "portrait.jpg" and rows[2]["image_asset"] == "source_images"
    assert store.trace("alice", "v2") == []
    assert [r["image_id"] for r in store.trace("bob", "v1")] == ["orig"]


# -- (d) the CLI database opens read-only elsewhere and agrees ---------------------------------------
def test_cli_database_opens_read_only_with_the_same_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    project = tmp_path / "project"
    root = project / ".flen" / "lineage"
    store = LineageStore(root)
    store.ensure()
    monkeypatch.chdir(project)  # its paths are relative to the project root, where the CLI is run
    for i in range(3):
        for table in ROWS_PER_APPEND:
            store.append(table, _rows(table, i, i))
    db = root / "lineage.duckdb"
    assert db.is_file()
    views = ["runs", "artifacts", "metrics", *ROWS_PER_APPEND,
             "latest_artifacts", "latest_members", "image_edges", "latest_decisions", "image_facts"]
    expected = {v: store.rows(f"SELECT count(*) AS n FROM {v}")[0]["n"] for v in views}
    assert expected["images"] == 9 and expected["runs"] == 0
    con = duckdb.connect(str(db), read_only=True)
    try:
        got = {v: con.execute(f"SELECT count(*) FROM {v}").fetchone()[0] for v in views}
        with pytest.raises(duckdb.Error):
            con.execute("CREATE TABLE nope (x INT)")
    finally:
        con.close()
    assert got == expected
    # from another process too, as `duckdb .flen/lineage/lineage.duckdb` would
    script = ("import duckdb, json, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
              "print(json.dumps({v: con.execute(f'SELECT count(*) FROM {v}').fetchone()[0] for v in sys.argv[2:]}))")
    proc = subprocess.run([sys.executable, "-c", script, str(db), *views], capture_output=True, text=True, timeout=120,
                          cwd=project)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected
    # two readers at the same time at the same time, while the store keeps appending
    con1, con2 = duckdb.connect(str(db), read_only=True), duckdb.connect(str(db), read_only=True)
    try:
        store.append("images", _rows("images", 9, 9))
        assert con1.execute("SELECT count(*) FROM images").fetchone()[0] == expected["images"] + 3
        assert con2.execute("SELECT count(*) FROM images").fetchone()[0] == expected["images"] + 3
    finally:
        con1.close()
        con2.close()


# -- (e) the real duckdb CLI opens lineage.duckdb of a project copied elsewhere ---------------------
def _duckdb_cli() -> str:
    """The `duckdb` CLI of the dev extras (duckdb-cli on PyPI), next to this interpreter or on PATH."""
    import shutil

    beside = Path(sys.executable).parent / "duckdb"
    found = str(beside) if beside.is_file() else shutil.which("duckdb")
    if found is None:
        pytest.fail("the duckdb CLI is missing: pip install -e '.[dev]' (duckdb-cli)")
    return found


def _cli_count(db: str, view: str, cwd: Path, *cmd: str) -> int:
    """count(*) of a view, as the duckdb CLI reports it, run read-only from `cwd`."""
    proc = subprocess.run([_duckdb_cli(), "-readonly", *cmd, "-noheader", "-csv", db, "-c",
                           f"SELECT count(*) FROM {view}"], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and not proc.stderr, f"duckdb CLI failed ({proc.returncode}): {proc.stderr}"
    return int(proc.stdout.strip())


def _storage_number(db: Path) -> int:
    """The storage version number in a DuckDB file's header ('DUCK' magic at byte 8, the number after)."""
    head = db.read_bytes()[:20]
    assert head[8:12] == b"DUCK"
    return int.from_bytes(head[12:20], "little")


def _fill(store: LineageStore, writers: int = 3) -> None:
    for w in range(writers):
        for table in ROWS_PER_APPEND:
            store.append(table, _rows(table, w, w))


def test_duckdb_cli_opens_lineage_of_a_copied_project(tmp_path: Path):
    import shutil

    first = tmp_path / "first" / "project"
    _fill(LineageStore(first / ".flen" / "lineage"))
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(tmp_path / "first")  # nothing may still point at the old folder

    db = copy / ".flen" / "lineage" / "lineage.duckdb"
    assert _storage_number(db) == 64, "written in storage v1.0.0, which every DuckDB since 1.0 reads"
    images = 3 * ROWS_PER_APPEND["images"]
    # README's command, from the project root
    assert _cli_count(".flen/lineage/lineage.duckdb", "images", copy) == images
    assert _cli_count(".flen/lineage/lineage.duckdb", "image_edges", copy) == 3 * ROWS_PER_APPEND["edges"]
    # README's command from anywhere: the project root on DuckDB's file_search_path
    assert _cli_count(str(db), "latest_decisions", tmp_path, "-cmd",
                      f"SET file_search_path = '{copy}'") == 3 * ROWS_PER_APPEND["decisions"]

    # the Python store keeps working on the copy, and the CLI sees what it appends
    store = LineageStore(copy / ".flen" / "lineage")
    before = db.stat()
    assert store.rows("SELECT count(*) AS n FROM images")[0]["n"] == images
    store.append("images", _rows("images", 7, 7))
    assert store.rows("SELECT count(*) AS n FROM image_facts")[0]["n"] == images + ROWS_PER_APPEND["images"]
    assert _cli_count(".flen/lineage/lineage.duckdb", "images", copy) == images + ROWS_PER_APPEND["images"]
    after = db.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "a current file is not rewritten"


def test_outdated_cli_database_is_rewritten(tmp_path: Path):
    project = tmp_path / "project"
    root = project / ".flen" / "lineage"
    store = LineageStore(root)
    _fill(store, writers=1)
    db, marker = root / "lineage.duckdb", root / ".cli-db.version"
    current = marker.read_text()
    # What earlier versions wrote: the library's default storage format, absolute paths, no marker.
    db.unlink()
    marker.unlink()
    con = duckdb.connect(str(db))
    con.execute(f"CREATE VIEW images AS SELECT * FROM read_parquet('{root.as_posix()}/images/*.parquet')")
    con.close()
    store.ensure()
    assert marker.read_text() == current and _storage_number(db) == 64
    assert _cli_count(".flen/lineage/lineage.duckdb", "image_facts", project) == ROWS_PER_APPEND["images"]
    # A marker of other definitions (older code) is rewritten too, and no temp file is left behind.
    marker.write_text("0000000000000000\n")
    inode = db.stat().st_ino
    LineageStore(root).ensure()
    assert marker.read_text() == current and db.stat().st_ino != inode
    assert not list(root.glob(".lineage-*")) and not list(root.glob("*.tmp"))
    assert _cli_count(".flen/lineage/lineage.duckdb", "members", project) == ROWS_PER_APPEND["members"]


def test_cli_database_in_a_folder_with_a_comma_and_quote(tmp_path: Path):
    project = tmp_path / "shots, Bob's" / "project"
    _fill(LineageStore(project / ".flen" / "lineage"), writers=2)
    assert _cli_count(".flen/lineage/lineage.duckdb", "images", project) == 2 * ROWS_PER_APPEND["images"]


# -- (f) finding a partition version by DVC md5 -------------------------------------------------------
A_MD5 = "0123456789abcdef0123456789abcdef.dir"
B_MD5 = "01234567ffffffffffffffffffffffff.dir"  # shares its first 8 hex with A
C_MD5 = "fedcba9876543210fedcba9876543210.dir"


@pytest.mark.parametrize("typed, prefix", [
    (A_MD5, A_MD5[:32]), (A_MD5[:32], A_MD5[:32]), (A_MD5.upper(), A_MD5[:32]), ("0123456789AB", "0123456789ab"),
    ("01234567", "01234567"),
    ("", None), ("%", None), ("5_8", None), ("0123456", None), ("0123456%", None), ("________", None),
    ("0123456789abcdef.dir", None), (A_MD5[:32] + "0", None), (" 01234567", None), ("01234567\n", None),
    ("g1234567", None), (A_MD5 + "x", None),
])
def test_md5_prefix_takes_full_md5_or_8_plus_hex(typed: str, prefix: str | None):
    assert md5_prefix(typed) == prefix


def _artifact(md5: str, minutes: int, dvc_file: str, iteration: str = "v1") -> dict:
    return dict(run_id=f"r{minutes}", asset="training_set", character="alice", iteration=iteration, dvc_md5=md5,
                dvc_file=dvc_file, created_at=datetime(2025, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=minutes))


def test_find_version_matches_exactly_or_by_unique_prefix(tmp_path: Path):
    store = LineageStore(tmp_path / "lineage")
    store.append("artifacts", [_artifact(A_MD5, 0, "a-old"), _artifact(B_MD5, 1, "b"), _artifact(C_MD5, 2, "c"),
                               _artifact(A_MD5, 3, "a-new"),  # the same content published again
                               _artifact("0123456789abcdef0000000000000000.dir", 4, "other", iteration="v2")])
    find = store.find_version
    assert find("training_set", "alice", "v1", A_MD5).dvc_file == "a-new"
    assert find("training_set", "alice", "v1", A_MD5[:32].upper()).dvc_file == "a-new"
    assert find("training_set", "alice", "v1", "0123456789").dvc_md5 == A_MD5  # unique in v1 (v2 does not count)
    assert find("training_set", "alice", "v1", "FEDCBA98") == Version(C_MD5, "c", datetime(2025, 1, 1, 0, 2, tzinfo=timezone.utc))
    with pytest.raises(VersionLookupError, match=r"md5 prefix '01234567' matches 2 versions of training_set alice\|v1: "
                                                 rf"{A_MD5} \(2025-01-01 00:03:00\), {B_MD5} \(2025-01-01 00:01:00\); "
                                                 r"give more characters"):
        find("training_set", "alice", "v1", "01234567")
    with pytest.raises(VersionLookupError, match=r"no version aaaaaaaa of training_set alice\|v1; "
                                                 r"see `flen versions training_set alice v1`"):
        find("training_set", "alice", "v1", "aaaaaaaa")
    with pytest.raises(VersionLookupError, match="no version"):
        find("training_set", "bob", "v1", A_MD5)
    for bad in ("", "%", "5_8", "0123456", "01234567%"):
        with pytest.raises(VersionLookupError) as err:
            find("training_set", "alice", "v1", bad)
        assert str(err.value) == (f"md5 {bad!r} is not a DVC md5: give the full 32-hex md5 or a unique prefix of 8+ "
                                  "hex characters from `flen versions training_set alice v1`")


def test_unpublished_reason_names_what_the_lineage_does_not_know_and_the_closest_it_does(tmp_path: Path):
    store = LineageStore(tmp_path / "lineage")
    why = store.unpublished_reason
    assert why("training_set", "alice", "v1") == "nothing is published yet: materialize it first"
    store.append("artifacts", [_artifact(A_MD5, 0, "a"), _artifact(B_MD5, 1, "b", iteration="v2"),
                               {**_artifact(C_MD5, 2, "c"), "asset": "filtered_images"}])
    assert why("training_set", "alcie", "v1") == "no character 'alcie' has published anything (did you mean alice?)"
    assert why("training_set", "bob", "v1") == "no character 'bob' has published anything (known: alice)"
    assert why("training_set", "alice", "v3") == "alice has no published iteration v3 (it has: v1, v2)"
    assert why("trainin_set", "alice", "v1") == ("trainin_set of alice|v1 is not published (did you mean "
                                                 "training_set?): materialize it first")
    assert why("lora_eval", "alice", "v2") == ("lora_eval of alice|v2 is not published (published: training_set): "
                                               "materialize it first")
    assert why("training_set", "alice", "v1") == "training_set of alice|v1 is published with no images to trace"
