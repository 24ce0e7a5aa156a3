"""Lineage and versions: `flen lineage`, `sql`, `versions`, `checkout` and `export`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from flen_assets.commands.common import ProjectOpt, check_names, fail, resolve_project


def lineage(character: str, iteration: str, asset: str = "training_set", project: ProjectOpt = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows instead of a tree.")] = False) -> None:
    """Trace every image of a partition back to the source files, with the operations applied."""
    from flen_resources.lineage import LineageStore

    check_names(character, iteration)
    proj = resolve_project(project)
    store = LineageStore(proj.lineage_dir)
    rows = store.trace(character, iteration, asset)
    if as_json:
        typer.echo(json.dumps(rows, indent=1, default=str))
        return
    if not rows:
        fail(f"no lineage for {asset} {character}|{iteration}: {store.unpublished_reason(asset, character, iteration)}")
    from flen_assets.lineage_view import render_header, render_tree

    runs = store.rows("SELECT asset, params, models FROM runs WHERE character=$c AND iteration=$i "
                      "QUALIFY row_number() OVER (PARTITION BY asset ORDER BY finished_at DESC) = 1",
                      {"c": character, "i": iteration})
    artifacts = {r["asset"]: r["dvc_md5"] for r in store.rows(
        "SELECT asset, dvc_md5 FROM latest_artifacts WHERE character=$c AND iteration=$i",
        {"c": character, "i": iteration})}
    typer.echo(render_header(runs, artifacts, character, iteration))
    typer.echo("")
    typer.echo(render_tree(asset, character, iteration, rows))


def sql(query: str, project: ProjectOpt = None) -> None:
    """Run SQL against the lineage views (runs, artifacts, images, edges, members, decisions, metrics)."""
    from flen_resources.lineage import LineageStore

    with LineageStore(resolve_project(project).lineage_dir).connect() as con:
        try:
            typer.echo(str(con.sql(query)))  # DuckDB's own table rendering
        except Exception as exc:  # duckdb raises one type per SQL error class
            fail(f"SQL error: {exc}")


def versions(asset: str, character: str, iteration: str, project: ProjectOpt = None) -> None:
    """List the published versions (DVC md5) of one partition, newest first."""
    from flen_resources.lineage import LineageStore

    store = LineageStore(resolve_project(project).lineage_dir)
    rows = store.rows(
        "SELECT created_at, dvc_md5, n_files, run_id FROM artifacts WHERE asset=$a AND character=$c AND iteration=$i "
        "ORDER BY created_at DESC", {"a": asset, "c": character, "i": iteration})
    if not rows:
        fail(f"no published version of {asset} {character}|{iteration}: "
             f"{store.unpublished_reason(asset, character, iteration)}")
    for r in rows:
        typer.echo(f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {r['dvc_md5']}  {r['n_files']:5d} files  run {r['run_id'][:8]}")


def checkout(asset: str, character: str, iteration: str,
             md5: Annotated[str, typer.Argument(help="DVC md5 from `flen versions`, or a unique prefix of 8+ hex.")],
             project: ProjectOpt = None) -> None:
    """Restore an earlier version (by DVC md5, see `flen versions`) of a partition folder."""
    from flen_resources.lineage import LineageStore, VersionLookupError
    from flen_resources.storage import DvcStore

    proj = resolve_project(project)
    try:
        version = LineageStore(proj.lineage_dir).find_version(asset, character, iteration, md5)
    except VersionLookupError as exc:
        fail(str(exc))
    path = DvcStore(proj).restore(asset, character, iteration, version.dvc_file)
    typer.echo(f"restored {path} to {version.dvc_md5}")


def export(character: str, iteration: str, dest: Annotated[Path, typer.Option("--to", help="Folder to write.")],
           project: ProjectOpt = None) -> None:
    """Write a training folder that ai-toolkit and kohya accept (images + same-name .txt), the LoRA files, and
    Hugging Face model and dataset cards (README.md)."""
    from flen_resources.export import ExportError, export_iteration

    check_names(character, iteration)
    proj = resolve_project(project)
    try:
        done = export_iteration(proj, character, iteration, dest)
    except ExportError as exc:
        fail(str(exc))
    typer.echo(f"{done.images} images with captions and a dataset card in {done.folder / 'dataset'}")
    typer.echo(f"LoRA files: {', '.join(done.lora_files) or 'none (not trained)'}"
               + (f"; model card: {done.model_card}" if done.model_card else ""))
