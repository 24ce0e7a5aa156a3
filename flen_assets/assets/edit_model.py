"""The edit-model flywheel: accepted (before, prompt, after) triplets and the Qwen-Image-Edit adapter.

edit_triplets vN holds every accepted edit so far (v(N-1)'s rows are carried), each as the source
photo (before), an edit instruction (prompt) and the accepted result (after). qwen_adapter vN is a
Qwen-Image-Edit LoRA trained on them, on the release the recipe's edits used (its `edit_model`, 2509
or 2511); enriched_images v(N+1) stacks it on every qwen_edit entry, so the edit model learns to keep
this character's identity.
"""

import json
import shutil
from collections import Counter

import dagster as dg
import pyarrow as pa
from PIL import Image

from flen_assets.assets.common import GPU_POOL, LoraAssetConfig, PartitionRun, partition_asset, publish, write_manifest
from flen_assets.dagster_resources import ProjectResource, RunSettingsResource, TrainerResource
from flen_assets.review.gate import human_decisions, reviewed_statuses
from flen_assets.visuals import Tile, markdown_thumbnail
from flen_io_managers.partition_folder import PartitionFolder
from flen_resources.lineage import utcnow
from flen_resources.models.registry import DEFAULT_EDIT_MODEL, QWEN_EDIT_MODELS
from flen_resources.project import LOSS_CURVE, QWEN_ADAPTER_COMFYUI_FILE, QWEN_ADAPTER_FILE

GROUP = "edit_model"

TRIPLET_SCHEMA = pa.schema([
    ("before_id", pa.string()), ("after_id", pa.string()), ("before_path", pa.string()), ("after_path", pa.string()),
    ("prompt", pa.string()), ("operation", pa.string()), ("recipe_id", pa.string()), ("model", pa.string()),
    ("origin_iteration", pa.string()),
    ("edit_model", pa.string()),  # the recipe's Qwen-Image-Edit release (null: rows carried from before it was kept)
])
ADAPTER_SCHEMA = pa.schema([
    ("status", pa.string()), ("file", pa.string()), ("key_style", pa.string()), ("base_model", pa.string()),
    ("edit_model", pa.string()),  # the release it was trained on, the one enrichment must edit with
    ("dataset_md5", pa.string()), ("triplets", pa.int64()), ("steps", pa.int64()), ("config", pa.string()),
    ("final_loss", pa.float64()), ("eval_loss_start", pa.float64()), ("eval_loss_end", pa.float64()),
])

# Edit instructions for the classic operations (qwen_edit rows keep their own prompt). A template
# may use {caption} (the recipe entry's caption); an operation not listed falls back to the caption.
CLASSIC_INSTRUCTIONS = {
    "mirror": "Flip the photo horizontally",
    "zoom": "Zoom in to a close-up portrait",
    "rotate": "Rotate the photo slightly: {caption}",
    "lighting": "Change the lighting: {caption}",
    "color_temperature": "Change the lighting: {caption}",
    "background_blur": "Blur the background and keep the face sharp",
    "grayscale": "Turn the photo into a black and white photo",
}


def edit_instruction(operation: str, caption: str | None, prompt: str | None = None) -> str:
    """The instruction of one edit: its own prompt if it has one, else one derived from the operation."""
    if prompt and prompt.strip():
        return prompt.strip()
    caption = (caption or "").strip()
    template = CLASSIC_INSTRUCTIONS.get(operation)
    if template and (caption or "{caption}" not in template):
        return template.format(caption=caption)
    if caption:
        return f"Edit the photo: {caption}"
    return f"Apply the {operation.replace('_', ' ')} edit to the photo"


def pair_tile(before: Image.Image, after: Image.Image, height: int = 160, gap: int = 4) -> Image.Image:
    """before | after side by side, both scaled to `height`."""
    def scaled(img: Image.Image) -> Image.Image:
        img = img.convert("RGB")
        return img.resize((max(1, round(img.width * height / img.height)), height), Image.LANCZOS)

    left, right = scaled(before), scaled(after)
    tile = Image.new("RGB", (left.width + gap + right.width, height), (255, 255, 255))
    tile.paste(left, (0, 0))
    tile.paste(right, (left.width + gap, 0))
    return tile


