"""ReviewStore.shared: one store per (project, lineage folder) in a process, whose cached view still
takes in what other stores and other processes append (the gate reads through it)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

from flen_assets.review.gate import human_decisions, review_check, reviewed_statuses
from flen_assets.review.store import Partition, ReviewStore
from flen_resources.lineage import LineageStore, utcnow
from flen_resources.project import Project

PART = Partition.of("filtered_images", "bench", "v1")


def _accept_elsewhere(root: str, image_id: str) -> None:
    """Another process (`flen review`) accepting one image."""
    ReviewStore(Project(Path(root)), session="elsewhere").decide(PART, [image_id], "accept")


def _settled(store: ReviewStore) -> None:
    """Read once the decisions folder is old enough that the store trusts its cache (_unchanged)."""
    time.sleep(0.25)
    store.statuses(PART)
    assert store._unchanged("decisions"), "the cached path is the one under test"


def test_a_second_call_returns_the_same_store(review_project, tmp_path):
    project, _ = review_project
    store = ReviewStore.shared(project)
    assert ReviewStore.shared(project) is store
    assert ReviewStore.shared(Project(project.root / "data" / ".."), LineageStore(project.lineage_dir)) is store
    assert ReviewStore.shared(project, LineageStore(tmp_path / "elsewhere")) is not store
    assert ReviewStore.shared(Project(tmp_path / "other")) is not store


def test_a_forked_child_starts_without_shared_stores(review_project):
    project, _ = review_project
    store = ReviewStore.shared(project)
    ReviewStore._forget_shared()  # what os.register_at_fork runs in a child
    assert ReviewStore.shared(project) is not store


def test_a_decision_from_another_store_is_seen(review_project):
    project, ids = review_project
    shared = ReviewStore.shared(project)
    _settled(shared)
    ReviewStore(project, session="other").decide(PART, [ids[0]], "reject")
    LineageStore(project.lineage_dir).append("decisions", [{  # a bare lineage writer, as a Dagster step
        "image_id": ids[1], "run_id": "cli", "asset": PART.asset, "character": PART.character,
        "iteration": PART.iteration, "gate": "review", "passed": True, "source": "human", "decided_at": utcnow()}])
    statuses = ReviewStore.shared(project).statuses(PART)
    assert statuses[ids[0]] == "rejected" and statuses[ids[1]] == "accepted"
    assert shared.human_decisions(PART)[ids[0]]["passed"] is False


def test_a_decision_from_another_process_is_seen(review_project):
    project, ids = review_project
    shared = ReviewStore.shared(project)
    _settled(shared)
    proc = multiprocessing.get_context("spawn").Process(target=_accept_elsewhere, args=(str(project.root), ids[2]))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    assert shared.statuses(PART)[ids[2]] == "accepted"
    assert shared.pending(PART) == len(ids) - 1


def test_compaction_by_another_store_keeps_the_view(review_project):
    project, ids = review_project
    shared = ReviewStore.shared(project)
    other = ReviewStore(project, session="other")
    other.decide(PART, ids[:3], "accept")
    _settled(shared)
    other.decide(PART, [ids[3]], "reject")
    LineageStore(project.lineage_dir).compact(["decisions"])
    view = shared.statuses(PART)
    assert [view[i] for i in ids[:5]] == ["accepted"] * 3 + ["rejected", "pending"]
    assert view == ReviewStore(project).statuses(PART)


def test_human_decisions_is_a_copy(review_project):
    project, ids = review_project
    shared = ReviewStore.shared(project)
    shared.decide(PART, [ids[0]], "accept")
    got = shared.human_decisions(PART)
    got.clear()
    assert ids[0] in shared.human_decisions(PART) and shared.statuses(PART)[ids[0]] == "accepted"


def test_the_gate_sees_decisions_made_after_its_first_read(review_project):
    project, ids = review_project
    lineage = LineageStore(project.lineage_dir)
    assert review_check(project, lineage, *PART.key()).metadata["pending"].value == len(ids)
    assert human_decisions(project, lineage, *PART.key()) == {}
    _settled(ReviewStore.shared(project, lineage))
    ReviewStore(project, session="page").bulk(PART, "accept", "below", 9.0)
    check = review_check(project, lineage, *PART.key())
    assert check.passed and check.metadata["accepted"].value == len(ids)
    assert set(human_decisions(project, lineage, *PART.key())) == set(ids)
    assert set(reviewed_statuses(project, lineage, *PART.key(), reader="test").values()) == {"accepted"}


def test_a_coarse_mtime_is_trusted_only_after_its_tick(review_project):
    """On a 1 s (or 2 s) file system a file added in the same tick leaves the folder's mtime as it was:
    a whole-second mtime is trusted only once the listing began more than 2 s after it."""
    project, _ = review_project
    store = ReviewStore(project)
    store.statuses(PART)
    folder = store.lineage.table_dir("decisions")
    whole = (time.time_ns() // 1_000_000_000 - 1) * 1_000_000_000  # the last whole second but one
    os.utime(folder, ns=(whole, whole))
    store._listing("decisions")
    assert not store._unchanged("decisions")
    fine = whole + 123_456_789
    os.utime(folder, ns=(fine, fine))
    store._listing("decisions")
    assert store._unchanged("decisions")
