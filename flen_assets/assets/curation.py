"""Curation: gate every candidate image, then assemble the captioned training set."""


import shutil
from collections import Counter

import dagster as dg
import numpy as np
from PIL import Image
from tqdm import tqdm

from flen_assets.assets.common import PartitionRun, partition_asset, partition_check, publish, write_manifest
from flen_assets.assets.gating import ImageJudge, Judged, review_policy
from flen_assets.dagster_resources import FaceResource, ProjectResource
from flen_assets.partitions import character_iteration
from flen_assets.review.gate import human_decisions, review_check, review_metadata, reviewed_statuses
from flen_assets.review.store import apply_command, review_command
from flen_assets.visuals import Tile
from flen_io_managers.partition_folder import PartitionFolder, partition_keys
from flen_resources.identity import GateSettings, KeptImages, Reference
from flen_resources.lineage import utcnow
from flen_resources.project import MANIFEST
from flen_resources.recipe_report import entry_stats, report_markdown
from flen_resources.storage import DvcStore, PartitionMissing

GROUP = "curation"


class FilterConfig(dg.Config):
    """Gate thresholds (flen_resources.identity.GateSettings). The identity threshold comes from identity_reference."""

    min_face_px: int = GateSettings.min_face_px
    min_face_sharpness: float = GateSettings.min_face_sharpness  # variance of the Laplacian inside the face box
    near_duplicate_distance: int = GateSettings.near_duplicate_distance  # pHash Hamming distance to a kept image
    # Review policy: '' takes the character's own (`flen character policy NAME ...`, default auto);
    # auto | required | mixed override it for this run. See flen_assets/review/policy.py.
    review_policy: str = ""
    review_margin: float = -1.0  # mixed: borderline band around the identity threshold; < 0: the character's

    def gate_settings(self) -> GateSettings:
        return GateSettings(self.min_face_px, self.min_face_sharpness, self.near_duplicate_distance)


@partition_asset(GROUP)
def filtered_images(context: dg.AssetExecutionContext, config: FilterConfig, project: ProjectResource,
                    faces: FaceResource, identity_reference: PartitionFolder, enriched_images: PartitionFolder,
                    source_images: PartitionFolder) -> dg.Output:
    """Gate results for every enriched image: one face, identity distance to the reference, face
    size, face sharpness and near-duplicates, then the review decision. Each image gets a decision
    and the reason for it, in gates.parquet (the manifest) and in lineage."""
    run = PartitionRun.start(context, project)
    reference = Reference.load(identity_reference.path)
    sources = KeptImages([(r["phash"], r["colorhash"], r["original_name"])
                          for r in source_images.rows() if r["status"] == "accepted"])
    policy = review_policy(run, config.review_policy, config.review_margin)
    judge = ImageJudge(faces.analyzer, reference, config.gate_settings(), policy,
                       human_decisions(run.project, run.lineage, run.asset, run.character, run.iteration),
                       run.stamp, kept=sources)
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    rows, decision_rows, tiles = [], [], []
    for cand in tqdm(enriched_images.rows(), desc=f"gate {run.character}/{run.iteration}", unit="img"):
        img = Image.open(enriched_images.path / cand["image_path"]).convert("RGB")
        label = f"{cand['recipe_id']} · {cand['parent_name']}"
        judged = judge.judge(cand["image_id"], img, label)
        rows.append(dict(image_id=cand["image_id"], image_path=cand["image_path"], parent_id=cand["parent_id"],
                         parent_name=cand["parent_name"], recipe_id=cand["recipe_id"], caption=cand["caption"],
                         **judged.review_columns(reference.threshold), **judged.gate.measures))
        decision_rows += judged.decision_rows
        tiles.append(Tile(img, tile_tag(judged) + label, judged.accepted))
    write_manifest(rows, staged)
    run.lineage.append("decisions", decision_rows)
    n_ok = sum(r["accepted"] for r in rows)
    n_pending = sum(r["review_status"] == "pending" for r in rows)
    fails = Counter(g for r in rows for g in r["failed_gates"].split(",") if g)
    dists = [r["identity_distance"] for r in rows if r["identity_distance"] is not None]
    run.lineage.append("metrics", [run.stamp(name=n, value=float(v), recorded_at=utcnow()) for n, v in
                                   [("candidates", len(rows)), ("accepted", n_ok), ("pending", n_pending)]])
    if n_pending:
        context.log.warning(f"{n_pending} image(s) await human review (policy {policy.policy}): "
                            f"run `{review_command(run.project, run.character, run.iteration)}`, then apply the "
                            f"decisions with `{apply_command(run.project, run.character, run.iteration)}`")
    return publish(run, project, staged, params={**config.model_dump(), "policy": policy.policy,
                                                 "margin": policy.margin},
                   models={"faces": f"face_recognition/{faces.model}"},
                   metadata={"candidates": len(rows), "accepted": n_ok, "rejected": len(rows) - n_ok - n_pending,
                             "pending": n_pending,
                             **review_metadata(run.project, run.asset, run.character, run.iteration, judge.verdicts, policy),
                             "acceptance_rate": round(n_ok / len(rows), 3) if rows else 0.0,
                             "failed_by_gate": dict(fails), "identity_threshold": reference.threshold,
                             "identity_distance_mean": round(float(np.mean(dists)), 4) if dists else None,
                             "identity_distance_max": round(float(np.max(dists)), 4) if dists else None,
                             # which recipe entries kept the character here (`flen recipes report` over all)
                             "recipe_entries": dg.MetadataValue.md(report_markdown(entry_stats(
                                 [staged / MANIFEST], [enriched_images.path / MANIFEST], across=True)))},
                   sheet=tiles)


