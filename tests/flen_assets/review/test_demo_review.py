"""`flen demo` with review policy auto (the default: nothing waits for a human) and required (the
demo stops at v1's review gate and says where to review)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from conftest import run_flen

from flen_assets.review.store import Partition, ReviewStore

pytestmark = pytest.mark.slow


def test_default_demo_is_auto(demo_project):
    for it in ("v1", "v2"):
        rows = pq.read_table(demo_project.partition_dir("filtered_images", "astronaut", it) / "manifest.parquet")
        assert {r["policy_status"] for r in rows.to_pylist()} <= {"accepted", "rejected"}
        assert ReviewStore(demo_project).pending(Partition.of("filtered_images", "astronaut", it)) == 0
    assert (demo_project.data_dir / "training_set" / "astronaut" / "v2.dvc").is_file()


def test_demo_with_required_review_stops_at_the_gate(tmp_path):
    root = tmp_path / "project"
    root.mkdir()
    out = run_flen("demo", "--review", "required", "--iterations", "1", project=root).stdout
    assert "review policy of astronaut: required" in out
    # First stop: the other person among the sources waits for a human at identity_reference's gate.
    assert "astronaut|v1 stopped at the review gate" in out
    assert "http://127.0.0.1:8765/review/astronaut/v1/identity_reference" in out
    assert not (root / "data" / "filtered_images").exists() and not (root / "data" / "training_set").exists()
    from flen_resources.project import Project

    store = ReviewStore(Project(root))
    sources = Partition.of("identity_reference", "astronaut", "v1")
    waiting = [i for i in store.items(sources) if i["status"] == "pending"]
    assert [i["title"] for i in waiting] == ["source photo · grace_hopper.jpg"]
    store.decide(sources, [waiting[0]["id"]], "reject")
    # Second stop, once the source is decided: the edits that passed the gates wait for a human.
    out = run_flen("demo", "--review", "required", "--iterations", "1", project=root).stdout
    assert "astronaut|v1 stopped at the review gate" in out
    assert "flen review astronaut --iteration v1" in out
    assert "http://127.0.0.1:8765/review/astronaut/v1/filtered_images" in out
    assert not (root / "data" / "training_set").exists()
    items = store.items(Partition.of("filtered_images", "astronaut", "v1"))
    pending = [i for i in items if i["status"] == "pending"]
    # The classic edits of the astronaut pass the gates and wait for a human; the tiny pack's noise does not.
    assert pending and all(i["model"] == "classic/1" and i["parents"][0]["kind"] == "image" for i in pending)
    assert all(i["status"] == "rejected" for i in items if i["model"].startswith("tiny/"))
