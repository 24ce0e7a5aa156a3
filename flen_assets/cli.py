"""`flen`: the command line of FLENwheel (init, characters, runs, lineage, versions, UI, demo, train).

This module only assembles the Typer app; the commands live in flen_assets.commands (one module per
topic) and the run engine they call in flen_assets.runs.
"""

from __future__ import annotations

import typer

from flen_assets.commands import characters, lineage, materialize, models, project, review, train

app = typer.Typer(help="FLENwheel: a handful of photos -> a faithful, versioned FLUX LoRA.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
app.add_typer(characters.app, name="character")
app.add_typer(models.app, name="models")
app.add_typer(train.app, name="train")
# In this order in `flen --help` (the groups above are listed after the commands).
for command in (project.init, review.review, materialize.materialize, lineage.lineage, lineage.sql, lineage.versions,
                lineage.checkout, project.ui, materialize.iterate, lineage.export, project.demo):
    app.command()(command)


def main() -> None:  # pragma: no cover - console entry
    app()
