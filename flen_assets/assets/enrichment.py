"""Enrichment: new views of the accepted sources, made by an editor backend."""


import dataclasses
import json

import dagster as dg
from PIL import Image
from tqdm import tqdm

from flen_assets.assets.common import GPU_POOL, PartitionRun, partition_asset, publish, write_manifest
from flen_assets.assets.edit_model import adapter_file
from flen_assets.dagster_resources import EditorResource, ProjectResource, RunSettingsResource
from flen_assets.recipe import load_recipe
from flen_assets.visuals import Tile
from flen_io_managers.partition_folder import PartitionFolder
from flen_resources.editors import EditJob
from flen_resources.imaging import save_png
from flen_resources.lineage import to_json, utcnow
from flen_resources.models.registry import DEFAULT_EDIT_MODEL
from flen_resources.recipe_report import entry_pass_rates, recipe_report, report_markdown

GROUP = "enrichment"
ADAPTER_LORA = "qwen-adapter"  # the LoRA name of qwen_adapter v(N-1) in the editor's stack


def previous_adapter(run: PartitionRun) -> dict | None:
    """qwen_adapter of v(N-1) (None for v1): fails fast when it was never materialized; its LoRA
    file is None when that iteration had too few triplets to train one."""
    folder = run.previous("qwen_adapter")
    if folder is None:
        return None
    lora = adapter_file(folder)
    rows = folder.rows()
    status = next((r["status"] for r in rows if r.get("status")), "unknown")
    # adapters published before 2511 support record no edit_model: 2509 was the only release then
    made_for = next((r["edit_model"] for r in rows if r.get("edit_model")), DEFAULT_EDIT_MODEL)
    return {"asset": "qwen_adapter", "iteration": folder.iteration, "dvc_md5": folder.dvc_md5,
            "trained": lora is not None, "status": status, "edit_model": made_for, "path": lora}


def check_adapter_fits(adapter: dict, recipe_name: str, edit_model: str) -> None:
    """Fail before any edit when qwen_adapter v(N-1) was trained on another release than the recipe edits with."""
    if adapter["edit_model"] != edit_model:
        raise dg.Failure(f"qwen_adapter {adapter['iteration']} was trained on {adapter['edit_model']} and recipe "
                         f"{recipe_name!r} edits with {edit_model} (its edit_model): set enriched_images' "
                         f"adapter_weight to 0 to leave the adapter out, or set edit_model = \"{adapter['edit_model']}\" "
                         "in the recipe")


def with_adapter(request, weight: float):
    """The request with the qwen adapter added to its LoRA stack."""
    loras = {**dict(request.params.get("loras", {})), ADAPTER_LORA: weight}
    return dataclasses.replace(request, params={**request.params, "loras": loras})


class EnrichConfig(dg.Config):
    """Which recipe to apply, and how much of it."""

    # a recipe TOML path or a built-in name (classic, angles, demo); empty: the run settings' (demo on a CPU,
    # angles on a card)
    recipe: str = ""
    max_entries: int = 0  # 0: every entry of the recipe
    adapter_weight: float = 1.0  # weight of qwen_adapter v(N-1) on every qwen_edit entry; 0: leave it out


