"""`flen`: the command line of FLENwheel (init, characters, runs, lineage, versions, UI, demo, train, deploy).

This module only assembles the Typer app; the commands live in flen_assets.commands (one module per
topic) and the run engine they call in flen_assets.runs.
"""

from __future__ import annotations

from typing import Annotated

import typer

from flen_assets.commands import (
    characters,
    checkpoints,
    deploy,
    forget,
    iterations,
    lineage,
    materialize,
    models,
    project,
    recipes,
    review,
    train,
)
from flen_assets.commands.common import FlenGroup

app = typer.Typer(help="FLENwheel: a handful of photos -> a faithful, versioned FLUX LoRA.", no_args_is_help=True,
                  pretty_exceptions_enable=False, cls=FlenGroup)


@app.callback()
def options(debug: Annotated[bool, typer.Option(
        "--debug", envvar="FLEN_DEBUG",
        help="Show stack traces: of a failed step (Dagster's log) and of an unexpected error. Without it an error "
             "is one line naming the cause and the fix; a run's trace stays in its event log (Dagster UI, Runs).")]
            = False) -> None:
    """FLENwheel: a handful of photos -> a faithful, versioned FLUX LoRA."""
    from flen_assets.console import show_traces

    show_traces(debug)

app.add_typer(characters.app, name="character")
app.add_typer(iterations.app, name="iteration")
app.add_typer(models.app, name="models")
app.add_typer(recipes.app, name="recipes")
app.add_typer(train.app, name="train")
app.add_typer(deploy.app, name="deploy")
# In this order in `flen --help` (the groups above are listed after the commands).
for command in (project.init, review.review, materialize.materialize, lineage.lineage, lineage.sql, lineage.versions,
                lineage.checkout, project.ui, materialize.iterate, lineage.export, forget.forget, project.demo):
    app.command()(command)
app.command("eval")(checkpoints.eval_)  # `eval` is a Python builtin: the function takes another name
app.command()(checkpoints.promote)


def main() -> None:  # pragma: no cover - console entry
    app()
