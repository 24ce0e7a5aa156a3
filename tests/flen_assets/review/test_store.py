"""ReviewStore: candidates from manifest + lineage, append-only human decisions (latest wins,
history kept), bulk decisions, safe image lookup, and no lost decision under concurrent writers."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from flen_assets.review.store import Partition, ReviewStore, UnknownImage
from flen_resources.lineage import LineageStore, utcnow
from flen_resources.project import InvalidNameError, Project
from tests_helpers import build_review_partition

PART = Partition.of("filtered_images", "bench", "v1")


def test_candidates_have_parents_and_facts(review_project):
    project, ids = review_project
    store = ReviewStore(project)
    items = store.items(PART)
    assert [i["id"] for i in items] == ids
    first = items[0]
    assert first["status"] == "pending" and first["decided_by"] == "policy"
    assert first["parents"][0]["kind"] == "image"
    assert store.image_path(first["parents"][0]["id"]).is_file()
    assert first["operation"] == "mirror" and first["distance"] == pytest.approx(0.2)
    assert store.counts(items) == {"pending": 40, "accepted": 0, "rejected": 0, "all": 40, "gate_failed": 0,
                                   "human": 0, "unapplied": 0}


def test_latest_decision_wins_and_history_is_kept(review_project):
    project, ids = review_project
    store = ReviewStore(project)
    assert store.decide(PART, [ids[0]], "accept") == [{"id": ids[0], "previous": None}]
    assert store.decide(PART, [ids[0]], "reject") == [{"id": ids[0], "previous": "accepted"}]
    assert store.statuses(PART)[ids[0]] == "rejected"
    store.decide(PART, [ids[0]], "clear")  # undo back to the policy's verdict
    assert store.statuses(PART)[ids[0]] == "pending"
    # A fresh store (another process) sees the same thing, and every decision is still there.
    fresh = ReviewStore(project)
    assert fresh.statuses(PART)[ids[0]] == "pending"
    history = LineageStore(project.lineage_dir).rows(
        "SELECT passed, source, gate FROM decisions WHERE image_id = $i ORDER BY decided_at", {"i": ids[0]})
    assert [h["passed"] for h in history] == [True, False, None]
    assert {(h["source"], h["gate"]) for h in history} == {("human", "review")}


def test_bulk_by_distance(review_project):
    project, ids = review_project
    store = ReviewStore(project)
    changed = store.bulk(PART, "accept", "below", 0.3)
    below = [i["id"] for i in store.items(PART) if i["distance"] <= 0.3]
    assert sorted(c["id"] for c in changed) == sorted(below) and len(below) == 10
    store.bulk(PART, "reject", "above", 0.5)
    counts = store.counts(store.items(PART))
    assert counts["accepted"] == 10 and counts["rejected"] == 10 and counts["pending"] == 20
    # scope pending: the accepted ones are not touched again
    assert store.bulk(PART, "reject", "below", 0.3) == []


def test_unknown_ids_and_names(review_project):
    project, ids = review_project
    store = ReviewStore(project)
    with pytest.raises(UnknownImage):
        store.decide(PART, [ids[0], "f" * 64], "accept")
    assert store.statuses(PART)[ids[0]] == "pending", "nothing written when one id is unknown"
    for bad in ("../../etc/passwd", "F" * 64, "a" * 63, "", "0" * 64):
        with pytest.raises(UnknownImage):
            store.image_path(bad)
    with pytest.raises(InvalidNameError):
        Partition.of("filtered_images", "../bench", "v1")
    with pytest.raises(InvalidNameError):
        Partition.of("training_set", "bench", "v1")


def test_lineage_path_outside_data_is_never_served(review_project, tmp_path):
    project, _ = review_project
    secret = project.root / "secret.png"
    secret.write_bytes(b"not for the page")
    rogue = "ab" * 32
    LineageStore(project.lineage_dir).append("images", [{"image_id": rogue, "path": "secret.png",
                                                         "created_at": utcnow()}])
    LineageStore(project.lineage_dir).append("images", [{"image_id": "cd" * 32, "path": "data/../../../etc/passwd",
                                                         "created_at": utcnow()}])
    store = ReviewStore(project)
    for image_id in (rogue, "cd" * 32):
        with pytest.raises(UnknownImage):
            store.image_path(image_id)


def test_decision_carries_over_to_later_iterations(project: Project):
    v1 = build_review_partition(project, 6, iteration="v1")
    v2 = build_review_partition(project, 6, iteration="v2")
    assert v1 == v2, "the same edits, byte for byte"
    store = ReviewStore(project)
    store.decide(Partition.of("filtered_images", "bench", "v1"), v1[:2], "accept")
    v2_status = store.statuses(Partition.of("filtered_images", "bench", "v2"))
    assert [v2_status[i] for i in v2[:3]] == ["accepted", "accepted", "pending"]
    # but never backwards: a v2 decision does not change v1
    store.decide(Partition.of("filtered_images", "bench", "v2"), [v2[2]], "reject")
    assert store.statuses(Partition.of("filtered_images", "bench", "v1"))[v1[2]] == "pending"


def _decide_many(root: str, ids: list[str], decision: str) -> None:
    store = ReviewStore(Project(Path(root)), session=f"worker-{decision}")
    for image_id in ids:
        store.decide(PART, [image_id], decision)


def _run_writes(root: str, n: int) -> None:
    """What a Dagster run does meanwhile: gate rows and images appended to the same tables."""
    lineage = LineageStore(Path(root) / ".flen" / "lineage")
    for k in range(n):
        lineage.append("decisions", [{"image_id": f"{k:064x}", "run_id": "dagster-run", "asset": "filtered_images",
                                      "character": "other", "iteration": "v1", "gate": "identity", "passed": True,
                                      "source": "gate", "decided_at": utcnow()}])
        lineage.append("images", [{"image_id": f"{k:064x}", "run_id": "dagster-run", "created_at": utcnow()}])


def _compact(root: str, seconds: float) -> None:
    lineage = LineageStore(Path(root) / ".flen" / "lineage")
    end = time.time() + seconds
    while time.time() < end:
        lineage.compact()
        time.sleep(0.05)


def test_concurrent_writers_lose_no_decision(review_project):
    project, ids = review_project
    ctx = multiprocessing.get_context("spawn")  # forking after pyarrow/duckdb started threads is unsafe
    root = str(project.root)
    procs = [ctx.Process(target=_decide_many, args=(root, ids[:20], "accept")),
             ctx.Process(target=_decide_many, args=(root, ids[20:], "reject")),
             ctx.Process(target=_run_writes, args=(root, 40)),
             ctx.Process(target=_run_writes, args=(root, 40)),
             ctx.Process(target=_compact, args=(root, 3.0))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    lineage = LineageStore(project.lineage_dir)
    humans = lineage.rows("SELECT count(*) AS n FROM decisions WHERE source = 'human'")[0]["n"]
    runs = lineage.rows("SELECT count(*) AS n FROM decisions WHERE run_id = 'dagster-run'")[0]["n"]
    assert humans == 40 and runs == 80
    statuses = ReviewStore(project).statuses(PART)
    assert all(statuses[i] == "accepted" for i in ids[:20]) and all(statuses[i] == "rejected" for i in ids[20:])


def test_cached_view_matches_a_fresh_store_under_concurrent_decisions(review_project):
    """Threads deciding through one store (as the server's thread pool does) while another store
    (another process) decides too: the first store's cached items must end up exactly what a fresh
    store reads from the files (a decision appended meanwhile was once absorbed into the cache key)."""
    import threading

    project, ids = review_project
    store = ReviewStore(project)
    other = ReviewStore(project, session="other")
    store.items(PART)  # warm the cache
    start = threading.Barrier(6)
    real_append = store.lineage.append

    def slow_append(table, rows):  # a slow disk: the threads' writes overlap
        time.sleep(0.02)
        path = real_append(table, rows)
        time.sleep(0.02)
        return path

    store.lineage.append = slow_append

    def work(s: ReviewStore, chosen: list[str], decision: str) -> None:
        start.wait()
        for image_id in chosen:
            s.decide(PART, [image_id], decision)

    chunks = [ids[k:k + 7] for k in range(0, 35, 7)]
    threads = [threading.Thread(target=work, args=(store, chunk, "accept" if n % 2 else "reject"))
               for n, chunk in enumerate(chunks)]
    threads.append(threading.Thread(target=work, args=(other, ids[35:], "accept")))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    view = {i["id"]: (i["status"], i["human"]) for i in store.items(PART)}
    fresh = {i["id"]: (i["status"], i["human"]) for i in ReviewStore(project).items(PART)}
    assert view == fresh
    assert store.pending(PART) == 0 and ReviewStore(project).pending(PART) == 0


def test_store_compacts_decisions_and_keeps_its_view(review_project):
    """Every `compact_every` decisions the store merges the decision files; its view stays right."""
    project, ids = review_project
    store = ReviewStore(project, compact_every=5)
    for n, image_id in enumerate(ids[:12]):
        store.decide(PART, [image_id], "accept" if n % 3 else "reject")
    files = LineageStore(project.lineage_dir).files("decisions")
    assert len(files) <= 3, files  # 12 decisions: two compactions, two files since
    view = {i["id"]: i["status"] for i in store.items(PART)}
    assert view == {i["id"]: i["status"] for i in ReviewStore(project).items(PART)}
    assert [view[i] for i in ids[:4]] == ["rejected", "accepted", "accepted", "rejected"]


def test_unrelated_lineage_writes_do_not_reload_candidates(review_project):
    """Another run writing images, edges and decisions for another character keeps the cached
    candidates (no full reload); a write about one of the partition's images reloads them."""
    project, ids = review_project
    store = ReviewStore(project)
    first = store.candidates(PART)
    items = store.items(PART)
    lineage = LineageStore(project.lineage_dir)
    _run_writes(str(project.root), 3)  # images, decisions of character "other"
    lineage.append("edges", [{"child_id": "ef" * 32, "parent_id": "01" * 32, "character": "other",
                              "created_at": utcnow()}])
    assert store.candidates(PART) is first and store.items(PART) is items
    store.decide(PART, [ids[0]], "accept")  # a decision patches the items, not the candidates
    assert store.candidates(PART) is first
    path = store.image_path(ids[1]).relative_to(project.root).as_posix()
    lineage.append("images", [{"image_id": ids[1], "path": path, "created_at": utcnow()}])
    assert store.candidates(PART) is not first
    assert [i["id"] for i in store.candidates(PART)] == ids


def test_serve_compacts_the_lineage_first(review_project, monkeypatch):
    """`flen review` starts by compacting: a restart after thousands of decisions reads one file."""
    import uvicorn

    from flen_assets.review.server import serve

    project, ids = review_project
    store = ReviewStore(project, compact_every=0)
    for image_id in ids[:10]:
        store.decide(PART, [image_id], "accept")
    lineage = LineageStore(project.lineage_dir)
    assert len(lineage.files("decisions")) >= 10
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    serve(project, port=1)
    assert len(lineage.files("decisions")) == 1
    assert ReviewStore(project).statuses(PART)[ids[0]] == "accepted"


def test_a_missing_file_is_listed_counted_and_decidable_but_never_served(review_project):
    """The gate and the page count the same images: a manifest row whose file is gone is a candidate
    marked file_missing (so the gate can be cleared from the page), and its file is never served."""
    project, ids = review_project
    store = ReviewStore(project)
    gone = store.image_path(ids[3])
    gone.unlink()
    fresh = ReviewStore(project)
    items = {i["id"]: i for i in fresh.items(PART)}
    assert set(items) == set(ids) == set(fresh.statuses(PART))
    assert items[ids[3]]["file_missing"] and items[ids[3]]["status"] == "pending"
    assert not any(items[i]["file_missing"] for i in ids if i != ids[3])
    with pytest.raises(UnknownImage):
        fresh.image_path(ids[3])
    with pytest.raises(UnknownImage):
        fresh.thumbnail(ids[3])
    fresh.bulk(PART, "accept", "below", 9.0, scope="all")
    assert fresh.pending(PART) == 0 and ReviewStore(project).statuses(PART)[ids[3]] == "accepted"


def test_review_urls_bracket_ipv6_hosts():
    from flen_assets.review.store import base_url, review_url

    assert review_url("alice", "v1", port=8765, host="::1") == "http://[::1]:8765/review/alice/v1/filtered_images"
    assert review_url("alice", "v2", "synthetic_batch", port=9000, host="[fe80::1]") == \
        "http://[fe80::1]:9000/review/alice/v2/synthetic_batch"
    assert review_url("alice", "v1", port=8765) == "http://127.0.0.1:8765/review/alice/v1/filtered_images"
    assert base_url("0.0.0.0", 8765) == "http://0.0.0.0:8765"
