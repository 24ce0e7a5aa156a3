"""Curation: gate every candidate image, then assemble the captioned training set."""


import json
import shutil
from collections import Counter
from dataclasses import dataclass

import dagster as dg
import numpy as np
from PIL import Image
from tqdm import tqdm

from flen_assets.assets.common import PartitionRun, json_col, partition_asset, publish, write_manifest
from flen_assets.dagster_resources import FaceResource, ProjectResource
from flen_assets.partitions import character_iteration
from flen_assets.review.gate import PASSED, human_decisions, review_check, review_metadata, reviewed_statuses, verdict
from flen_assets.review.policy import POLICIES, character_policy
from flen_assets.visuals import Tile
from flen_io_managers.partition_folder import PartitionFolder, partition_keys
from flen_resources.faces import face_distance
from flen_resources.imaging import color_hash, is_near_duplicate, perceptual_hash, sharpness
from flen_resources.lineage import utcnow

GROUP = "curation"


class FilterConfig(dg.Config):
    """Gate thresholds. The identity threshold comes from identity_reference."""

    min_face_px: int = 40
    min_face_sharpness: float = 20.0  # variance of the Laplacian inside the face box
    near_duplicate_distance: int = 4  # pHash Hamming distance (with matching colours) to a kept image
    # Review policy: '' takes the character's own (`flen character policy NAME ...`, default auto);
    # auto | required | mixed override it for this run. See flen_assets/review/policy.py.
    review_policy: str = ""
    review_margin: float = -1.0  # mixed: borderline band around the identity threshold; < 0: the character's

    def policy(self, project, character: str):
        """The ReviewPolicy for `character` under this config."""
        if self.review_policy and self.review_policy not in POLICIES:
            raise dg.Failure(f"unknown review_policy {self.review_policy!r}: use one of {', '.join(POLICIES)} "
                             "(or leave it empty for the character's own)")
        return character_policy(project, character, self.review_policy,
                                None if self.review_margin < 0 else self.review_margin)


@dataclass
class GateResult:
    gate: str
    passed: bool
    value: float | None
    threshold: float | None
    reason: str


def gate_image(img: Image.Image, analyzer, reference: np.ndarray, threshold: float,
               kept_hashes: list[tuple[str, str, str]],
               config: FilterConfig) -> tuple[list[GateResult], dict]:
    """Run every gate on one image; returns the per-gate results and the measurements."""
    faces = analyzer.analyze(img)
    face = faces[0] if faces else None
    phash, colors = perceptual_hash(img), color_hash(img)
    results = [GateResult("one_face", len(faces) == 1, float(len(faces)), 1.0,
                          "one face" if len(faces) == 1 else ("no face found" if not faces else f"{len(faces)} faces found"))]
    dist = face_distance(face.embedding, reference) if face else None
    results.append(GateResult("identity", dist is not None and dist <= threshold, dist, threshold,
                              "no face to compare" if dist is None else
                              (f"same person (distance {dist:.3f} <= {threshold:.3f})" if dist <= threshold
                               else f"identity drift: distance {dist:.3f} > {threshold:.3f}")))
    size = face.size if face else 0
    results.append(GateResult("face_size", size >= config.min_face_px, float(size), float(config.min_face_px),
                              f"face {size}px" + ("" if size >= config.min_face_px else f" < {config.min_face_px}px")))
    sharp = sharpness(img, face.box) if face else 0.0
    results.append(GateResult("sharpness", sharp >= config.min_face_sharpness, sharp, config.min_face_sharpness,
                              f"face sharpness {sharp:.1f}" + ("" if sharp >= config.min_face_sharpness else " too blurry")))
    dup = next((name for h, c, name in kept_hashes
                if is_near_duplicate(h, c, phash, colors, config.near_duplicate_distance)), None)
    results.append(GateResult("duplicate", dup is None, None, float(config.near_duplicate_distance),
                              "unique" if dup is None else f"near-duplicate of {dup}"))
    measures = dict(n_faces=len(faces), identity_distance=dist, face_size=size, face_sharpness=sharp, phash=phash, colorhash=colors,
                    duplicate_of=dup, face_box=json_col(face.box) if face else None)
    return results, measures