def tile_tag(judged: Judged) -> str:
    """The contact-sheet prefix of a filtered image: empty when accepted, else why not."""
    if judged.accepted:
        return ""
    if judged.verdict.status == "pending":
        return "[pending] "
    return f"[{judged.gate.failed_names[0] if judged.gate.failed else 'review'}] "


@dg.asset_check(asset=filtered_images, blocking=True, partitions_def=character_iteration,
                description="No image awaits human review (review policy required or mixed). Blocking: while it "
                            "fails, nothing downstream (training set, edit triplets) runs on an unreviewed set.")
def review_complete(context: dg.AssetCheckExecutionContext, project: ProjectResource,
                    filtered_images: PartitionFolder) -> dg.AssetCheckResult:
    character, iteration = partition_keys(context)
    return review_check(project.project, project.lineage, "filtered_images", character, iteration)


class TrainingSetConfig(dg.Config):
    """Captioning of the training set."""

    trigger_word: str = ""  # empty: '<character>_flen', a rare token bound to the character
    caption_prefix: str = "photo of"


@partition_asset(GROUP, check_specs=[partition_check(
    "differs_from_previous", "training_set",
    "Training set vN differs from v(N-1): it gained accepted synthetic images of v(N-1) (or new sources or edits). "
    "An identical set trains the same LoRA again: review v(N-1)'s synthetic batch before iterating.")])
