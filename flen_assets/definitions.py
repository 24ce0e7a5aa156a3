"""The Dagster code location: every asset, check, job, sensor and resource of FLENwheel."""

from __future__ import annotations

import dagster as dg

from flen_assets.assets import curation, enrichment, sources
from flen_assets.jobs import training_set_job
from flen_assets.sensors import inbox_sensor
from flen_io_managers.partition_folder import PartitionFolderIOManager
from flen_resources.dagster_resources import EditorResource, FaceResource, ProjectResource

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([sources, enrichment, curation]),
    jobs=[training_set_job],
    sensors=[inbox_sensor],
    resources={
        "project": ProjectResource(),
        "faces": FaceResource(),
        "editor": EditorResource(),
        "partition_io_manager": PartitionFolderIOManager(),
    },
)