@partition_asset(
    GROUP,
    pool=GPU_POOL,
)
def enriched_images(context: dg.AssetExecutionContext, config: EnrichConfig, project: ProjectResource,
                    editor: EditorResource, run_settings: RunSettingsResource,
                    source_images: PartitionFolder) -> dg.Output:
    """Edits of every accepted source, one per recipe entry; each row records parent, operation,
    parameters, prompt, seed and model, and the same goes to lineage as a parent->child edge."""
    run = PartitionRun.start(context, project)
    config = run.sized(config, run_settings)
    recipe = load_recipe(config.recipe or None)
    entries = recipe.entries[: config.max_entries] if config.max_entries else recipe.entries
    pruned: list[dict] = []
    if recipe.prune is not None:  # opt-in: entries that lost the character in earlier iterations
        entries, pruned = recipe.prune.apply(entries, entry_pass_rates(run.project, run.character, run.number))
        for change in pruned:
            context.log.info(f"recipe entry {change['entry']} {change['action']}: {change['pass_rate']:.0%} of its "
                             f"{change['edits']} edits passed the identity gate (< {change['min_pass_rate']:.0%})")
    sources = [r for r in source_images.rows() if r["status"] == "accepted"]
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "images").mkdir()
    part_rel = run.project.relative(run.project.partition_dir(run.asset, run.character, run.iteration))
    uses_qwen = any((e.editor or recipe.editor) == "qwen_edit" for e in entries)
    # Only a recipe with Qwen-Image-Edit entries needs (and fails fast without) qwen_adapter v(N-1).
    adapter = previous_adapter(run) if uses_qwen else None
    use_adapter = bool(adapter and adapter["trained"] and config.adapter_weight and uses_qwen)
    if use_adapter:
        check_adapter_fits(adapter, recipe.name, recipe.edit_model)
        editor.get("qwen_edit", recipe.edit_model).set_lora_source(ADAPTER_LORA, str(adapter["path"]))
    if adapter:
        context.log.info(f"qwen_adapter {adapter['iteration']}: " + (
            f"stacked on every qwen_edit entry at weight {config.adapter_weight}" if use_adapter else
            f"not used ({adapter['status']})" if not adapter["trained"] else
            "not used (adapter_weight 0)" if not config.adapter_weight else
            "not used (no qwen_edit entry in the recipe)"))

    rows, image_rows, edge_rows, tiles = [], [], [], []
    jobs, backends = [], []
    for source, entry in [(s, e) for s in sources for e in entries]:
        parent = Image.open(source_images.path / source["image_path"]).convert("RGB")
        request = entry.request_for(source["image_id"], recipe.version)
        box = tuple(json.loads(source["face_box"])) if source["face_box"] else None
        backend_name = entry.editor or recipe.editor
        if use_adapter and backend_name == "qwen_edit":
            request = with_adapter(request, config.adapter_weight)
        jobs.append((source, entry, EditJob([parent], request, box)))
        backends.append(backend_name)
    # one batch per backend: qwen_edit runs each model phase once over all of its edits
    results: list = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=f"enrich {run.character}/{run.iteration}", unit="edit") as bar:
        for backend_name in dict.fromkeys(backends):
            members = [i for i, b in enumerate(backends) if b == backend_name]
            context.log.info(f"{backend_name}: {len(members)} edits")
            batch = editor.get(backend_name, recipe.edit_model).edit_batch([jobs[i][2] for i in members],
                                                                           progress=lambda: bar.update(1))
            for i, result in zip(members, batch, strict=True):
                results[i] = result
    for (source, entry, _job), result in zip(jobs, results, strict=True):
        for record in result.adapters:  # which iteration's adapter this is, for lineage
            if record.get("name") == ADAPTER_LORA:
                record.update(asset="qwen_adapter", iteration=adapter["iteration"], dvc_md5=adapter["dvc_md5"])
        image_id, png = save_png(result.image, staged / "images")
        rows.append(dict(image_id=image_id, image_path=f"images/{png.name}", parent_id=source["image_id"],
                         parent_name=source["original_name"], recipe=recipe.name, recipe_version=recipe.version,
                         recipe_edit_model=recipe.edit_model, recipe_id=entry.id, operation=result.operation,
                         params=to_json(result.params),
                         prompt=result.prompt, seed=result.seed, model=result.model,
                         adapters=to_json(result.adapters), caption=entry.caption))
        image_rows.append(run.stamp(image_id=image_id, path=f"{part_rel}/images/{png.name}",
                                    width=result.image.width, height=result.image.height, status="generated",
                                    created_at=utcnow()))
        edge_params = {**result.params, **({"loras": result.adapters} if result.adapters else {})}
        edge_rows.append(run.stamp(child_id=image_id, parent_id=source["image_id"], operation=result.operation,
                                   params=to_json(edge_params), prompt=result.prompt, seed=result.seed,
                                   model=result.model, created_at=utcnow()))
        tiles.append(Tile(result.image, f"{entry.id} · {source['original_name']}"))
    models = sorted({r["model"] for r in rows})
    context.log.info(f"{len(rows)} edits of {len(sources)} sources with {len(entries)} recipe entries "
                     f"({recipe.name} v{recipe.version}, edit_model {recipe.edit_model}; models {', '.join(models)})")
    write_manifest(rows, staged)
    run.lineage.append("images", image_rows)
    run.lineage.append("edges", edge_rows)
    adapter_info = None if adapter is None else {**{k: v for k, v in adapter.items() if k != "path"},
                                                 "used": use_adapter,
                                                 "weight": config.adapter_weight if use_adapter else None}
    return publish(run, project, staged,
                   params={**config.model_dump(), "recipe_name": recipe.name, "recipe_version": recipe.version,
                           "recipe_sha256": recipe.sha256, "edit_model": recipe.edit_model,
                           "qwen_adapter": adapter_info, "recipe_pruned": pruned},
                   models={"editors": models, **({"qwen_adapter": adapter_info} if adapter_info else {})},
                   metadata={"edits": len(rows), "sources": len(sources), "recipe": f"{recipe.name} v{recipe.version}",
                             "edit_model": recipe.edit_model, "models": ", ".join(models),
                             "qwen_adapter": dg.MetadataValue.json(adapter_info) if adapter_info else "none (v1)",
                             "recipe_pruned": dg.MetadataValue.json(pruned) if pruned else (
                                 "none" if recipe.prune else "off (no [prune] in the recipe)"),
                             # how each entry fared in this character's gated iterations so far
                             "recipe_entries_so_far": dg.MetadataValue.md(report_markdown(
                                 recipe_report(run.project, [run.character])))},
                   sheet=tiles)
