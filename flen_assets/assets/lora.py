"""The FLUX LoRA of an iteration, its identity evaluation, and the synthetic batch it generates."""

import json
import shutil
from pathlib import Path

import dagster as dg
from PIL import Image

from flen_assets.assets.common import (
    GPU_POOL,
    LoraAssetConfig,
    PartitionRun,
    partition_asset,
    partition_check,
    publish,
    readable_metadata,
    write_manifest,
)
from flen_assets.assets.gating import ImageJudge, review_policy
from flen_assets.dagster_resources import (
    FaceResource,
    GeneratorResource,
    ProjectResource,
    RunSettingsResource,
    TrainerResource,
)
from flen_assets.partitions import character_iteration
from flen_assets.review.gate import human_decisions, review_check, review_metadata
from flen_assets.visuals import Tile, labelled_grid, markdown_thumbnail
from flen_io_managers.partition_folder import PartitionFolder, partition_keys
from flen_resources.atomic import write_text_atomic
from flen_resources.checkpoint_selection import (
    PROMOTION_RULE,
    CheckpointScore,
    Promotion,
    TrainingFaces,
    checkpoint_files,
    checkpoint_table,
    choose_checkpoint,
    promoted_lora,
    promotion_in_force,
    score_checkpoint,
)
from flen_resources.datasets import PromptError, prompts_with_trigger, trigger_word
from flen_resources.evaluation import (
    compare_consistency,
    format_metric,
    metrics_table,
    plot_checkpoints,
    plot_history,
    short_prompt,
)
from flen_resources.identity import GateSettings, Reference, score_generations
from flen_resources.imaging import save_png
from flen_resources.lineage import to_json, utcnow
from flen_resources.project import (
    CHECKPOINT_DIR,
    CHECKPOINTS_FILE,
    EVAL_BY_STEP,
    EVAL_CHECKPOINT_GRID,
    EVAL_EVOLUTION,
    EVAL_HISTORY,
    EVAL_METRICS,
    FLUX_LORA_COMFYUI_FILE,
    FLUX_LORA_FILE,
    LOSS_CURVE,
    MANIFEST,
    flen_command,
)

GROUP = "lora"


class FluxLoraConfig(LoraAssetConfig):
    """FLUX LoRA training knobs (defaults: a character LoRA, ~1500 steps, r16, lr 1e-4)."""


@partition_asset(GROUP, pool=GPU_POOL)
def flux_lora(context: dg.AssetExecutionContext, config: FluxLoraConfig, project: ProjectResource,
              trainer: TrainerResource, run_settings: RunSettingsResource,
              training_set: PartitionFolder) -> dg.Output:
    """A FLUX.1-dev LoRA trained on this iteration's training set: diffusers and ComfyUI files, loss
    curve, config. A killed run resumes from its last checkpoint when materialized again."""
    from flen_resources.trainers.flux_lora import TrainItem

    run = PartitionRun.start(context, project)
    config = run.sized(config, run_settings)
    train_config = trainer.train_config(config.knobs())
    items = [TrainItem(training_set.path / r["file"], r["caption"]) for r in training_set.rows()]
    # The run folder is keyed by the dataset version: a rerun on the same data resumes or reuses it.
    work = run.project.state_dir / "runs" / f"flux_lora-{run.character}-{run.iteration}-{training_set.dvc_md5[:12]}"
    result = trainer.flux(work, log=context.log.info).train(items, train_config, name=f"{run.character}_{run.iteration}",
                                                            dataset_md5=training_set.dvc_md5)
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    shutil.copyfile(result.lora_path, staged / FLUX_LORA_FILE)
    shutil.copyfile(result.comfyui_path, staged / FLUX_LORA_COMFYUI_FILE)
    shutil.copyfile(result.loss_curve, staged / LOSS_CURVE)
    checkpoints = stage_checkpoints(result.checkpoints, staged, result.losses)
    final_loss = result.losses[-1][1] if result.losses else float("nan")
    shared = {"base_model": result.metadata.get("flenwheel.base_model"), "dataset_md5": training_set.dvc_md5,
              "steps": result.steps, "config": train_config.to_json(), "final_loss": final_loss,
              "eval_loss_start": result.eval_loss_start, "eval_loss_end": result.eval_loss_end}
    write_manifest([{"file": FLUX_LORA_FILE, "key_style": "diffusers", **shared},
                    {"file": FLUX_LORA_COMFYUI_FILE, "key_style": "comfyui", **shared}], staged)
    run.lineage.append("metrics", [run.stamp(name=n, value=float(v), recorded_at=utcnow()) for n, v in
                                   [("final_loss", final_loss), ("eval_loss_start", result.eval_loss_start),
                                    ("eval_loss_end", result.eval_loss_end), ("train_seconds", result.seconds)]])
    curve = Image.open(result.loss_curve)
    return publish(run, project, staged,
                   params={**json.loads(train_config.to_json()), "training_set_md5": training_set.dvc_md5},
                   models={"base": result.metadata.get("flenwheel.base_model")},
                   metadata={"steps": result.steps, "resumed_from": result.resumed_from,
                             "checkpoints": dg.MetadataValue.text(", ".join(str(c["step"]) for c in checkpoints)),
                             "final_loss": round(final_loss, 5),
                             "fixed_batch_loss": f"{result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}",
                             "train_seconds": round(result.seconds, 1), "peak_gpu_gib": result.peak_gib or 0.0,
                             "training_set_md5": training_set.dvc_md5,
                             "loss_curve": dg.MetadataValue.md(markdown_thumbnail(curve, alt="loss curve"))})


