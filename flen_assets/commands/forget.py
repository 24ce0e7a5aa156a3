"""`flen forget`: remove one photo and everything derived from it (right to erasure)."""

from __future__ import annotations

from typing import Annotated

import typer

from flen_assets.commands.common import ProjectOpt, fail, resolve_project


def forget(photo: Annotated[str, typer.Argument(help="A photo file, or the sha256 of its bytes.", metavar="PHOTO_OR_SHA256")],
           yes: Annotated[bool, typer.Option("--yes", help="Remove it all (without it: only list what would go).")] = False,
           project: ProjectOpt = None) -> None:
    """List everything derived from a photo (a dry run); with --yes remove it from the data, the DVC cache and
    local remote, the inbox and lineage, and mark the partitions to materialize again."""
    from flen_assets.partitions import wipe_partitions
    from flen_assets.runs import init_project
    from flen_resources.forget import (
        ForgetError,
        erasure_of,
        execute_forget,
        pending_plan,
        photo_id,
        plan_forget,
    )
    from flen_resources.lineage import LineageStore
    from flen_resources.storage import DvcStore

    proj = resolve_project(project)
    try:
        target = photo_id(photo)
    except ForgetError as exc:
        fail(str(exc))
    store = LineageStore(proj.lineage_dir)
    dvc = DvcStore(proj)
    remote = dvc.local_remote()
    plan = pending_plan(proj, target)  # an erasure that was interrupted: finish that one
    if plan is None:
        done_at = erasure_of(store, target)
        if done_at is not None:
            typer.echo(f"{target} was forgotten on {done_at}: nothing left to remove")
            return
        try:
            plan = plan_forget(proj, store, target, remote)
        except ForgetError as exc:
            fail(str(exc))
    else:
        typer.echo(f"an erasure of {target} was interrupted: {'finishing' if yes else 'it would finish'} it")
    _show(plan)
    if not yes:
        typer.echo("dry run: nothing was changed; add --yes to remove all of it")
        return
    instance = init_project(proj)
    try:
        done = execute_forget(proj, store, plan, remote, has_remote=remote is not None or _has_remote(proj),
                              dvc_lock=dvc._lock, wipe=lambda parts: wipe_partitions(instance, parts))
    except ForgetError as exc:
        fail(str(exc))
    typer.echo(f"forgotten: {done.partitions} partition(s) removed (materialize them again), {done.objects} DVC "
               f"object(s) deleted, {done.lineage_rows} lineage row(s) rewritten away; the erasure is recorded by hash")
    if done.remote_note:
        typer.secho(f"note: {done.remote_note}", fg=typer.colors.YELLOW, err=True)


def _has_remote(project) -> bool:
    import configparser

    config = configparser.ConfigParser()
    config.read([project.root / ".dvc" / "config", project.root / ".dvc" / "config.local"])
    return config.get("core", "remote", fallback=None) is not None


def _show(plan) -> None:
    """The plan, grouped by partition."""
    typer.echo(f"photo {plan.target}: {len(plan.derived_ids)} image(s) derived from it (itself included)")
    images = plan.images
    for asset, character, iteration in plan.partition_keys():
        key = f"{asset} {character}|{iteration}"
        ids = images.get(key, [])
        versions = [m for a, c, i, m in plan.versions if (a, c, i) == (asset, character, iteration)]
        what = f"{len(ids)} derived image(s)" if ids else "derived from them (whole partition)"
        typer.echo(f"  {key:36s} {what}; version(s) {', '.join(m[:12] for m in versions) or 'none published'}")
        for image_id in sorted(ids):
            typer.echo(f"      {image_id}")
    for key in sorted(set(images) - {f"{a} {c}|{i}" for a, c, i in plan.partition_keys()}):
        typer.echo(f"  {key:36s} {len(images[key])} derived image(s) (no partition left)")
    typer.echo(f"  DVC objects (cache and local remote): {len(plan.objects)}")
    for label, paths in (("inbox copies", plan.inbox_files), ("training checkpoints", plan.run_folders),
                         ("copies elsewhere (exports)", plan.other_files)):
        typer.echo(f"  {label}: {', '.join(paths) if paths else 'none'}")
