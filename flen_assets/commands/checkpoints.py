"""Checkpoint selection: `flen eval` prints every checkpoint's scores, `flen promote` overrules the rule's choice."""

from __future__ import annotations

import getpass
from typing import Annotated

import typer

from flen_assets.commands.common import ProjectOpt, check_names, fail, resolve_project
from flen_resources.project import Project, flen_command


def _lora_md5(project: Project, character: str, iteration: str) -> str:
    """The DVC md5 of flux_lora's published version, or a one-line failure saying what to materialize."""
    from flen_resources.storage import DvcError, DvcStore, PartitionMissing

    try:
        return DvcStore(project).published("flux_lora", character, iteration)[1]
    except (PartitionMissing, DvcError):
        fail(f"flux_lora {character}|{iteration} is not materialized: run "
             f"`{flen_command(project, 'materialize', character, iteration, '--all')}` first")


def eval_(character: str, iteration: Annotated[str, typer.Argument(help="Iteration, v1, v2, ...")],
          project: ProjectOpt = None) -> None:
    """Print every checkpoint's identity scores for CHARACTER ITERATION and which one the next steps use."""
    from flen_resources.checkpoint_selection import (
        PROMOTION_RULE,
        checkpoint_table,
        evaluated_scores,
        promotion_in_force,
    )
    from flen_resources.lineage import LineageStore

    check_names(character, iteration)
    proj = resolve_project(project)
    md5 = _lora_md5(proj, character, iteration)
    lineage = LineageStore(proj.lineage_dir)
    scores = evaluated_scores(lineage, character, iteration, md5)
    if not scores:
        fail(f"lora_eval {character}|{iteration} has not evaluated the current LoRA ({md5[:12]}): run "
             f"`{flen_command(proj, 'materialize', character, iteration, '--all', '--from', 'lora_eval')}`")
    promotion = promotion_in_force(lineage, character, iteration, md5)
    typer.echo(f"{character} {iteration}: LoRA {md5[:12]}, {len(scores)} checkpoints on the fixed prompts and seeds")
    typer.echo(checkpoint_table(scores, promotion.step if promotion else None))
    typer.echo(f"in use: {promotion.describe() if promotion else 'the final step (no promotion recorded)'}")
    typer.echo(f"rule: {PROMOTION_RULE}")


def promote(character: str, iteration: Annotated[str, typer.Argument(help="Iteration, v1, v2, ...")],
            step: Annotated[int, typer.Option("--step", help="The checkpoint's step, as `flen eval` lists it.")],
            reason: Annotated[str, typer.Option("--reason", help="Why, recorded with the choice.")] = "",
            project: ProjectOpt = None) -> None:
    """Overrule the promotion rule: the next steps (synthetic_batch, export) use the checkpoint at STEP."""
    from flen_resources.checkpoint_selection import PromotionError, promotion_in_force, record_promotion
    from flen_resources.lineage import LineageStore

    check_names(character, iteration)
    proj = resolve_project(project)
    md5 = _lora_md5(proj, character, iteration)
    lineage = LineageStore(proj.lineage_dir)
    before = promotion_in_force(lineage, character, iteration, md5)
    try:
        promotion = record_promotion(lineage, character, iteration, md5, step, getpass.getuser(), reason)
    except PromotionError as exc:
        fail(str(exc))
    typer.echo(f"{character} {iteration}: {promotion.describe()}"
               + (f" (was {before.describe()})" if before else ""))
    typer.echo("synthetic_batch and export use it from now on; to regenerate the synthetic batch with it: "
               f"`{flen_command(proj, 'materialize', character, iteration, '--all', '--from', 'synthetic_batch')}`")