def stage_checkpoints(snapshots: list[tuple[int, Path]], staged: Path, losses: list[tuple[int, float]]) -> list[dict]:
    """Copy every kept checkpoint's LoRA pair into staged/checkpoints/ and list them in checkpoints.json."""
    (staged / CHECKPOINT_DIR).mkdir()
    loss_at = dict(losses)
    listed = []
    for step, lora in snapshots:
        comfy = lora.with_name(lora.name.replace(".safetensors", "_comfyui.safetensors"))
        for path in (lora, comfy):
            shutil.copyfile(path, staged / CHECKPOINT_DIR / path.name)
        listed.append({"step": step, "file": f"{CHECKPOINT_DIR}/{lora.name}", "comfyui_file": f"{CHECKPOINT_DIR}/{comfy.name}",
                       "loss": loss_at.get(step)})
    (staged / CHECKPOINTS_FILE).write_text(json.dumps(listed, indent=1))
    return listed


def config_prompts(asset: str, templates: list[str], trigger: str) -> list[str]:
    """The config's prompt templates with the trigger word; a run that cannot use them fails with the fix."""
    try:
        return prompts_with_trigger(templates, trigger, f"{asset}'s config `prompts`")
    except PromptError as exc:
        raise dg.Failure(str(exc)) from exc


class EvalConfig(dg.Config):
    """The fixed evaluation grid: every prompt x every seed, with the LoRA at `lora_weight`."""

    prompts: list[str] = ["photo of {trigger}, portrait, looking at the camera",
                          "photo of {trigger} outdoors in a park, natural light",
                          "photo of {trigger} in a cafe, candid"]
    seeds: list[int] | None = None  # null: the run settings' (2 on a CPU or a 24 GB card, 4 on a large card)
    size: int | None = None  # null: the run settings' (64 px on a CPU, 1024 on a card)
    steps: int | None = None  # null: the run settings' (2 on a CPU, 28 on a card)
    lora_weight: float = 1.0
    # '' takes the character's review policy (`flen character policy`), else auto | required | mixed.
    review_policy: str = ""
    review_margin: float = -1.0  # mixed: borderline band around the identity threshold; < 0: the character's
    target_consistency: float = 0.70  # the user's goal: share of images still the same person


NOT_WORSE_RULE = ("Identity consistency of vN is at least that of v(N-1) (v1: nothing to compare). 0% never passes, "
                  "not even against 0%: no generated face matches the character, so the LoRA has not learned it yet. "
                  "A failure is a warning: it does not stop the flywheel.")


