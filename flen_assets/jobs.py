"""Jobs: the chain of one iteration, from inbox to training set."""

from __future__ import annotations

import dagster as dg

from flen_assets.partitions import character_iteration

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
                "triplets and the Qwen-Image-Edit adapter.",
)
