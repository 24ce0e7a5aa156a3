"""A character's inbox shared through the bucket (moto's S3 server): regular files travel, links and odd names do not."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_servers import s3_server

from flen_resources.bucket import Bucket, BucketError, MissingObject
from flen_resources.deployment import ClusterSettings
from flen_resources.shared_inbox import inbox_key, share_inbox

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def bucket() -> Iterator[Bucket]:
    with s3_server() as s3, pytest.MonkeyPatch.context() as mp:
        for key, value in s3.env().items():
            mp.setenv(key, value)
        yield Bucket(ClusterSettings("127.0.0.1", 5432, "u", "d", s3.bucket, "inbox-test", s3.endpoint_url, "us-east-1"))


def test_photos_received_on_one_host_reach_the_other(bucket: Bucket, tmp_path: Path) -> None:
    host_a, host_b = tmp_path / "a" / "alice", tmp_path / "b" / "alice"
    host_a.mkdir(parents=True)
    (host_a / "front.jpg").write_bytes(b"front")
    (host_a / "side.png").write_bytes(b"side")
    (tmp_path / "secret.txt").write_text("not a photo of alice")
    os.symlink(tmp_path / "secret.txt", host_a / "link.jpg")  # refused by intake: never leaves host A

    first = share_inbox(host_a, bucket, "alice")
    assert first.pushed == ["front.jpg", "side.png"] and first.fetched == []
    assert bucket.names(inbox_key(bucket, "alice")) == {"front.jpg", "side.png"}

    (host_b / "back.jpg").parent.mkdir(parents=True)
    (host_b / "back.jpg").write_bytes(b"back")
    second = share_inbox(host_b, bucket, "alice")
    assert second.pushed == ["back.jpg"] and second.fetched == ["front.jpg", "side.png"]
    assert (host_b / "front.jpg").read_bytes() == b"front" and not (host_b / "link.jpg").exists()
    again = share_inbox(host_a, bucket, "alice")
    assert again.fetched == ["back.jpg"] and again.pushed == []  # a rerun moves only what is new
    assert share_inbox(host_a, bucket, "alice") == type(again)([], [])


def test_objects_with_folder_or_hidden_names_are_not_fetched(bucket: Bucket, tmp_path: Path) -> None:
    base = inbox_key(bucket, "bob")
    bucket.put(f"{base}/ok.jpg", b"ok")
    bucket.put(f"{base}/.hidden.jpg", b"hidden")
    inbox = tmp_path / "bob"
    assert share_inbox(inbox, bucket, "bob").fetched == ["ok.jpg"]
    assert sorted(p.name for p in inbox.iterdir()) == ["ok.jpg"]
    with pytest.raises(ValueError):
        inbox_key(bucket, "../carol")  # a character name cannot leave the inbox folder


def test_a_missing_object_and_an_unreachable_endpoint_are_named(bucket: Bucket) -> None:
    with pytest.raises(MissingObject, match="s3://.*/inbox-test/nothing is missing from the bucket"):
        bucket.get(f"{bucket.settings.bucket}/inbox-test/nothing")
    closed = Bucket(ClusterSettings("h", 1, "u", "d", "flen-cluster", "p", "http://127.0.0.1:9", "us-east-1"))
    with pytest.raises(BucketError, match="cannot reach the bucket s3://flen-cluster/p at http://127.0.0.1:9"):
        closed.check()
