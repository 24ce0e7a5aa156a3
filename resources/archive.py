"""What a character, or one iteration of it, holds in a project, and moving it into archive/ (never deleted).

`flen character remove NAME` and `flen iteration remove NAME vN` refuse while any of it exists; with
--archive it moves here first: archive/<UTC time>-<what>/ mirrors the project's paths
(data/<asset>/<character>/<vN>/, its .dvc pointer, inbox/<character>/, data/reports/...-<character>.csv),
so a pointer can restore its folder from the DVC cache (`dvc checkout archive/.../vN.dvc`), or a
folder can be moved back by hand.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from flen_resources.project import ITERATION_RE, Project, iteration_number, validate_iteration, validate_slug

ARCHIVE_DIR = "archive"


def archive_dir(project: Project) -> Path:
    return project.root / ARCHIVE_DIR


def iterations_with_data(project: Project, character: str) -> list[str]:
    """The iterations (v1, v2, ...) of `character` with a folder or a .dvc pointer under any asset, in order."""
    validate_slug(character)
    found = set()
    for asset in _asset_dirs(project):
        folder = asset / character
        for entry in folder.iterdir() if folder.is_dir() else []:
            name = entry.name[:-4] if entry.name.endswith(".dvc") else entry.name
            if ITERATION_RE.match(name):
                found.add(name)
    return sorted(found, key=iteration_number)


def characters_with_data(project: Project, iteration: str | None = None) -> list[str]:
    """The characters with a partition folder or pointer under any asset (of `iteration` when given)."""
    found = set()
    for asset in _asset_dirs(project):
        for folder in asset.iterdir():
            if folder.is_dir() and not folder.is_symlink() and (
                    iteration is None and any(True for _ in folder.iterdir())
                    or iteration is not None and ((folder / iteration).exists() or (folder / f"{iteration}.dvc").exists())):
                found.add(folder.name)
    return sorted(found)


def character_paths(project: Project, character: str) -> list[Path]:
    """Everything of `character`: each asset's partition folders and pointers, its inbox and its reports."""
    validate_slug(character)
    paths = [p for it in iterations_with_data(project, character) for p in iteration_paths(project, character, it)]
    inbox = project.inbox_for(character)
    if inbox.exists():
        paths.append(inbox)
    reports = project.data_dir / "reports"
    paths += sorted(p for p in reports.glob(f"*-{character}.*") if p.is_file()) if reports.is_dir() else []
    return paths


def iteration_paths(project: Project, character: str, iteration: str) -> list[Path]:
    """data/<asset>/<character>/<iteration> and its .dvc pointer, for every asset that has them."""
    validate_slug(character)
    validate_iteration(iteration)
    paths = []
    for asset in _asset_dirs(project):
        folder = project.partition_dir(asset.name, character, iteration)
        pointer = folder.with_name(f"{iteration}.dvc")
        paths += [p for p in (folder, pointer) if p.exists() or p.is_symlink()]
    return paths


def move_to_archive(project: Project, paths: list[Path], label: str) -> Path:
    """Move `paths` (inside the project) to archive/<UTC time>-<label>/, keeping their relative paths;
    a moved partition folder's entry leaves its DVC .gitignore and is written next to it in the archive.
    Returns the archive folder."""
    validate_slug(label.replace("|", "-"), "archive label")
    root = project.root.resolve()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dest_root = archive_dir(project) / f"{stamp}-{label.replace('|', '-')}"
    dest_root.mkdir(parents=True)
    for path in paths:
        rel = path.parent.resolve().relative_to(root) / path.name  # refuses a path outside the project
        if rel.parts[0] == ARCHIVE_DIR:
            raise ValueError(f"{path} is already in the archive")
        dest = dest_root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, dest)  # the archive is inside the project: same filesystem, one rename
        if path.parent.parent.parent.resolve() == project.data_dir.resolve() and ITERATION_RE.match(path.name):
            _move_gitignore_entry(path.parent / ".gitignore", dest.parent / ".gitignore", f"/{path.name}")
    for path in paths:  # data/<asset>/<character>/ left empty (or holding only an emptied .gitignore)
        _remove_empty(path.parent, stop=root)
    return dest_root


def _asset_dirs(project: Project) -> list[Path]:
    data = project.data_dir
    return sorted(p for p in data.iterdir() if p.is_dir() and not p.is_symlink()
                  and not p.name.startswith(".") and p.name != "reports") if data.is_dir() else []


def _move_gitignore_entry(source: Path, dest: Path, entry: str) -> None:
    """DVC lists a tracked folder in its parent's .gitignore: the entry moves with the folder."""
    if source.is_file():
        lines = source.read_text().splitlines()
        kept = [line for line in lines if line.strip() != entry]
        if kept != lines:
            if any(line.strip() for line in kept):
                source.write_text("\n".join(kept) + "\n")
            else:
                source.unlink()
    with open(dest, "a") as f:
        f.write(entry + "\n")


def _remove_empty(folder: Path, stop: Path) -> None:
    """Remove `folder` and its parents while empty, up to (not including) data/ and inbox/."""
    keep = {stop, stop / "data", stop / "inbox"}
    while folder.resolve() not in keep and folder.is_dir():
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent
