"""The FLUX LoRA of an iteration, its identity evaluation, and the synthetic batch it generates."""

import json
import shutil
from pathlib import Path

import dagster as dg
from PIL import Image

from flen_assets.assets.common import (
    LoraAssetConfig,
    PartitionRun,
    partition_asset,
    partition_check,
    publish,
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
from flen_assets.visuals import Tile, markdown_thumbnail
from flen_io_managers.partition_folder import PartitionFolder, partition_keys
from flen_resources.atomic import write_text_atomic
from flen_resources.identity import GateSettings, Reference, score_generations
from flen_resources.imaging import save_png
from flen_resources.lineage import to_json, utcnow
from flen_resources.project import FLUX_LORA_COMFYUI_FILE, FLUX_LORA_FILE, LOSS_CURVE

GROUP = "lora"


class FluxLoraConfig(LoraAssetConfig):
    """FLUX LoRA training knobs (defaults: a character LoRA, ~1500 steps, r16, lr 1e-4)."""


@partition_asset(GROUP, pool="gpu")
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
                             "final_loss": round(final_loss, 5),
                             "fixed_batch_loss": f"{result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}",
                             "train_seconds": round(result.seconds, 1), "peak_gpu_gib": result.peak_gib or 0.0,
                             "training_set_md5": training_set.dvc_md5,
                             "loss_curve": dg.MetadataValue.md(markdown_thumbnail(curve, alt="loss curve"))})


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


def _trigger(training_set_rows: list[dict], character: str) -> str:
    caption = training_set_rows[0]["caption"] if training_set_rows else ""
    return caption.removeprefix("photo of ").split(",")[0] or f"{character}_flen"


@partition_asset(GROUP, pool="gpu", check_specs=[
    partition_check("not_worse_than_previous", "lora_eval",
                    "Identity consistency of vN is at least that of v(N-1)."),
    partition_check("meets_target", "lora_eval",
                    "Identity consistency reaches the target (70% by default)."),
])
def lora_eval(context: dg.AssetExecutionContext, config: EvalConfig, project: ProjectResource,
              generator: GeneratorResource, faces: FaceResource, run_settings: RunSettingsResource,
              flux_lora: PartitionFolder,
              identity_reference: PartitionFolder, training_set: PartitionFolder):
    """A fixed prompt x seed grid generated with LoRA vN: identity-consistency rate (share of images
    whose face matches the reference within the threshold), face-detected rate, mean distance and
    diversity, a contact sheet, and the metrics of every iteration so far as a plot."""
    run = PartitionRun.start(context, project)
    config = run.sized(config, run_settings)
    reference = Reference.load(identity_reference.path)
    trigger = _trigger(training_set.rows(), run.character)
    gen = generator.get()
    images, rows, tiles = [], [], []
    for template in config.prompts:
        prompt = template.format(trigger=trigger)
        for out in gen.generate(prompt, config.seeds, lora=flux_lora.path / FLUX_LORA_FILE,
                                lora_weight=config.lora_weight, width=config.size, height=config.size,
                                steps=config.steps):
            images.append(out.image)
            rows.append({"prompt": prompt, "seed": out.seed, "model": out.model, "lora_weight": config.lora_weight})
    metrics, scored = score_generations(images, faces.analyzer, reference)
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "images").mkdir()
    for i, (img, row, score) in enumerate(zip(images, rows, scored)):
        img.save(staged / "images" / f"{i:03d}.png")
        row.update(file=f"images/{i:03d}.png", **score)
        label = f"s{row['seed']} " + ("same" if score["same_person"] else ("no face" if not score["face"] else
                                                                         f"d={score['distance']:.2f}"))
        tiles.append(Tile(img, label, score["same_person"]))
    write_manifest(rows, staged)
    (staged / "metrics.json").write_text(json.dumps(metrics, indent=1))
    run.lineage.append("metrics", [run.stamp(name=k, value=float(v), recorded_at=utcnow()) for k, v in metrics.items()])
    history = _history(run, metrics)
    # The partition's plot stops at this iteration: re-materializing v1 after v2 exists gives the same content.
    upto = [h for h in history if int(h["iteration"][1:]) <= int(run.iteration[1:])]
    _plot_history(upto, staged / "history.png", run.character)
    previous = [h for h in history if h["iteration"] == run.previous_iteration()]
    consistency = metrics["identity_consistency"]
    yield publish(run, project, staged, params=config.model_dump(), models={"generator": gen.model_id()},
                  metadata={**{k: round(v, 4) for k, v in metrics.items()}, "images": len(images),
                            "threshold": reference.threshold, "history": dg.MetadataValue.md(markdown_thumbnail(
                                Image.open(staged / "history.png"), alt="metrics across iterations"))},
                  sheet=tiles)
    prev_value = previous[-1]["identity_consistency"] if previous else None
    yield dg.AssetCheckResult(check_name="not_worse_than_previous", severity=dg.AssetCheckSeverity.WARN,
                              passed=prev_value is None or consistency >= prev_value,
                              metadata={"this": consistency, "previous": prev_value if prev_value is not None else -1.0})
    yield dg.AssetCheckResult(check_name="meets_target", severity=dg.AssetCheckSeverity.WARN,
                              passed=consistency >= config.target_consistency,
                              metadata={"identity_consistency": consistency, "target": config.target_consistency})


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


