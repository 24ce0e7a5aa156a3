"""`flen recipes report`: which recipe entries keep the character, per character and across all."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from flen_assets.commands.common import ProjectOpt, check_names, fail, resolve_project

app = typer.Typer(help="Enrichment recipes: how their entries fare at the gates and in review.", no_args_is_help=True)


@app.command("report")
def recipes_report(
        characters: Annotated[Optional[list[str]], typer.Argument(help="Characters (default: every one).")] = None,
        across: Annotated[bool, typer.Option("--across", help="One row per entry over all the characters.")] = False,
        project: ProjectOpt = None) -> None:
    """Per recipe entry (with its LoRA stack): identity pass rate, human acceptance rate, mean identity distance."""
    from flen_resources.recipe_report import recipe_report, report_markdown

    for name in characters or []:
        check_names(name)
    proj = resolve_project(project)
    missing = [c for c in characters or [] if not (proj.data_dir / "filtered_images" / c).is_dir()]
    if missing:
        known = sorted(p.name for p in (proj.data_dir / "filtered_images").glob("*") if p.is_dir())
        fail(f"no gated edits of {', '.join(missing)} in {proj.root}: materialize filtered_images first"
             f" (characters with gated edits: {', '.join(known) or 'none'})")
    stats = recipe_report(proj, characters or [], across=across)
    if not stats:
        fail(f"no gated edits in {proj.root} yet: materialize filtered_images of a character first")
    typer.echo(report_markdown(stats))