@partition_asset(GROUP, pool=GPU_POOL, check_specs=[
    partition_check("not_worse_than_previous", "lora_eval", NOT_WORSE_RULE),
    partition_check("meets_target", "lora_eval",
                    "Identity consistency reaches the target (70% by default)."),
])
def lora_eval(context: dg.AssetExecutionContext, config: EvalConfig, project: ProjectResource,
              generator: GeneratorResource, faces: FaceResource, run_settings: RunSettingsResource,
              flux_lora: PartitionFolder,
              identity_reference: PartitionFolder, training_set: PartitionFolder):
    """Every checkpoint flux_lora kept, generating the same fixed prompt x seed grid: identity pass rate
    (faces within the character's threshold), memorised copies of training images, mean distance,
    diversity (embeddings and landmark yaw). The best checkpoint is promoted (checkpoint_selection's
    rule, or a person's `flen promote`) and its scores are the iteration's: the contact sheet (with a
    LoRA-off column: the base model), the metrics of every iteration as a plot and a table, and the same
    prompts and seeds of every iteration as one grid (evolution.png). Identity against step is a plot
    (identity_by_step.png), the checkpoints x prompts a grid (checkpoint_grid.png)."""
    run = PartitionRun.start(context, project)
    config = run.sized(config, run_settings)
    reference = Reference.load(identity_reference.path)
    trigger = trigger_word(training_set.rows(), run.character)
    prompts = config_prompts("lora_eval", config.prompts, trigger)
    gen = generator.get()
    shape = {"width": config.size, "height": config.size, "steps": config.steps}
    training = TrainingFaces.of([Image.open(training_set.path / r["file"]) for r in training_set.rows()],
                                faces.analyzer)
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    rows, images, scores = [], {}, []
    for step, lora in lora_checkpoints(flux_lora):
        step_rows, step_images = [], []
        for out in gen.generate_grid(prompts, config.seeds, lora=lora, lora_weight=config.lora_weight, **shape):
            step_images.append(out.image)
            step_rows.append({"step": step, "prompt": out.prompt, "seed": out.seed, "model": out.model,
                              "lora_weight": config.lora_weight})
        score, scored = score_checkpoint(step, step_images, faces.analyzer, reference, training)
        folder = staged / CHECKPOINT_DIR / f"step-{step:06d}"
        folder.mkdir(parents=True)
        for i, (img, row, measured) in enumerate(zip(step_images, step_rows, scored)):
            img.save(folder / f"{i:03d}.png")
            row.update(file=f"{CHECKPOINT_DIR}/{folder.name}/{i:03d}.png", **measured)
        context.log.info(f"checkpoint step {step}: {score.identity_pass_rate:.0%} match the character, "
                         f"{score.memorised_rate:.0%} memorised")
        rows += step_rows
        images[step] = step_images
        scores.append(score)
    promotion = promote(run, flux_lora.dvc_md5, scores)
    best = next(s for s in scores if s.step == promotion.step)
    current = [r for r in rows if r["step"] == best.step]
    # The LoRA-off column: the same prompts and first seed with the LoRA at weight 0, i.e. the base model.
    # The LoRA stays loaded (only its weight changes); these images are for the sheet, not the metrics.
    off_images, off_rows = [], []
    for out in gen.generate_grid(prompts, config.seeds[:1], lora=flux_lora.path / FLUX_LORA_FILE, lora_weight=0.0,
                                 **shape):
        off_images.append(out.image)
        off_rows.append({"prompt": out.prompt, "seed": out.seed, "model": out.model, "lora_weight": 0.0})
    _, off_scored = score_generations(off_images, faces.analyzer, reference)
    if off_images:
        (staged / "lora_off").mkdir()
    for i, (img, row, score) in enumerate(zip(off_images, off_rows, off_scored)):
        img.save(staged / "lora_off" / f"{i:03d}.png")
        row.update(file=f"lora_off/{i:03d}.png", **score)
    write_manifest(rows, staged)
    (staged / "lora_off.json").write_text(json.dumps(off_rows, indent=1))
    metrics = {"identity_consistency": best.identity_pass_rate, "face_detected_rate": best.face_detected_rate,
               "mean_distance": best.mean_distance, "diversity": best.diversity, "yaw_spread": best.yaw_spread,
               "memorised_rate": best.memorised_rate, "promoted_step": float(best.step)}
    (staged / EVAL_METRICS).write_text(json.dumps(metrics, indent=1))
    (staged / CHECKPOINTS_FILE).write_text(json.dumps({"rule": PROMOTION_RULE, "promoted": promotion.step,
                                                       "chosen_by": promotion.chosen_by,
                                                       "scores": [s.as_dict() for s in scores]}, indent=1))
    run.lineage.append("metrics", [run.stamp(name=k, value=float(v), recorded_at=utcnow()) for k, v in metrics.items()])
    history = _history(run, metrics)
    # The partition's plot, table and grid stop at this iteration: re-materializing v1 after v2 exists
    # gives the same content.
    upto = [h for h in history if int(h["iteration"][1:]) <= int(run.iteration[1:])]
    plot_history(upto, staged / EVAL_HISTORY, run.character, config.target_consistency)
    plot_checkpoints(scores, promotion.step, staged / EVAL_BY_STEP, f"{run.character} {run.iteration}")
    grid = _checkpoint_grid(rows, images, scores, promotion.step, trigger, f"{run.character} {run.iteration}")
    grid.save(staged / EVAL_CHECKPOINT_GRID, format="PNG")
    evolution, evolution_inputs = _evolution(run, upto, current, images[best.step], trigger)
    evolution.save(staged / EVAL_EVOLUTION, format="PNG")
    previous = [h for h in history if h["iteration"] == run.previous_iteration()]
    consistency = metrics["identity_consistency"]
    yield publish(run, project, staged,
                  params={**config.model_dump(), **({"evolution_inputs": evolution_inputs} if evolution_inputs else {})},
                  models={"generator": gen.model_id()},
                  metadata={**{k: round(v, 4) for k, v in metrics.items() if k != "promoted_step"},
                            "images": len(current), "threshold": reference.threshold,
                            "promoted_step": best.step, "promotion": promotion.describe(),
                            "promotion_rule": dg.MetadataValue.text(PROMOTION_RULE),
                            "promote_another": dg.MetadataValue.md(
                                f"`{flen_command(run.project, 'promote', run.character, run.iteration, '--step', 'S')}`"),
                            "checkpoints": dg.MetadataValue.md(checkpoint_table(scores, promotion.step)),
                            "identity_by_step": dg.MetadataValue.md(markdown_thumbnail(
                                Image.open(staged / EVAL_BY_STEP), alt="identity against step")),
                            "checkpoint_grid": dg.MetadataValue.md(markdown_thumbnail(
                                grid, width=min(grid.width, 1600), alt="checkpoints x prompts")),
                            "metrics_by_iteration": dg.MetadataValue.md(metrics_table(upto)),
                            "history": dg.MetadataValue.md(markdown_thumbnail(
                                Image.open(staged / EVAL_HISTORY), alt="metrics across iterations")),
                            "evolution": dg.MetadataValue.md(markdown_thumbnail(
                                evolution, width=min(evolution.width, 1600), alt="the same prompts and seeds per iteration")),
                            "evolution_path": dg.MetadataValue.path(
                                str(run.project.partition_dir(run.asset, run.character, run.iteration) / EVAL_EVOLUTION))},
                  sheet=_sheet_tiles(current, images[best.step], off_rows, off_images, trigger),
                  sheet_columns=len(config.seeds) + (1 if off_images else 0))
    prev_value = previous[-1]["identity_consistency"] if previous else None
    verdict = compare_consistency(consistency, prev_value, run.iteration, run.previous_iteration())
    yield dg.AssetCheckResult(check_name="not_worse_than_previous", severity=dg.AssetCheckSeverity.WARN,
                              passed=verdict.passed, description=verdict.message,
                              metadata=readable_metadata({
                                  "this": consistency, "verdict": verdict.message,
                                  "previous": prev_value if prev_value is not None else dg.MetadataValue.text(
                                      f"n/a (no evaluation of {run.previous_iteration()})" if run.previous_iteration()
                                      else "n/a (v1 has no previous iteration)")}))
    yield dg.AssetCheckResult(check_name="meets_target", severity=dg.AssetCheckSeverity.WARN,
                              passed=consistency >= config.target_consistency,
                              metadata={"identity_consistency": consistency, "target": config.target_consistency})


