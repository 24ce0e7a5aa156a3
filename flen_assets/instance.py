"""The project's persistent Dagster instance (DAGSTER_HOME under .flen/dagster)."""

from __future__ import annotations

import os

import dagster as dg

from flen_assets.project import Project

# Pools: `gpu` (one big model on the card at a time). Run monitoring frees the slots of runs that
# crashed or were cancelled, which would otherwise block a pool forever.
DAGSTER_YAML = """\
# Written by flen; edit freely, flen only creates it when missing.
telemetry:
  enabled: false
run_monitoring:
  enabled: true
  free_slots_after_run_end_seconds: 60
concurrency:
  pools:
    default_limit: 1
    granularity: op
  runs:
    max_concurrent_runs: 4
"""


def ensure_dagster_home(project: Project) -> str:
    """Create DAGSTER_HOME with dagster.yaml if missing, point the environment at it, return it."""
    home = project.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        tmp = config.with_suffix(".yaml.tmp")
        tmp.write_text(DAGSTER_YAML)
        tmp.replace(config)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault("FLEN_PROJECT_DIR", str(project.root))
    return str(home)


def get_instance(project: Project) -> dg.DagsterInstance:
    """The project's Dagster instance (the same one `flen ui` serves)."""
    ensure_dagster_home(project)
    return dg.DagsterInstance.get()
