"""`python -m flen_assets` is the `flen` CLI."""

from flen_assets.cli import app

app(prog_name="flen")
