"""`flen character add | list | policy`: characters, the `character` partition dimension."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flen_assets.commands.common import ProjectOpt, check_names, fail, resolve_project
from flen_assets.runs import init_project

app = typer.Typer(help="Characters (the `character` partition dimension).", no_args_is_help=True)


@app.command("add")
def character_add(name: str, from_dir: Annotated[Optional[Path], typer.Option(
        "--from", help="Folder of photos to copy in; omit it when they are already in inbox/NAME.")] = None,
                  iteration: str = "v1", project: ProjectOpt = None) -> None:
    """Copy photos into inbox/NAME (originals untouched), or take those already there, and register the character."""
    from flen_assets.partitions import PartitionRefused, add_partitions, check_iteration_order
    from flen_resources.bucket import cluster_bucket
    from flen_resources.intake import IntakeError, add_photos
    from flen_resources.shared_inbox import inbox_key, share_inbox

    check_names(name, iteration)
    if from_dir is not None and not from_dir.is_dir():
        fail(f"{from_dir} is not a folder")
    proj = resolve_project(project)
    try:
        check_iteration_order(proj, name, iteration)
    except PartitionRefused as exc:
        fail(str(exc))
    dest = proj.inbox_for(name)
    if from_dir is None and not (dest.is_dir() and any(dest.iterdir())):
        fail(f"{proj.relative(dest)} holds no photos: put them there, or copy them in with --from FOLDER")
    instance = init_project(proj)
    if from_dir is None:  # source_images vets each file when it ingests (the same rules as --from)
        key = add_partitions(instance, name, iteration)
        typer.echo(f"{sum(1 for _ in dest.iterdir())} file(s) already in {dest}; partition {key} registered")
    else:
        dest.mkdir(parents=True, exist_ok=True)
        try:  # regular files only, each read from one O_NOFOLLOW fd; links, pipes, subfolders refused and recorded
            report = add_photos(from_dir, dest)
        except IntakeError as exc:
            fail(str(exc))
        for refused in report.refused:
            typer.echo(f"refused {refused.message} [{refused.code}]")
        key = add_partitions(instance, name, iteration)
        typer.echo(f"{len(report.copied)} file(s) copied to {dest}; {len(report.refused)} refused; "
                   f"partition {key} registered")
    bucket = cluster_bucket()
    if bucket is not None:  # the cluster: any host's source_images step can ingest them
        shared = share_inbox(dest, bucket, name)
        typer.echo(f"{len(shared.pushed)} file(s) pushed to s3://{inbox_key(bucket, name)}/")


@app.command("list")
def character_list(project: ProjectOpt = None) -> None:
    """List registered characters and iterations."""
    from flen_assets.partitions import character_partitions, iteration_partitions

    instance = init_project(resolve_project(project))
    typer.echo("characters: " + ", ".join(instance.get_dynamic_partitions(character_partitions.name)))
    typer.echo("iterations: " + ", ".join(instance.get_dynamic_partitions(iteration_partitions.name)))


@app.command("policy")
def character_policy_cmd(
        name: str,
        policy: Annotated[Optional[str], typer.Argument(help="auto | required | mixed (omit to show the current one)")]
        = None,
        margin: Annotated[Optional[float], typer.Option(help="mixed: borderline band around the identity threshold.")]
        = None,
        project: ProjectOpt = None) -> None:
    """Show or set a character's review policy (auto, required or mixed)."""
    from flen_assets.review.policy import POLICIES, ReviewPolicy, character_policy, policy_file, set_character_policy

    check_names(name)
    proj = resolve_project(project)
    current = character_policy(proj, name)
    if policy is None and margin is None:
        typer.echo(f"{name}: {current.policy} (margin {current.margin:g})")
        return
    if policy is not None and policy not in POLICIES:
        fail(f"unknown review policy {policy!r}: use one of {', '.join(POLICIES)}")
    try:
        chosen = ReviewPolicy(policy or current.policy, current.margin if margin is None else margin)
    except ValueError as exc:
        fail(str(exc))
    set_character_policy(proj, name, chosen)
    typer.echo(f"{name}: review policy {chosen.policy} (margin {chosen.margin:g}) in {policy_file(proj)}")


@app.command("remove")
def character_remove(
        name: str,
        archive: Annotated[bool, typer.Option(
            "--archive", help="Move its data (partition folders and .dvc pointers, inbox photos, reports) to "
                              "archive/<time>-NAME/ in the project first (kept, never deleted).")] = False,
        project: ProjectOpt = None) -> None:
    """Remove a character partition key (every NAME|vN); refused while it has data, unless --archive."""
    from flen_assets.partitions import PartitionRefused, remove_character

    check_names(name)
    proj = resolve_project(project)
    instance = init_project(proj)
    try:
        archived, where = remove_character(proj, instance, name, archive=archive)
    except PartitionRefused as exc:
        fail(str(exc))
    if where is not None:
        typer.echo(f"{len(archived)} path(s) of {name} moved to {where}")
    typer.echo(f"character {name} removed (its partitions are gone from the Dagster UI; lineage keeps its history)")