def training_set(context: dg.AssetExecutionContext, config: TrainingSetConfig, project: ProjectResource,
                 source_images: PartitionFolder, identity_reference: PartitionFolder,
                 filtered_images: PartitionFolder, enriched_images: PartitionFolder):
    """The images a LoRA trains on, each with a caption (trigger word + what the edit changed),
    laid out as images/<id>.png + images/<id>.txt, the format ai-toolkit and kohya read.
    From v2 on it also holds the accepted synthetic images of v(N-1) (read through the lineage
    store: Dagster forbids that cycle in the graph)."""
    run = PartitionRun.start(context, project)
    trigger = config.trigger_word or f"{run.character}_flen"
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "images").mkdir()
    members: list[dict] = []
    # A source photo joins when identity_reference (or a person since) accepted it: an identity
    # outlier (another person in the inbox) stays out unless someone accepts it on the review page.
    sources_reviewed = reviewed_statuses(run.project, run.lineage, "identity_reference", run.character,
                                         run.iteration, f"training_set {run.character}|{run.iteration}")
    for src in source_images.rows():
        if src["status"] == "accepted" and sources_reviewed.get(src["image_id"]) == "accepted":
            members.append(dict(image_id=src["image_id"], src=source_images.path / src["image_path"], origin="source",
                                parent_id=src["original_id"], recipe_id=None, fragment=""))
    # Human decisions made since filtered_images was published count too (the latest wins); an
    # image still pending review stops the run here, so nothing trains on an unreviewed set.
    reviewed = reviewed_statuses(run.project, run.lineage, "filtered_images", run.character, run.iteration,
                                 f"training_set {run.character}|{run.iteration}")
    for cand in filtered_images.rows():
        if reviewed.get(cand["image_id"], "accepted" if cand["accepted"] else "rejected") == "accepted":
            members.append(dict(image_id=cand["image_id"], src=enriched_images.path / cand["image_path"],
                                origin="enriched", parent_id=cand["parent_id"], recipe_id=cand["recipe_id"],
                                fragment=cand["caption"]))
    synthetic = run.previous("synthetic_batch")
    synthetic_reviewed = reviewed_statuses(run.project, run.lineage, "synthetic_batch", run.character,
                                           synthetic.iteration, f"training_set {run.character}|{run.iteration}") \
        if synthetic else {}
    for gen in synthetic.rows() if synthetic else []:
        if synthetic_reviewed.get(gen["image_id"], "accepted" if gen["accepted"] else "rejected") == "accepted":
            members.append(dict(image_id=gen["image_id"], src=synthetic.path / gen["image_path"], origin="synthetic",
                                parent_id=f"flux_lora:{synthetic.iteration}", recipe_id=None,
                                fragment=gen["caption"]))
    if not members:
        raise dg.Failure(f"the training set for {run.character}|{run.iteration} would be empty: "
                         "no source or enriched image was accepted (see filtered_images)")
    rows, tiles = [], []
    part_rel = run.project.relative(run.project.partition_dir(run.asset, run.character, run.iteration))
    for m in members:
        caption = f"{config.caption_prefix} {trigger}" + (f", {m['fragment']}" if m["fragment"] else "")
        file = f"images/{m['image_id']}.png"
        shutil.copyfile(m["src"], staged / file)
        (staged / f"images/{m['image_id']}.txt").write_text(caption + "\n")
        rows.append(dict(image_id=m["image_id"], file=file, caption=caption, origin=m["origin"],
                         parent_id=m["parent_id"], recipe_id=m["recipe_id"]))
        tiles.append(Tile(Image.open(m["src"]), f"{m['origin']}: {m['recipe_id'] or 'photo'}", True))
    write_manifest(rows, staged)
    now = utcnow()
    run.lineage.append("members", [run.stamp(image_id=r["image_id"], path=f"{part_rel}/{r['file']}", origin=r["origin"],
                                             caption=r["caption"], created_at=now) for r in rows])
    origins = Counter(r["origin"] for r in rows)
    same = same_as_previous(run, rows, synthetic)
    if same:
        context.log.warning(f"training_set {run.character}|{run.iteration}: {same}")
    yield publish(run, project, staged, params={**config.model_dump(), "trigger": trigger},
                  metadata={"images": len(rows), "by_origin": dict(origins), "trigger": trigger,
                            "example_caption": rows[-1]["caption"],
                            "synthetic_from_previous": origins.get("synthetic", 0),
                            **({"identical_to_previous": dg.MetadataValue.md(same)} if same else {})},
                  sheet=tiles)
    prev = run.previous_iteration()
    yield dg.AssetCheckResult(
        check_name="differs_from_previous", passed=not same, severity=dg.AssetCheckSeverity.WARN,
        description=same or (f"{run.character}|{run.iteration} differs from {prev} "
                             f"({origins.get('synthetic', 0)} synthetic image(s) of {prev} joined)" if prev
                             else f"{run.character}|{run.iteration} is the first iteration: nothing to compare with"),
        metadata={"images": len(rows), "synthetic_from_previous": origins.get("synthetic", 0)})


def same_as_previous(run: PartitionRun, rows: list[dict], synthetic: PartitionFolder | None) -> str:
    """Why training set vN is a copy of v(N-1) (the same image ids, by sha256, with the same captions),
    or '' when it differs or there is no v(N-1). A copy trains the same LoRA again: almost always
    no synthetic image of v(N-1) was accepted (the review page decides them)."""
    prev = run.previous_iteration()
    if prev is None:
        return ""
    try:
        path, md5 = DvcStore(run.project).published("training_set", run.character, prev)
    except PartitionMissing:
        return ""
    before = PartitionFolder("training_set", run.character, prev, path, md5).rows()
    if {(r["image_id"], r["caption"]) for r in before} != {(r["image_id"], r["caption"]) for r in rows}:
        return ""
    generated = len(synthetic.rows()) if synthetic else 0
    return (f"identical to {prev} (the same {len(rows)} images and captions; {prev}'s dvc md5 {md5}): "
            f"no synthetic image was accepted in {prev}'s review ({generated} generated by LoRA {prev}); "
            f"review them with `{review_command(run.project, run.character, prev, 'synthetic_batch')}` before "
            f"iterating, or {run.iteration} trains the same LoRA again")
