"""Enrichment: new views of the accepted sources, made by an editor backend."""


import json

import dagster as dg
from PIL import Image
from tqdm import tqdm

from flen_assets.assets.common import PartitionRun, json_col, partition_asset, publish, write_manifest
from flen_assets.recipe import load_recipe
from flen_assets.visuals import Tile
from flen_io_managers.partition_folder import PartitionFolder
from flen_resources.dagster_resources import EditorResource, ProjectResource
from flen_resources.imaging import save_png
from flen_resources.lineage import utcnow

GROUP = "enrichment"


class EnrichConfig(dg.Config):
    """Which recipe to apply, and how much of it."""

    recipe: str = ""  # a recipe TOML path or a built-in name (classic, angles, demo); empty: classic
    max_entries: int = 0  # 0: every entry of the recipe


@partition_asset(
    GROUP,
    pool="gpu",
)
def enriched_images(context: dg.AssetExecutionContext, config: EnrichConfig, project: ProjectResource,
                    editor: EditorResource, source_images: PartitionFolder) -> dg.Output:
    """Edits of every accepted source, one per recipe entry; each row records parent, operation,
    parameters, prompt, seed and model, and the same goes to lineage as a parent->child edge."""
    run = PartitionRun.start(context, project)
    recipe = load_recipe(config.recipe or None)
    entries = recipe.entries[: config.max_entries] if config.max_entries else recipe.entries
    sources = [r for r in source_images.rows() if r["status"] == "accepted"]
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "images").mkdir()
    part_rel = run.project.relative(run.project.partition_dir(run.asset, run.character, run.iteration))

    rows, image_rows, edge_rows, tiles = [], [], [], []
    jobs = [(s, e) for s in sources for e in entries]
    for source, entry in tqdm(jobs, desc=f"enrich {run.character}/{run.iteration}", unit="edit"):
        parent = Image.open(source_images.path / source["image_path"]).convert("RGB")
        request = entry.request_for(source["image_id"], recipe.version)
        box = tuple(json.loads(source["face_box"])) if source["face_box"] else None
        backend = editor.get(entry.editor or recipe.editor)
        result = backend.edit([parent], request, face_box=box)
        image_id, png = save_png(result.image, staged / "images")
        rows.append(dict(image_id=image_id, image_path=f"images/{png.name}", parent_id=source["image_id"],
                         parent_name=source["original_name"], recipe=recipe.name, recipe_version=recipe.version,
                         recipe_id=entry.id, operation=result.operation, params=json_col(result.params),
                         prompt=result.prompt, seed=result.seed, model=result.model,
                         adapters=json_col(result.adapters), caption=entry.caption))
        image_rows.append(run.stamp(image_id=image_id, path=f"{part_rel}/images/{png.name}",
                                    width=result.image.width, height=result.image.height, status="generated",
                                    created_at=utcnow()))
        edge_params = {**result.params, **({"loras": result.adapters} if result.adapters else {})}
        edge_rows.append(run.stamp(child_id=image_id, parent_id=source["image_id"], operation=result.operation,
                                   params=json_col(edge_params), prompt=result.prompt, seed=result.seed,
                                   model=result.model, created_at=utcnow()))
        tiles.append(Tile(result.image, f"{entry.id} · {source['original_name']}"))
    models = sorted({r["model"] for r in rows})
    context.log.info(f"{len(rows)} edits of {len(sources)} sources with {len(entries)} recipe entries "
                     f"({recipe.name} v{recipe.version}; models {', '.join(models)})")
    write_manifest(rows, staged)
    run.lineage.append("images", image_rows)
    run.lineage.append("edges", edge_rows)
    return publish(run, project, staged,
                   params={**config.model_dump(), "recipe_name": recipe.name, "recipe_version": recipe.version,
                           "recipe_sha256": recipe.sha256},
                   models={"editors": models},
                   metadata={"edits": len(rows), "sources": len(sources), "recipe": f"{recipe.name} v{recipe.version}",
                             "models": ", ".join(models)},
                   sheet=tiles)