def lora_checkpoints(flux_lora: PartitionFolder) -> list[tuple[int, Path]]:
    """(step, LoRA file) of every checkpoint flux_lora published (the final file alone for an older LoRA)."""
    final_step = next((r["steps"] for r in flux_lora.rows() if r.get("key_style") == "diffusers"), 0)
    return checkpoint_files(flux_lora.path, FLUX_LORA_FILE, int(final_step or 0))


def promote(run: PartitionRun, lora_md5: str, scores: list[CheckpointScore]) -> Promotion:
    """Record every checkpoint's scores and the rule's choice; a person's earlier choice for this LoRA stays in force."""
    now = utcnow()
    run.lineage.append("checkpoint_scores", [run.stamp(lora_md5=lora_md5, recorded_at=now, **s.as_dict())
                                             for s in scores])
    chosen = choose_checkpoint(scores)
    run.lineage.append("promotions", [run.stamp(
        lora_md5=lora_md5, step=chosen.step, chosen_by="rule", who="lora_eval", recorded_at=now,
        reason=f"{chosen.passes} of {chosen.images} generations match the character and are not copies")])
    kept = promotion_in_force(run.lineage, run.character, run.iteration, lora_md5)
    if kept is not None and kept.chosen_by == "person" and any(s.step == kept.step for s in scores):
        if run.context is not None:
            run.context.log.info(f"kept the person's choice: {kept.describe()} (the rule picks step {chosen.step})")
        return kept
    return Promotion(chosen.step, "rule", "lora_eval", "", lora_md5)