@partition_asset(GROUP)
def edit_triplets(context: dg.AssetExecutionContext, project: ProjectResource, enriched_images: PartitionFolder,
                  filtered_images: PartitionFolder, source_images: PartitionFolder) -> dg.Output:
    """Accepted (before, prompt, after) triplets: the source photo, the edit instruction and the
    accepted enriched image, as before/<id>.png and after/<id>.png. Cumulative: vN carries every
    row of v(N-1) (materialize that first), so the adapter of vN learns from all accepted edits."""
    run = PartitionRun.start(context, project)
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "before").mkdir()
    (staged / "after").mkdir()
    part_rel = run.project.relative(run.project.partition_dir(run.asset, run.character, run.iteration))

    rows: list[dict] = []
    files: dict[str, object] = {}  # staged relative path -> source file
    previous = run.previous("edit_triplets")
    dropped, humans = 0, {}
    if previous is not None:
        for row in previous.rows():
            # A human may reject an edit after v(N-1) took it: the adapter stops learning from it.
            if row["origin_iteration"] not in humans:
                humans[row["origin_iteration"]] = human_decisions(run.project, run.lineage, "filtered_images",
                                                                  run.character, row["origin_iteration"])
            if humans[row["origin_iteration"]].get(row["after_id"], {}).get("passed") is False:
                dropped += 1
                continue
            files[row["before_path"]] = previous.path / row["before_path"]
            files[row["after_path"]] = previous.path / row["after_path"]
            rows.append({name: row.get(name) for name in TRIPLET_SCHEMA.names})
    carried = len(rows)
    seen = {r["after_id"] for r in rows}

    sources = {r["image_id"]: r for r in source_images.rows() if r.get("image_id")}
    edits = {r["image_id"]: r for r in enriched_images.rows()}
    # Human decisions made since filtered_images was published count (the latest wins); an image
    # still pending review stops the run, as for the training set.
    reviewed = reviewed_statuses(run.project, run.lineage, "filtered_images", run.character, run.iteration,
                                 f"edit_triplets {run.character}|{run.iteration}")
    accepted = [r for r in filtered_images.rows()
                if reviewed.get(r["image_id"], "accepted" if r["accepted"] else "rejected") == "accepted"]
    for gate in accepted:
        after_id = gate["image_id"]
        if after_id in seen:  # the same edit accepted again (classic edits are deterministic)
            continue
        edit, source = edits.get(after_id), sources.get(gate["parent_id"])
        if edit is None or source is None:
            raise dg.Failure(f"edit_triplets {run.character}|{run.iteration}: accepted image {after_id[:12]} has no "
                             f"{'enriched_images row' if edit is None else 'source image ' + gate['parent_id'][:12]}; "
                             "re-materialize enriched_images, filtered_images and source_images of this partition")
        before_id = source["image_id"]
        before_path, after_path = f"before/{before_id}.png", f"after/{after_id}.png"
        files[before_path] = source_images.path / source["image_path"]
        files[after_path] = enriched_images.path / edit["image_path"]
        rows.append(dict(before_id=before_id, after_id=after_id, before_path=before_path, after_path=after_path,
                         prompt=edit_instruction(edit["operation"], edit["caption"], edit["prompt"]),
                         operation=edit["operation"], recipe_id=edit["recipe_id"], model=edit["model"],
                         origin_iteration=run.iteration, edit_model=edit.get("recipe_edit_model")))
        seen.add(after_id)
    for rel, src in files.items():
        shutil.copyfile(src, staged / rel)

    write_manifest(rows, staged, TRIPLET_SCHEMA)
    now = utcnow()
    run.lineage.append("members", [run.stamp(image_id=r["after_id"], path=f"{part_rel}/{r['after_path']}",
                                             origin="triplet", caption=r["prompt"], created_at=now) for r in rows])
    tiles = [Tile(pair_tile(Image.open(staged / r["before_path"]), Image.open(staged / r["after_path"])),
                  f"{r['origin_iteration']} {r['prompt']}", True) for r in rows]
    by_op = Counter(r["operation"] for r in rows)
    context.log.info(f"{len(rows)} triplets ({len(rows) - carried} new in {run.iteration}, {carried} carried, "
                     f"{dropped} dropped: rejected by a human since)")
    return publish(run, project, staged, params={"carried": carried, "new": len(rows) - carried},
                   metadata={"triplets": len(rows), "new": len(rows) - carried, "carried": carried,
                             "dropped_by_review": dropped,
                             "by_operation": dict(by_op),
                             "example_prompt": rows[-1]["prompt"] if rows else ""},
                   sheet=tiles)


