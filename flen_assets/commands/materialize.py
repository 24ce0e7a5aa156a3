"""`flen materialize` and `flen iterate`: run the jobs of a partition on the project's instance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from flen_assets.commands.common import (
    ProjectOpt,
    SettingsOpt,
    check_names,
    check_settings,
    fail,
    fail_run,
    print_review_hint,
    report,
    resolve_project,
    run_job,
)
from flen_assets.runs import (
    NothingToIterate,
    OutOfTurn,
    iterate_character,
    materialize_partition,
    review_gate_stops,
    with_run_settings,
)


def _run_config(config: Optional[Path]) -> dict | None:
    """The --config file (JSON or YAML), or None; one error line when it cannot be read."""
    import yaml

    if config is None:
        return None
    try:
        loaded = yaml.safe_load(config.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"--config {config}: cannot be read ({exc.strerror if isinstance(exc, OSError) else exc}): "
             "pass a readable JSON or YAML file")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        fail(f"--config {config} is not valid JSON or YAML{where}: {getattr(exc, 'problem', None) or exc}")
    if loaded is not None and not isinstance(loaded, dict):
        fail(f"--config {config} holds a {type(loaded).__name__}, not a run config mapping (ops: ..., resources: ...)")
    return loaded


def materialize(character: str, iteration: Annotated[str, typer.Argument(help="Iteration, v1, v2, ...")] = "v1",
                project: ProjectOpt = None,
                config: Annotated[Optional[Path], typer.Option(help="Run config (JSON or YAML).")] = None,
                whole: Annotated[bool, typer.Option("--all", help="The whole iteration (flywheel_job): LoRA, "
                                                    "evaluation, synthetic batch, triplets, qwen adapter.")] = False,
                start_at: Annotated[Optional[str], typer.Option(
                    "--from", help="Only this asset and what is downstream of it, e.g. filtered_images after a "
                                   "review (the edits are not made again).")] = None,
                settings: SettingsOpt = None,
                restart: Annotated[bool, typer.Option(
                    "--restart", help="Rebuild every asset even when the last run of this command died or was "
                                      "stopped midway (by default it resumes after the assets that run finished).")]
                = False,
                ) -> None:
    """Materialize sources -> training set (or, with --all, the whole iteration) for CHARACTER ITERATION."""
    check_names(character, iteration)
    run_config = with_run_settings(_run_config(config), check_settings(settings))
    proj = resolve_project(project)
    job_name = "flywheel_job" if whole else "training_set_job"
    try:
        result = run_job(proj, lambda: materialize_partition(proj, character, iteration, run_config, job_name,
                                                             start_at, log=typer.echo, restart=restart))
    except OutOfTurn as exc:
        fail(str(exc))
    report(proj, result)
    if not result.success:
        stops = review_gate_stops(result)
        if stops:
            print_review_hint(proj, character, iteration, stops)
            fail(f"run {result.run_id} stopped at the review gate")
        fail_run(proj, result, character, iteration)
    typer.echo(f"run {result.run_id} succeeded")


def iterate(character: str, project: ProjectOpt = None,
            config: Annotated[Optional[Path], typer.Option(help="Run config (JSON or YAML).")] = None,
            settings: SettingsOpt = None) -> None:
    """Add the next iteration of CHARACTER (v(N+1) after the last complete vN) and run it."""
    check_names(character)
    run_config = with_run_settings(_run_config(config), check_settings(settings))
    proj = resolve_project(project)
    try:
        nxt, result = run_job(proj, lambda: iterate_character(proj, character, run_config, log=typer.echo))
    except (NothingToIterate, OutOfTurn) as exc:
        fail(str(exc))
    report(proj, result)
    if not result.success:
        fail_run(proj, result, character, nxt)
    typer.echo(f"{character}|{nxt} done (run {result.run_id})")
