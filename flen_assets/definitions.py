"""The Dagster code location: every asset, check, job, sensor and resource of FLENwheel."""

from __future__ import annotations

import os

import dagster as dg

from flen_assets.assets import curation, edit_model, enrichment, lora, sources
from flen_assets.dagster_resources import (
                                              EditorResource,
                                              FaceResource,
                                              GeneratorResource,
                                              ProjectResource,
                                              TrainerResource,
)
from flen_assets.jobs import flywheel_job, training_set_job
from flen_assets.sensors import dead_runs_sensor, inbox_sensor, next_iteration_sensor
from flen_io_managers.partition_folder import PartitionFolderIOManager

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([sources, enrichment, curation, lora, edit_model]),
    # The review gates (blocking checks on filtered_images and synthetic_batch) are @asset_check functions.
    asset_checks=dg.load_asset_checks_from_modules([curation, lora]),
    jobs=[training_set_job, flywheel_job],
    sensors=[inbox_sensor, next_iteration_sensor, dead_runs_sensor],
    resources={
        "project": ProjectResource(),
        "faces": FaceResource(),
        # The embedded tiny pack unless FLEN_QWEN_EDIT_MODEL / FLEN_FLUX_MODEL name real models
        # (a hub id such as Qwen/Qwen-Image-Edit-2509, or a local folder).
        "editor": EditorResource(qwen_model=os.environ.get("FLEN_QWEN_EDIT_MODEL", "tiny"),
                                 qwen_quantization=os.environ.get("FLEN_QUANTIZATION", "none")),
        "generator": GeneratorResource(flux_model=os.environ.get("FLEN_FLUX_MODEL", "tiny"),
                                       flux_quantization=os.environ.get("FLEN_QUANTIZATION", "none")),
        "trainer": TrainerResource(flux_model=os.environ.get("FLEN_FLUX_MODEL", "tiny"),
                                   qwen_model=os.environ.get("FLEN_QWEN_EDIT_MODEL", "tiny")),
        "partition_io_manager": PartitionFolderIOManager(),
    },
)