class QwenAdapterConfig(LoraAssetConfig):
    """Training knobs of the Qwen-Image-Edit adapter; unset ones come from the run settings (500 steps on a card)."""

    min_triplets: int = 4  # fewer: no adapter this iteration (the run still succeeds)
    # The release to train on, qwen-image-edit-2509 or -2511; empty: the one this iteration's recipe edited with
    # (the next iteration stacks the adapter on that release's edits)
    edit_model: str = ""


def adapter_edit_model(configured: str, triplet_rows: list[dict]) -> str:
    """The release qwen_adapter trains on: `configured`, else the edit_model of the latest iteration's
    triplets that recorded one (this iteration's, unless it added none), else the default release."""
    if configured:
        if configured not in QWEN_EDIT_MODELS:
            raise dg.Failure(f"qwen_adapter edit_model {configured!r} is not an editor model: set it to one of "
                             f"{', '.join(QWEN_EDIT_MODELS)}, or leave it empty for the recipe's")
        return configured
    recorded = [r for r in triplet_rows if r.get("edit_model")]
    if not recorded:
        return DEFAULT_EDIT_MODEL
    return max(recorded, key=lambda r: int(r["origin_iteration"].removeprefix("v")))["edit_model"]


def adapter_file(folder: PartitionFolder):
    """The diffusers-style LoRA of a qwen_adapter partition, or None when that iteration skipped training."""
    for row in folder.rows():
        if row.get("status") == "trained" and row.get("key_style") == "diffusers" and row.get("file"):
            return folder.path / row["file"]
    return None