def _checkpoint_grid(rows: list[dict], images: dict[int, list], scores: list[CheckpointScore], promoted: int,
                     trigger: str, title: str) -> Image.Image:
    """Rows: the checkpoints by step (the promoted one marked); columns: every prompt x seed of the grid."""
    first = [r for r in rows if r["step"] == scores[0].step]
    columns = [(r["prompt"], r["seed"]) for r in first]
    grid, labels = [], []
    for score in scores:
        cells = {(r["prompt"], r["seed"]): Tile(img, _verdict(r), r["same_person"])
                 for r, img in zip([r for r in rows if r["step"] == score.step], images[score.step])}
        grid.append([cells.get(key) for key in columns])
        labels.append(f"step {score.step}{' *' if score.step == promoted else ''}\n"
                      f"{format_metric('identity_consistency', score.identity_pass_rate)} match")
    heads = [f"{short_prompt(p, trigger) if i == 0 or columns[i - 1][0] != p else ''}\ns{s}"
             for i, (p, s) in enumerate(columns)]
    return labelled_grid(grid, labels, heads, thumb=96,
                         title=f"{title}: every checkpoint on the same prompts and seeds (* promoted; green: matches)")


def _verdict(score: dict) -> str:
    """A generated image's identity verdict, for a tile: 'match d=0.41', 'other d=0.83', 'no face'."""
    if not score["face"]:
        return "no face"
    return f"{'match' if score['same_person'] else 'other'} d={score['distance']:.2f}"


def _sheet_tiles(rows: list[dict], images: list, off_rows: list[dict], off_images: list, trigger: str) -> list[Tile]:
    """The contact sheet's tiles, a row per prompt: each seed with the LoRA, then the LoRA-off tile (neutral
    border: not counted). Every label names the prompt, the seed and the verdict."""
    tiles: list[Tile] = []
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        label = short_prompt(prompt, trigger)
        tiles += [Tile(img, f"{label}\ns{r['seed']}: {_verdict(r)}", r["same_person"])
                  for r, img in zip(rows, images) if r["prompt"] == prompt]
        tiles += [Tile(img, f"{label}\nLoRA off s{r['seed']}: {_verdict(r)}")
                  for r, img in zip(off_rows, off_images) if r["prompt"] == prompt]
    return tiles


def _evolution(run: PartitionRun, history: list[dict], rows: list[dict], images: list,
               trigger: str) -> tuple[Image.Image, list[dict]]:
    """The grid of the same prompts and seeds per iteration (rows v1..vN, columns prompt x seed), from each
    earlier iteration's published lora_eval folder; and which folders it read (iteration, DVC md5)."""
    columns = [(r["prompt"], r["seed"]) for r in rows]
    grid, labels, inputs = [], [], []
    for h in history:
        iteration = h["iteration"]
        if iteration == run.iteration:
            cells = {(r["prompt"], r["seed"]): Tile(img, _verdict(r), r["same_person"]) for r, img in zip(rows, images)}
        else:
            cells = _published_cells(run, iteration, inputs)
        grid.append([cells.get(key) for key in columns] if cells is not None else
                    [Tile(None, f"{iteration} not available")] * len(columns))
        labels.append(f"{iteration}\n{format_metric('identity_consistency', h.get('identity_consistency'))} match")
    # The prompt heads the first of its seeds' columns and runs on over the others.
    heads = [f"{short_prompt(p, trigger) if i == 0 or columns[i - 1][0] != p else ''}\ns{s}"
             for i, (p, s) in enumerate(columns)]
    grid_image = labelled_grid(grid, labels, heads, thumb=96,
                               title=f"{run.character}: the same prompts and seeds per iteration "
                                     "(green: matches the character; red: another face or none)")
    return grid_image, inputs