@partition_asset(GROUP)
def filtered_images(context: dg.AssetExecutionContext, config: FilterConfig, project: ProjectResource,
                    faces: FaceResource, identity_reference: PartitionFolder, enriched_images: PartitionFolder,
                    source_images: PartitionFolder) -> dg.Output:
    """Gate results for every enriched image: one face, identity distance to the reference, face
    size, face sharpness and near-duplicates, then the review decision. Each image gets a decision
    and the reason for it, in gates.parquet (the manifest) and in lineage."""
    run = PartitionRun.start(context, project)
    ref = json.loads((identity_reference.path / "reference.json").read_text())
    reference, threshold = np.array(ref["embedding"]), float(ref["threshold"])
    kept_hashes = [(r["phash"], r["colorhash"], r["original_name"])
                   for r in source_images.rows() if r["status"] == "accepted"]
    staged = project.dvc.stage(run.asset, run.character, run.iteration)

    policy = config.policy(run.project, run.character)
    humans = human_decisions(run.project, run.lineage, run.asset, run.character, run.iteration)
    rows, decision_rows, tiles, verdicts = [], [], [], []
    for cand in tqdm(enriched_images.rows(), desc=f"gate {run.character}/{run.iteration}", unit="img"):
        img = Image.open(enriched_images.path / cand["image_path"]).convert("RGB")
        results, measures = gate_image(img, faces.analyzer, reference, threshold, kept_hashes, config)
        failed = [g for g in results if not g.passed]
        decided = verdict(policy, [g.gate for g in failed], measures["identity_distance"], threshold,
                          humans.get(cand["image_id"]))
        verdicts.append(decided)
        accepted = decided.accepted
        label = f"{cand['recipe_id']} · {cand['parent_name']}"
        if not failed:  # passed the automatic gates: later near-duplicates of it are duplicates, whatever review says
            kept_hashes.append((measures["phash"], measures["colorhash"], label))
        gate_reason = "passed all gates" if not failed else "; ".join(g.reason for g in failed)
        reason = {"accepted": gate_reason, "rejected": gate_reason, "pending": "awaiting human review"}[decided.status]
        if decided.decided_by == "human":
            reason = f"{decided.status} by a human ({gate_reason})"
        rows.append(dict(image_id=cand["image_id"], image_path=cand["image_path"], parent_id=cand["parent_id"],
                         parent_name=cand["parent_name"], recipe_id=cand["recipe_id"], caption=cand["caption"],
                         accepted=accepted, reason=reason, gate_reason=gate_reason,
                         failed_gates=",".join(g.gate for g in failed),
                         review=decided.review_text, review_status=decided.status,
                         policy_status=decided.policy_status, policy_reason=decided.policy_reason,
                         review_source=decided.decided_by,
                         identity_threshold=threshold, **measures))
        now = utcnow()
        decision_rows += [run.stamp(image_id=cand["image_id"], gate=g.gate, passed=g.passed, value=g.value,
                                    threshold=g.threshold, reason=g.reason, source="gate", decided_at=now)
                          for g in results]
        # The policy's own verdict (passed NULL: pending); human decisions are rows of their own.
        decision_rows.append(run.stamp(image_id=cand["image_id"], gate="policy", passed=PASSED[decided.policy_status],
                                       value=measures["identity_distance"], threshold=threshold,
                                       reason=decided.policy_reason, source="policy", decided_at=now))
        decision_rows.append(run.stamp(image_id=cand["image_id"], gate="final", passed=PASSED[decided.status],
                                       reason=reason, source="gate", decided_at=now))
        tag = "" if accepted else ("[pending] " if decided.status == "pending" else
                                   f"[{failed[0].gate if failed else 'review'}] ")
        tiles.append(Tile(img, tag + label, accepted))
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
                            f"run `flen review {run.character} --iteration {run.iteration}`")
    return publish(run, project, staged, params={**config.model_dump(), "policy": policy.policy,
                                                 "margin": policy.margin},
                   models={"faces": f"face_recognition/{faces.model}"},
                   metadata={"candidates": len(rows), "accepted": n_ok, "rejected": len(rows) - n_ok - n_pending,
                             "pending": n_pending,
                             **review_metadata(run.asset, run.character, run.iteration, verdicts, policy),
                             "acceptance_rate": round(n_ok / len(rows), 3) if rows else 0.0,
                             "failed_by_gate": dict(fails), "identity_threshold": threshold,
                             "identity_distance_mean": round(float(np.mean(dists)), 4) if dists else None,
                             "identity_distance_max": round(float(np.max(dists)), 4) if dists else None},
                   sheet=tiles)


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


@partition_asset(GROUP)
def training_set(context: dg.AssetExecutionContext, config: TrainingSetConfig, project: ProjectResource,
                 source_images: PartitionFolder, filtered_images: PartitionFolder,
                 enriched_images: PartitionFolder) -> dg.Output:
    """The images a LoRA trains on, each with a caption (trigger word + what the edit changed),
    laid out as images/<id>.png + images/<id>.txt, the format ai-toolkit and kohya read.
    From v2 on it also holds the accepted synthetic images of v(N-1) (read through the lineage
    store: Dagster forbids that cycle in the graph)."""
    run = PartitionRun.start(context, project)
    trigger = config.trigger_word or f"{run.character}_flen"
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "images").mkdir()
    members: list[dict] = []
    for src in source_images.rows():
        if src["status"] == "accepted":
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
    return publish(run, project, staged, params={**config.model_dump(), "trigger": trigger},
                   metadata={"images": len(rows), "by_origin": dict(origins), "trigger": trigger,
                             "example_caption": rows[-1]["caption"],
                             "synthetic_from_previous": origins.get("synthetic", 0)},
                   sheet=tiles)