@partition_asset(GROUP, pool=GPU_POOL)
def qwen_adapter(context: dg.AssetExecutionContext, config: QwenAdapterConfig, project: ProjectResource,
                 trainer: TrainerResource, run_settings: RunSettingsResource,
                 edit_triplets: PartitionFolder) -> dg.Output:
    """A Qwen-Image-Edit LoRA trained on the edit triplets so far, on the release the recipe's edits used
    (config edit_model overrules it): diffusers and ComfyUI files, loss curve, config. enriched_images of the
    next iteration stacks it on every qwen_edit entry.
    With fewer than `min_triplets` triplets nothing is trained: the folder says so, the run succeeds."""
    run = PartitionRun.start(context, project)
    config = run.sized(config, run_settings)
    triplet_rows = edit_triplets.rows()
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    edit_model = adapter_edit_model(config.edit_model, triplet_rows)
    columns = dict(status=None, file=None, key_style=None, base_model=None, edit_model=edit_model,
                   dataset_md5=edit_triplets.dvc_md5,
                   triplets=len(triplet_rows), steps=None, config=None, final_loss=None, eval_loss_start=None,
                   eval_loss_end=None)
    if len(triplet_rows) < config.min_triplets:
        status = f"skipped: {len(triplet_rows)} triplets < {config.min_triplets}"
        context.log.info(f"qwen_adapter {run.character}|{run.iteration} not trained ({status}); enrichment of the "
                         "next iteration runs without an adapter")
        write_manifest([{**columns, "status": status}], staged, ADAPTER_SCHEMA)
        run.lineage.append("metrics", [run.stamp(name="triplets", value=float(len(triplet_rows)),
                                                 recorded_at=utcnow())])
        return publish(run, project, staged, params={**config.model_dump(), "triplets_md5": edit_triplets.dvc_md5},
                       metadata={"trained": False, "status": status, "triplets": len(triplet_rows),
                                 "triplets_md5": edit_triplets.dvc_md5})

    from flen_resources.trainers.qwen_edit_lora import Triplet

    train_config = trainer.train_config({**config.knobs(), "min_images": config.min_triplets}, edit_model)
    triplets = [Triplet(controls=[edit_triplets.path / r["before_path"]], prompt=r["prompt"],
                        target=edit_triplets.path / r["after_path"]) for r in triplet_rows]
    # The run folder is keyed by the dataset version: a rerun on the same triplets resumes or reuses it; and
    # by the release (the default's folders keep their old names), so a run never resumes onto another one.
    work = (run.project.state_dir / "runs" / f"qwen_adapter-{run.character}-{run.iteration}-"
            f"{edit_triplets.dvc_md5[:12]}{'' if edit_model == DEFAULT_EDIT_MODEL else '-' + edit_model}")
    context.log.info(f"training on {edit_model}" + ("" if config.edit_model else " (the recipe's edit_model)"))
    result = trainer.qwen_edit(work, log=context.log.info, edit_model=edit_model).train(
        triplets, train_config, name=f"{run.character}_{run.iteration}_qwen_adapter",
        dataset_md5=edit_triplets.dvc_md5)

    shutil.copyfile(result.lora_path, staged / QWEN_ADAPTER_FILE)
    shutil.copyfile(result.loss_curve, staged / LOSS_CURVE)
    final_loss = result.losses[-1][1] if result.losses else float("nan")
    trained = {**columns, "status": "trained", "base_model": result.metadata.get("flenwheel.base_model"),
               "steps": result.steps, "config": train_config.to_json(), "final_loss": final_loss,
               "eval_loss_start": result.eval_loss_start, "eval_loss_end": result.eval_loss_end}
    rows = [{**trained, "file": QWEN_ADAPTER_FILE, "key_style": "diffusers"}]
    if result.comfyui_path and result.comfyui_path.is_file():
        shutil.copyfile(result.comfyui_path, staged / QWEN_ADAPTER_COMFYUI_FILE)
        rows.append({**trained, "file": QWEN_ADAPTER_COMFYUI_FILE, "key_style": "comfyui"})
    write_manifest(rows, staged, ADAPTER_SCHEMA)
    run.lineage.append("metrics", [run.stamp(name=n, value=float(v), recorded_at=utcnow()) for n, v in
                                   [("triplets", len(triplet_rows)), ("final_loss", final_loss),
                                    ("eval_loss_start", result.eval_loss_start),
                                    ("eval_loss_end", result.eval_loss_end), ("train_seconds", result.seconds)]])
    curve = Image.open(result.loss_curve)
    return publish(run, project, staged,
                   params={**json.loads(train_config.to_json()), "triplets_md5": edit_triplets.dvc_md5},
                   models={"base": result.metadata.get("flenwheel.base_model"), "edit_model": edit_model},
                   metadata={"trained": True, "status": "trained", "edit_model": edit_model,
                             "triplets": len(triplet_rows),
                             "steps": result.steps, "resumed_from": result.resumed_from,
                             "final_loss": round(final_loss, 5),
                             "fixed_batch_loss": f"{result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}",
                             "train_seconds": round(result.seconds, 1), "peak_gpu_gib": result.peak_gib or 0.0,
                             "triplets_md5": edit_triplets.dvc_md5,
                             "loss_curve": dg.MetadataValue.md(markdown_thumbnail(curve, alt="loss curve"))})
