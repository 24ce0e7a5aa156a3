"""What the commands share: the --project option, one-line errors, running a job and reporting its steps."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, Optional, TypeVar

import typer

from flen_assets.runs import REVIEW_CHECKS, RunInterrupted, SelectionError, root_cause
from flen_resources.project import PROJECT_ENV, Project

T = TypeVar("T")

ProjectOpt = Annotated[Optional[Path], typer.Option("--project", help="Project folder (default: $FLEN_PROJECT_DIR or the checkout).")]


def resolve_project(path: Optional[Path]) -> Project:
    """The project of a command: --project DIR, else $FLEN_PROJECT_DIR, else the checkout (Project.discover)."""
    return Project(path.expanduser().resolve()) if path is not None else Project.discover()


def project_option(path: Optional[Path]) -> str:
    """` --project DIR` when the project was chosen with --project or $FLEN_PROJECT_DIR: a command
    printed for the user names it, since a new shell would not know it."""
    if path is None and not os.environ.get(PROJECT_ENV):
        return ""
    return f" --project {shlex.quote(str(resolve_project(path).root))}"


def fail(message: str) -> NoReturn:
    """Say `error: message` on stderr and exit 1: no traceback."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def run_job(project: Project, start: Callable[[], T]) -> T:
    """Run `start` (a run service of flen_assets.runs) for a command: Ctrl-C and a full disk end it with
    one line, not a trace; an unknown --from asset is a usage error."""
    from flen_resources.disk import DiskFullError, disk_full_message, first_full_disk, is_disk_full

    try:
        return start()
    except RunInterrupted as exc:
        typer.secho(f"interrupted: run {exc.run_id} is marked canceled and holds no pool slot; run the same "
                    "command again to resume (finished assets and training checkpoints are kept)",
                    fg=typer.colors.YELLOW, err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # the run's worker thread may still be inside a step: stop it here, as the shell expects
    except SelectionError as exc:
        raise typer.BadParameter(str(exc), param_hint="--from") from None
    except DiskFullError as exc:  # said before the run started
        fail(str(exc))
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        fail(disk_full_message(first_full_disk([project.dagster_home, project.data_dir, project.lineage_dir])))


def report(project: Project, result) -> None:
    """One line per step: what it materialized, or why it failed."""
    from flen_resources.disk import disk_full_message, looks_like_disk_full

    for event in result.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            mat = event.event_specific_data.materialization
            meta = {k: v.value for k, v in mat.metadata.items()
                    if k in ("accepted", "rejected", "pending", "edits", "images", "threshold", "final_loss",
                             "identity_consistency", "generated", "triplets", "trained", "dvc_md5")}
            typer.echo(f"  ✓ {mat.asset_key.to_user_string():20s} {meta}")
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            check = event.event_specific_data
            if check.check_name in REVIEW_CHECKS and not check.passed:
                pending = check.metadata.get("pending")
                typer.secho(f"  ⏸ {check.asset_key.to_user_string():20s} review gate: "
                            f"{pending.value if pending else '?'} image(s) await human review", fg=typer.colors.YELLOW)
        elif event.event_type_value == "STEP_FAILURE":
            message = root_cause(event.event_specific_data.error)
            if "blocking asset check failed" in message and any(c in message for c in REVIEW_CHECKS):
                continue  # said above, as the review gate
            if looks_like_disk_full(message) and "disk full:" not in message:
                message = disk_full_message(project.data_dir)
            typer.secho(f"  ✗ {event.step_key}: {message}", fg=typer.colors.RED)


def print_review_hint(character: str, iteration: str, stops: list[tuple[str, int]], where: str) -> None:
    """What to do when a run stopped at a review gate; `where` is project_option() of the command."""
    from flen_assets.review.store import review_command, review_url

    for asset, pending in stops:
        typer.secho(f"\n{character}|{iteration} stopped at the review gate: {pending} image(s) of {asset} await "
                    "a human decision.", fg=typer.colors.YELLOW, bold=True)
        typer.echo(f"  review them:   {review_command(character, iteration, asset)}{where}")
        typer.echo(f"  then open:     {review_url(character, iteration, asset)}")
        typer.echo(f"  and continue:  flen materialize {character} {iteration} --all --from {asset}{where}"
                   "   (or run the demo again)")

