"""`flen iteration remove`: one iteration of a character, the `iteration` partition dimension."""

from __future__ import annotations

from typing import Annotated

import typer

from flen_assets.commands.common import ProjectOpt, check_names, fail, resolve_project
from flen_assets.runs import init_project

app = typer.Typer(help="Iterations (the `iteration` partition dimension).", no_args_is_help=True)


@app.command("remove")
def iteration_remove(
        name: Annotated[str, typer.Argument(help="The character.")],
        iteration: Annotated[str, typer.Argument(help="Its last iteration, e.g. v3.")],
        archive: Annotated[bool, typer.Option(
            "--archive", help="Move its partition folders and .dvc pointers to archive/<time>-NAME-vN/ in the "
                              "project first (kept, never deleted).")] = False,
        project: ProjectOpt = None) -> None:
    """Remove NAME|vN (the character's last iteration); refused while it has data, unless --archive."""
    from flen_assets.partitions import PartitionRefused, remove_iteration

    check_names(name, iteration)
    proj = resolve_project(project)
    instance = init_project(proj)
    try:
        archived, where, key_deleted = remove_iteration(proj, instance, name, iteration, archive=archive)
    except PartitionRefused as exc:
        fail(str(exc))
    if where is not None:
        typer.echo(f"{len(archived)} path(s) of {name}|{iteration} moved to {where}")
    typer.echo(f"{name}|{iteration} removed" + ("" if key_deleted else
               f" ({iteration} stays registered: other characters have data in it)"))
