"""A character's inbox in the cluster's bucket, so that any host can ingest photos another host received.

The bucket holds bucket/prefix/inbox/<character>/<name>; a host pushes the regular files of its own
inbox the bucket lacks and fetches those it lacks. Only regular files travel (read from one
O_NOFOLLOW fd, as intake reads them): a link in an inbox stays on its host and is refused there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from flen_resources.atomic import atomic_path
from flen_resources.bucket import Bucket
from flen_resources.intake import open_photo_folder
from flen_resources.project import validate_slug


@dataclass(frozen=True)
class InboxShare:
    """What one share did: the names pushed to the bucket and fetched from it."""

    pushed: list[str]
    fetched: list[str]


def inbox_key(bucket: Bucket, character: str, name: str = "") -> str:
    """The bucket key of a character's inbox folder, or of one photo in it."""
    return "/".join([bucket.settings.bucket, bucket.settings.prefix, "inbox", validate_slug(character),
                     *([name] if name else [])])


def _safe_name(name: str) -> bool:
    """A plain file name: no folder part, no hidden or dot-dot name (an object named by hand cannot escape)."""
    return bool(name) and name == os.path.basename(name) and not name.startswith(".") and "\x00" not in name


def share_inbox(inbox: Path, bucket: Bucket, character: str) -> InboxShare:
    """Push the inbox's regular files the bucket lacks, then fetch the bucket's photos the inbox lacks."""
    remote = bucket.names(inbox_key(bucket, character))
    pushed: list[str] = []
    local: set[str] = set()
    if inbox.exists() or inbox.is_symlink():  # a link in place of the inbox: open_photo_folder refuses it
        with open_photo_folder(inbox, follow=False) as folder:
            local = set(folder.files) | {r.name for r in folder.refused}
            for name in sorted(set(folder.files) - remote):
                if _safe_name(name):
                    bucket.put(inbox_key(bucket, character, name), folder.read(name))
                    pushed.append(name)
    fetched: list[str] = []
    for name in sorted(remote - local):
        if _safe_name(name):
            inbox.mkdir(parents=True, exist_ok=True)
            with atomic_path(inbox / name) as tmp:
                tmp.write_bytes(bucket.get(inbox_key(bucket, character, name)))
            fetched.append(name)
    return InboxShare(pushed, fetched)
