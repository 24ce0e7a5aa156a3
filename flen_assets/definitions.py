"""The Dagster code location: every asset, check, job, sensor and resource of FLENwheel."""

from __future__ import annotations

import os

import dagster as dg

from flen_assets.assets import curation, edit_model, enrichment, lora, sources
from flen_assets.console import CONSOLE_LOGGER, flen_console_logger
from flen_assets.dagster_resources import (
    MODEL_FIELDS,
    EditorResource,
    FaceResource,
    GeneratorResource,
    ModelsResource,
    ProjectResource,
    RunSettingsResource,
    TrainerResource,
)
from flen_assets.jobs import SIZED_FLYWHEEL_JOBS, flywheel_job, training_set_job
from flen_assets.launchers import step_executor
from flen_assets.sensors import dead_runs_sensor, inbox_sensor, next_iteration_sensor
from flen_io_managers.partition_folder import PartitionFolderIOManager
from flen_resources.models.registry import MODELS
from flen_resources.run_settings import RUN_SETTINGS_ENV

# Each model setting's environment variable. Set, it reaches ModelsResource through dg.EnvVar (the
# launchpad shows the variable, and it is read when a run starts); unset, the field's default holds.
MODEL_SETTINGS_ENV = {**{field: MODELS[model].setting for model, field in MODEL_FIELDS.items()},
                      "quantization": "FLEN_QUANTIZATION", "device": "FLEN_DEVICE",
                      "memory_budget_gib": "FLEN_MEMORY_BUDGET_GIB"}
INT_SETTINGS = {"memory_budget_gib"}  # read with dg.EnvVar.int


def model_settings() -> ModelsResource:
    """ModelsResource with an EnvVar for each FLEN_* variable that is set (set empty: the default, as unset)."""
    return ModelsResource(**{field: dg.EnvVar.int(var) if field in INT_SETTINGS else dg.EnvVar(var)
                             for field, var in MODEL_SETTINGS_ENV.items() if os.environ.get(var)})


def run_settings(models: ModelsResource) -> RunSettingsResource:
    """RunSettingsResource, its name read from FLEN_RUN_SETTINGS with dg.EnvVar when that is set."""
    if RUN_SETTINGS_ENV in os.environ:
        return RunSettingsResource(models=models, name=dg.EnvVar(RUN_SETTINGS_ENV))
    return RunSettingsResource(models=models)


def local_resources() -> dict[str, object]:
    """The embedded set: a project folder, dlib faces, models from ModelsResource (the tiny pack by default)."""
    models = model_settings()
    return {
        "project": ProjectResource(),
        "faces": FaceResource(),
        "models": models,
        "run_settings": run_settings(models),
        "editor": EditorResource(models=models),
        "generator": GeneratorResource(models=models),
        "trainer": TrainerResource(models=models),
        "partition_io_manager": PartitionFolderIOManager(),
    }


defs = dg.Definitions(
    assets=dg.load_assets_from_modules([sources, enrichment, curation, lora, edit_model]),
    # The review gates (blocking checks on identity_reference, filtered_images, synthetic_batch) are @asset_check functions.
    asset_checks=dg.load_asset_checks_from_modules([sources, curation, lora]),
    jobs=[training_set_job, flywheel_job, *SIZED_FLYWHEEL_JOBS],
    sensors=[inbox_sensor, next_iteration_sensor, dead_runs_sensor],
    resources=local_resources(),
    # FLEN_EXECUTOR=k8s (set by `flen deploy k8s`): one pod per step; unset, Dagster's default executor.
    executor=step_executor(),
    # Dagster's console logger, and the one `flen` runs use (it leaves the stack traces out unless --debug).
    loggers={"console": dg.colored_console_logger, CONSOLE_LOGGER: flen_console_logger},
)
