"""Jobs: the chain of one iteration, from inbox to training set; the whole iteration, sized for the machine."""

from __future__ import annotations

import dagster as dg

from flen_assets.partitions import character_iteration
from flen_resources.run_settings import RUN_SETTINGS

TRAINING_SET_ASSETS = ["source_images", "identity_reference", "enriched_images", "filtered_images", "training_set"]

training_set_job = dg.define_asset_job(
    "training_set_job",
    selection=dg.AssetSelection.assets(*TRAINING_SET_ASSETS),
    partitions_def=character_iteration,
    description="Ingest, enrich, gate and caption one character x iteration.",
)

flywheel_job = dg.define_asset_job(
    "flywheel_job",
    selection=dg.AssetSelection.all(),
    partitions_def=character_iteration,
    description="One whole iteration: training set, FLUX LoRA, its evaluation and synthetic batch, edit "
                "triplets and the Qwen-Image-Edit adapter. Sized by the run settings `auto` picks for the machine "
                "(FLEN_RUN_SETTINGS); the flywheel_<settings> jobs open with a named size in the launchpad.",
)


def sized_flywheel_job(name: str) -> dg.UnresolvedAssetJobDefinition:
    """flywheel_job whose launchpad opens with the named run settings spelled out (editable there)."""
    settings = RUN_SETTINGS[name]
    return dg.define_asset_job(
        f"flywheel_{name.replace('-', '_')}",
        selection=dg.AssetSelection.all(),
        partitions_def=character_iteration,
        config=settings.run_config(),
        tags={"flen/run_settings": name},
        description=f"One whole iteration, run settings {name}: {settings.title}",
    )


# flywheel_cpu_demo, flywheel_24gb_card, flywheel_large_card
SIZED_FLYWHEEL_JOBS = [sized_flywheel_job(name) for name in RUN_SETTINGS]