def _published_cells(run: PartitionRun, iteration: str, inputs: list[dict]) -> dict | None:
    """{(prompt, seed): Tile} of an earlier iteration's published evaluation, None when it cannot be read."""
    import pyarrow.parquet as pq

    from flen_resources.storage import DvcError, DvcStore, PartitionMissing

    try:
        path, md5 = DvcStore(run.project).published(run.asset, run.character, iteration)
        manifest = pq.read_table(path / MANIFEST).to_pylist()
        promoted = json.loads((path / EVAL_METRICS).read_text()).get("promoted_step")
    except (PartitionMissing, DvcError, OSError) as exc:
        if run.context is not None:
            run.context.log.warning(f"evolution grid: {run.asset} {run.character}|{iteration} not read: {exc}")
        return None
    inputs.append({"asset": run.asset, "iteration": iteration, "dvc_md5": md5})
    cells = {}
    # An evaluation of several checkpoints shows its promoted one (older ones evaluated one step, without the column).
    for r in (r for r in manifest if promoted is None or r.get("step") in (None, int(promoted))):
        try:
            img = Image.open(path / r["file"])
            img.load()
        except OSError:
            img = None
        cells[(r["prompt"], r["seed"])] = Tile(img, _verdict(r), r["same_person"])
    return cells


def _history(run: PartitionRun, current: dict) -> list[dict]:
    """Latest metrics of every iteration of this character (from lineage), this one included,
    also written to data/reports/eval_history.csv (the DVC plot of dvc.yaml)."""
    rows = run.lineage.rows(
        "SELECT iteration, name, value FROM metrics WHERE asset='lora_eval' AND character=$c "
        "QUALIFY row_number() OVER (PARTITION BY iteration, name ORDER BY recorded_at DESC) = 1",
        {"c": run.character})
    table: dict[str, dict] = {}
    for r in rows:
        table.setdefault(r["iteration"], {"iteration": r["iteration"]})[r["name"]] = r["value"]
    table[run.iteration] = {"iteration": run.iteration, **current}
    history = sorted(table.values(), key=lambda h: int(h["iteration"][1:]))
    report = run.project.data_dir / "reports" / f"eval_history-{run.character}.csv"
    keys = ["iteration", "identity_consistency", "face_detected_rate", "mean_distance", "diversity"]
    lines = [",".join(keys)] + [",".join(str(h.get(k, "")) for k in keys) for h in history]
    write_text_atomic(report, "\n".join(lines) + "\n")
    return history


class SyntheticConfig(dg.Config):
    """Generations of LoRA vN to review; accepted ones join training set v(N+1)."""

    prompts: list[str] = ["photo of {trigger}, three-quarter view, studio light",
                          "photo of {trigger} smiling outdoors", "close-up photo of {trigger}, soft light",
                          "photo of {trigger} in a city street at night"]
    seeds: list[int] | None = None  # null: the run settings' (1 on a CPU, 2 on a 24 GB card, 4 on a large card)
    size: int | None = None  # null: the run settings' (64 px on a CPU, 1024 on a card)
    steps: int | None = None  # null: the run settings' (2 on a CPU, 28 on a card)
    lora_weight: float = 1.0
    # '' takes the character's review policy (`flen character policy`), else auto | required | mixed.
    review_policy: str = ""
    review_margin: float = -1.0  # mixed: borderline band around the identity threshold; < 0: the character's


