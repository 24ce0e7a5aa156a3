"""What the commands share: the --project option, one-line errors, running a job and reporting its steps."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn, Optional, TypeVar

import typer
from typer.core import TyperGroup
from typer.exceptions import TyperException

from flen_assets.partitions import PartitionRefused
from flen_assets.runs import REVIEW_CHECKS, RunInterrupted, SelectionError, is_review_stop, root_cause
from flen_resources.project import (
    PROJECT_ENV,
    InvalidNameError,
    Project,
    flen_command,
    validate_iteration,
    validate_slug,
)

T = TypeVar("T")

ProjectOpt = Annotated[Optional[Path], typer.Option("--project", help="Project folder (default: $FLEN_PROJECT_DIR or the checkout).")]
SettingsOpt = Annotated[Optional[str], typer.Option(
    "--settings", help="Run settings that size the work: auto (cpu-demo on a CPU or with the tiny pack, else by the "
                       "card's memory), cpu-demo, 24gb-card or large-card. Default: $FLEN_RUN_SETTINGS, else auto.")]


def check_settings(name: str | None) -> str | None:
    """`name` when it is None, auto or a run settings name; else fail with one line and a did-you-mean."""
    from flen_resources.run_settings import RunSettingsError, check_setting

    if name is None:
        return None
    try:
        return check_setting(name)
    except RunSettingsError as exc:
        fail(str(exc).replace("set FLEN_RUN_SETTINGS (or --settings) to", "--settings takes"))


def resolve_project(path: Optional[Path], create: bool = False) -> Project:
    """The project of a command: --project DIR, else $FLEN_PROJECT_DIR, else the checkout (Project.discover).

    Its folder must exist and be writable (`create`: `flen init` and `flen demo` may make it), or the
    command ends with one line saying which folder and what to do, before anything is written."""
    project = Project(path.expanduser().resolve()) if path is not None else Project.discover()
    given = "--project" if path is not None else f"${PROJECT_ENV}" if os.environ.get(PROJECT_ENV) else "the current folder"
    root = project.root
    if root.exists() and not root.is_dir():
        fail(f"project folder {root} ({given}) is not a folder: pass --project DIR (or set {PROJECT_ENV}) "
             "to a project folder")
    if not root.exists():
        if create:
            return project
        fail(f"project folder {root} ({given}) does not exist or cannot be reached: pass --project DIR (or set "
             f"{PROJECT_ENV}) to an existing project, or create one with `{flen_command(root, 'init')}`")
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        fail(f"project folder {root} ({given}) cannot be written by this user: fix its permissions "
             "(it holds data/, inbox/ and .flen/) or pass --project DIR to another project")
    return project


def check_names(character: str, iteration: str | None = None) -> None:
    """Fail with one line unless `character` is a valid slug and `iteration` (when given) a valid vN."""
    try:
        validate_slug(character)
        if iteration is not None:
            validate_iteration(iteration)
    except InvalidNameError as exc:
        fail(str(exc))


def fail(message: str) -> NoReturn:
    """Say `error: message` on stderr and exit 1: no traceback. The message names the cause and the fix."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def error_line(exc: BaseException) -> str:
    """One line for an exception: FLENwheel's own errors carry the cause and the fix in their first line;
    another keeps its class name."""
    lines = str(exc).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if type(exc).__module__.startswith("flen_") and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FlenGroup(TyperGroup):
    """The `flen` app: an error no command expected ends the command with one line, its trace only
    with --debug (FLEN_DEBUG=1)."""

    def invoke(self, ctx):  # noqa: ANN001 - click's signature
        from flen_assets.console import traces_shown

        try:
            return super().invoke(ctx)
        # BrokenPipeError: the reader left early (`flen ... | head`); typer's main ends silently, status 1.
        except (typer.Exit, typer.Abort, TyperException, BrokenPipeError):
            raise
        except Exception as exc:
            if traces_shown():
                raise
            if _is_deployment_error(exc):  # a setting or server of the deployment: expected, said in one line
                fail(error_line(exc))
            if _is_config_error(exc):
                fail(f"invalid run config: {_config_error_text(exc)}: fix the --config file (its keys and "
                     "values are listed in the Dagster UI's launchpad)")
            typer.secho(f"error: {error_line(exc)}  (unexpected: `flen --debug ...` shows the trace)",
                        fg=typer.colors.RED, err=True)
            raise typer.Exit(1) from None


def _is_deployment_error(exc: Exception) -> bool:
    from flen_resources.bucket import BucketError
    from flen_resources.deployment import DeploymentError

    return isinstance(exc, (DeploymentError, BucketError))


def _is_config_error(exc: Exception) -> bool:
    from dagster._core.errors import DagsterInvalidConfigError

    return isinstance(exc, DagsterInvalidConfigError)


def _config_error_text(exc) -> str:
    errors = getattr(exc, "errors", None) or []
    return "; ".join(e.message.rstrip(".") for e in errors[:3]) or error_line(exc)


def trace_hint(run_id: str) -> None:
    """Where the trace of a failed run is: the run's event log (Dagster UI), or this terminal with --debug."""
    from flen_assets.console import traces_shown

    where = "above and in" if traces_shown() else "in"
    typer.echo(f"run {run_id}: the trace is {where} its event log: `flen ui`, then Runs > {run_id[:8]}"
               + ("" if traces_shown() else " (or run the command again with `flen --debug`)"), err=True)


def fail_run(project: Project, result, character: str, iteration: str, what: str = "failed") -> NoReturn:
    """The end of a failed run: where its trace is, then one error line naming the failed step, its
    partition, the cause and (for a known cause) the fix."""
    from flen_assets.review.store import review_command
    from flen_assets.runs import failed_steps, review_gate_stops

    steps = failed_steps(result)
    if not steps and review_gate_stops(result):
        fail(f"run {result.run_id} stopped at the review gate: `{review_command(project, character, iteration)}`, "
             "then run it again")
    trace_hint(result.run_id)
    if not steps:
        fail(f"run {result.run_id} {what}")
    step, cause = steps[0]
    fail(f"{step} {character}|{iteration}: {cause}")


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
    except PartitionRefused as exc:  # an unknown character, a skipped iteration: nothing was registered
        fail(str(exc))
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
            if is_review_stop(event.event_specific_data.error):
                continue  # said above, as the review gate
            message = root_cause(event.event_specific_data.error)
            if looks_like_disk_full(message) and "disk full:" not in message:
                message = disk_full_message(project.data_dir)
            typer.secho(f"  ✗ {event.step_key}: {message}", fg=typer.colors.RED)


def print_review_hint(project: Project, character: str, iteration: str, stops: list[tuple[str, int]]) -> None:
    """What to do when a run stopped at a review gate (each command names the project: flen_command)."""
    from flen_assets.review.store import review_command, review_url

    for asset, pending in stops:
        typer.secho(f"\n{character}|{iteration} stopped at the review gate: {pending} image(s) of {asset} await "
                    "a human decision.", fg=typer.colors.YELLOW, bold=True)
        typer.echo(f"  review them:   {review_command(project, character, iteration, asset)}")
        typer.echo(f"  then open:     {review_url(character, iteration, asset)}")
        typer.echo(f"  and continue:  {flen_command(project, 'materialize', character, iteration, '--all', '--from', asset)}"
                   "   (or run the demo again)")