def _plot_history(history: list[dict], path: Path, character: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [h["iteration"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=110)
    for key, colour in (("identity_consistency", "#1f4e79"), ("face_detected_rate", "#7aa6c2")):
        ax.plot(xs, [h.get(key, float("nan")) for h in history], marker="o", color=colour, label=key)
    ax.axhline(0.7, color="#c0392b", linestyle="--", linewidth=1, label="target 70%")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{character}: LoRA evaluation per iteration")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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


@partition_asset(GROUP, pool="gpu")
def synthetic_batch(context: dg.AssetExecutionContext, config: SyntheticConfig, project: ProjectResource,
                    generator: GeneratorResource, faces: FaceResource, run_settings: RunSettingsResource,
                    flux_lora: PartitionFolder,
                    identity_reference: PartitionFolder, training_set: PartitionFolder) -> dg.Output:
    """Images generated with LoRA vN, each gated like an enriched image (one face, identity, size,
    sharpness, duplicates) with a review decision; the accepted ones feed training set v(N+1)."""
    run = PartitionRun.start(context, project)
    config = run.sized(config, run_settings)
    reference = Reference.load(identity_reference.path)
    trigger = _trigger(training_set.rows(), run.character)
    gen = generator.get()
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "images").mkdir()
    part_rel = run.project.relative(run.project.partition_dir(run.asset, run.character, run.iteration))
    lora_id = f"flux_lora:{flux_lora.dvc_md5}"
    policy = review_policy(run, config.review_policy, config.review_margin)
    judge = ImageJudge(faces.analyzer, reference, GateSettings(), policy,
                       human_decisions(run.project, run.lineage, run.asset, run.character, run.iteration), run.stamp)
    rows, tiles, image_rows, edge_rows, decision_rows = [], [], [], [], []
    for template in config.prompts:
        prompt = template.format(trigger=trigger)
        for out in gen.generate(prompt, config.seeds, lora=flux_lora.path / FLUX_LORA_FILE,
                                lora_weight=config.lora_weight, width=config.size, height=config.size,
                                steps=config.steps):
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
                                       params=to_json({**out.params, "loras": out.adapters}), created_at=now))
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
    return publish(run, project, staged, params=config.model_dump(), models={"generator": gen.model_id()},
                   metadata={"generated": len(rows), "accepted": n_ok, "rejected": len(rows) - n_ok - n_pending,
                             "pending": n_pending, "lora_md5": flux_lora.dvc_md5,
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