@partition_asset(GROUP, pool=GPU_POOL)
def synthetic_batch(context: dg.AssetExecutionContext, config: SyntheticConfig, project: ProjectResource,
                    generator: GeneratorResource, faces: FaceResource, run_settings: RunSettingsResource,
                    flux_lora: PartitionFolder, lora_eval: PartitionFolder,
                    identity_reference: PartitionFolder, training_set: PartitionFolder) -> dg.Output:
    """Images generated with LoRA vN's promoted checkpoint (lora_eval's rule or `flen promote`), each gated
    like an enriched image (one face, identity, size, sharpness, duplicates) with a review decision; the
    accepted ones feed training set v(N+1)."""
    run = PartitionRun.start(context, project)
    config = run.sized(config, run_settings)
    reference = Reference.load(identity_reference.path)
    trigger = trigger_word(training_set.rows(), run.character)
    prompts = config_prompts("synthetic_batch", config.prompts, trigger)
    gen = generator.get()
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "images").mkdir()
    part_rel = run.project.relative(run.project.partition_dir(run.asset, run.character, run.iteration))
    lora_id = f"flux_lora:{flux_lora.dvc_md5}"
    lora = promoted_lora(run.lineage, flux_lora.path, run.character, run.iteration, flux_lora.dvc_md5,
                         FLUX_LORA_FILE, FLUX_LORA_COMFYUI_FILE)
    context.log.info(f"generating with LoRA {run.iteration} at {lora.describe()}")
    policy = review_policy(run, config.review_policy, config.review_margin)
    judge = ImageJudge(faces.analyzer, reference, GateSettings(), policy,
                       human_decisions(run.project, run.lineage, run.asset, run.character, run.iteration), run.stamp)
    rows, tiles, image_rows, edge_rows, decision_rows = [], [], [], [], []
    for out in gen.generate_grid(prompts, config.seeds, lora=lora.file, lora_weight=config.lora_weight,
                                 width=config.size, height=config.size, steps=config.steps):
        prompt = out.prompt
        image_id, png = save_png(out.image, staged / "images")
        judged = judge.judge(image_id, out.image, image_id[:12])
        caption_hint = prompt.removeprefix("photo of ").replace(trigger, "").strip(" ,")
        # Generated images have no face_box column (their manifest predates it; its md5 stays).
        measures = {k: v for k, v in judged.gate.measures.items() if k != "face_box"}
        rows.append(dict(image_id=image_id, image_path=f"images/{png.name}", prompt=prompt, seed=out.seed,
                         model=out.model, adapters=to_json(out.adapters),
                         **judged.review_columns(reference.threshold), caption=caption_hint, **measures))
        now = utcnow()
        image_rows.append(run.stamp(image_id=image_id, path=f"{part_rel}/images/{png.name}", width=out.image.width,
                                    height=out.image.height, status="generated", created_at=now))
        edge_rows.append(run.stamp(child_id=image_id, parent_id=lora_id, operation="generate", prompt=prompt,
                                   seed=out.seed, model=out.model,
                                   params=to_json({**out.params, "loras": out.adapters,
                                                   "checkpoint_step": lora.step}), created_at=now))
        decision_rows += judged.decision_rows
        failed = judged.gate.failed_names
        tiles.append(Tile(out.image, f"s{out.seed} " + ("ok" if judged.accepted else
                                                        failed[0] if failed else judged.verdict.status),
                          judged.accepted))
    write_manifest(rows, staged)
    run.lineage.append("images", image_rows)
    run.lineage.append("edges", edge_rows)
    run.lineage.append("decisions", decision_rows)
    n_ok = sum(r["accepted"] for r in rows)
    n_pending = sum(r["review_status"] == "pending" for r in rows)
    note = ("" if n_ok or n_pending else "none accepted: with the tiny random-weight pack the generations are noise, which "
            "the face gate rejects — expected on the embedded defaults")
    if note:
        context.log.info(note)
    return publish(run, project, staged,
                   params={**config.model_dump(), "lora_step": lora.step, "lora_eval_md5": lora_eval.dvc_md5},
                   models={"generator": gen.model_id()},
                   metadata={"generated": len(rows), "accepted": n_ok, "rejected": len(rows) - n_ok - n_pending,
                             "pending": n_pending, "lora_md5": flux_lora.dvc_md5,
                             "lora_checkpoint": lora.describe(),
                             **review_metadata(run.project, run.asset, run.character, run.iteration, judge.verdicts, policy),
                             **({"note": note} if note else {})},
                   sheet=tiles)


@dg.asset_check(asset=synthetic_batch, blocking=True, partitions_def=character_iteration,
                description="No generation awaits human review. Training set v(N+1) reads only a fully reviewed "
                            "batch, and next_iteration_sensor waits for this.")
def synthetic_review_complete(context: dg.AssetCheckExecutionContext, project: ProjectResource,
                              synthetic_batch: PartitionFolder) -> dg.AssetCheckResult:
    character, iteration = partition_keys(context)
    return review_check(project.project, project.lineage, "synthetic_batch", character, iteration)
