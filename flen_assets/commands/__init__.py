"""The `flen` commands, one module per topic; flen_assets.cli assembles them into the Typer app.

project (init, ui, demo), characters (character add/list/policy/remove), iterations (iteration remove),
materialize (materialize, iterate), lineage (lineage, sql, versions, checkout, export), checkpoints (eval,
promote), forget, review, models
(models tiny/status), train (train flux);
common holds the --project option, `fail` and the run-report helpers. The engine they call is
flen_assets.runs; a command resolves one Project and passes it down.
"""
