"""Small helpers shared by tests (imported as `tests_helpers`)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
