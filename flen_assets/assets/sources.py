"""Source photos and the identity reference built from them."""


import hashlib
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import numpy as np
from PIL import Image
from tqdm import tqdm

from flen_assets.assets.common import PartitionRun, partition_asset, partition_check, publish, write_manifest
from flen_assets.assets.gating import review_policy
from flen_assets.dagster_resources import FaceResource, ProjectResource
from flen_assets.partitions import character_iteration
from flen_assets.review.gate import PASSED, human_decisions, review_check, review_metadata, source_verdict
from flen_assets.visuals import Tile
from flen_io_managers.partition_folder import PartitionFolder, partition_keys
from flen_resources.forget import erased_ids
from flen_resources.identity import MIN_SOURCES_TO_CALIBRATE, Calibration, build_reference, find_inliers
from flen_resources.imaging import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    color_hash,
    decode_bytes,
    file_size_limit,
    is_near_duplicate,
    perceptual_hash,
    resize_max_side,
    save_png,
    sharpness,
)
from flen_resources.intake import IntakeError, PhotoFolder, Refused, open_photo_folder, refused_entry_id
from flen_resources.lineage import to_json, utcnow
from flen_resources.project import flen_command
from flen_resources.shared_inbox import share_inbox

GROUP = "sources"


class SourceConfig(dg.Config):
    """How inbox photos are ingested."""

    max_side: int = 1024  # normalized copies are at most this many pixels on the longer side
    max_pixels: int = DEFAULT_MAX_PIXELS  # bigger JPEGs decode at reduced scale, other files are refused
    min_face_px: int = 40  # shorter side of the face box, in normalized pixels
    near_duplicate_distance: int = 4  # pHash Hamming distance that flags a near-duplicate


@contextmanager
def open_inbox(inbox: Path) -> Iterator[PhotoFolder]:
    """inbox/<character>, scanned: its regular files, and every other entry refused (now or by `character add`)."""
    try:
        with open_photo_folder(inbox, follow=False, with_record=True) as folder:
            yield folder
    except IntakeError as exc:  # a link in place of the inbox folder: nothing in it is read
        raise dg.Failure(str(exc)) from exc


def new_row(name: str, iteration: str, **values) -> dict:
    """A manifest row for `name`, rejected until analysis says otherwise."""
    return dict(original_id=None, original_name=name, original_path=None, image_id=None,
                image_path=None, status="rejected", reason_code=None, reason=None, format=None,
                original_mode=None, width=None, height=None, exif_transposed=None, phash=None, colorhash=None,
                n_faces=None, face_box=None, face_size=None, embedding=None, sharpness=None,
                near_duplicate_of=None, ingested_in=iteration) | values


def original_suffix(name: str) -> str:
    """The extension an original keeps in the partition: lower case, letters and digits only, short."""
    return re.sub(r"[^a-z0-9.]", "", Path(name).suffix.lower())[:10]


@partition_asset(
    GROUP,
    check_specs=[
        partition_check("all_inbox_files_usable", "source_images",
                        "Every file in the inbox decoded and had one usable face."),
        partition_check("enough_sources", "source_images",
                        "At least 3 usable photos, so the identity threshold can be calibrated."),
    ],
)
def source_images(context: dg.AssetExecutionContext, config: SourceConfig, project: ProjectResource,
                  faces: FaceResource):
    """The character's photos: originals byte-exact, normalized RGB copies, hashes, faces and embeddings.

    v1 ingests inbox/CHARACTER/; later iterations carry v(N-1)'s rows and ingest new files only.
    Every file gets a row: accepted, or rejected with a reason (corrupt, no face, duplicate, ...).
    """
    run = PartitionRun.start(context, project)
    inbox = run.project.inbox_for(run.character)
    if project.bucket is not None:  # the cluster: photos another host received, and this host's for the others
        shared = share_inbox(inbox, project.bucket, run.character)
        context.log.info(f"inbox shared through the bucket: {len(shared.pushed)} pushed, {len(shared.fetched)} fetched")
    if not inbox.is_dir():
        raise dg.Failure(f"no inbox folder {inbox}: add photos with "
                         f"`{flen_command(run.project, 'character', 'add', run.character, '--from', 'DIR')}`")
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    (staged / "originals").mkdir()
    (staged / "images").mkdir()

    previous = run.previous("source_images")  # v1: None; vN: fails fast when v(N-1) is missing
    rows: list[dict] = []
    tiles: list[Tile] = []  # one per row, in the same order (flag_identity_outliers relies on it)
    for row in previous.rows() if previous else []:  # files already ingested: keep their analysis and blobs
        if not row.get("original_path"):  # a refused entry, never read: reported again below if still there
            continue
        for key in ("original_path", "image_path"):
            if row.get(key):
                shutil.copy2(previous.path / row[key], staged / row[key])
        rows.append({**row, "ingested_in": row.get("ingested_in") or run.previous_iteration()})
        shown = Image.open(staged / row["image_path"]) if row.get("image_path") else None
        tiles.append(Tile(shown, row["original_name"], row["status"] == "accepted"))
    seen_sha = {r["original_id"]: r["original_name"] for r in rows}
    accepted_hashes = [(r["phash"], r["colorhash"], r["original_name"]) for r in rows if r["status"] == "accepted"]

    carried_shas = set(seen_sha)
    erased = erased_ids(run.lineage)  # photos forgotten on request (`flen forget`) are never ingested again
    part_rel = run.project.relative(run.project.partition_dir(run.asset, run.character, run.iteration))
    image_rows, edge_rows, decision_rows = [], [], []
    new_files = 0
    with open_inbox(inbox) as folder:
        for name in tqdm(folder.files, desc=f"ingest {run.character}/{run.iteration}", unit="img"):
            try:  # one read from one O_NOFOLLOW fd: the bytes hashed are the bytes stored and decoded
                data = folder.read(name, max_bytes=file_size_limit(config.max_pixels))
            except ImageRejected as exc:  # swapped for a link or a pipe since the scan, unreadable, or too big
                folder.refused.append(Refused(name, exc.code, exc.detail))
                continue
            sha = hashlib.sha256(data).hexdigest()
            if sha in carried_shas:
                continue
            if sha in erased:  # no row, no name, no blob: the person asked to be removed
                context.log.warning("skipped an inbox file erased with `flen forget` (it stays out)")
                continue
            new_files += 1
            original_rel = f"originals/{sha}{original_suffix(name)}"
            if not (staged / original_rel).exists():
                (staged / original_rel).write_bytes(data)  # byte-exact; the inbox file is never touched
            row = new_row(name, run.iteration, original_id=sha, original_path=original_rel)
            shown = None
            try:
                if sha in seen_sha:
                    raise ImageRejected(name, "duplicate", f"exact duplicate of {seen_sha[sha]}")
                seen_sha[sha] = name
                decoded = decode_bytes(data, name, max_pixels=config.max_pixels)
                img = resize_max_side(decoded.image, config.max_side)
                shown = img
                image_id, png = save_png(img, staged / "images")
                found = faces.analyzer.analyze(img)
                row.update(image_id=image_id, image_path=f"images/{png.name}", format=decoded.format,
                           original_mode=decoded.original_mode, width=img.width, height=img.height,
                           exif_transposed=decoded.exif_transposed, phash=perceptual_hash(img), colorhash=color_hash(img),
                           n_faces=len(found), sharpness=sharpness(img, found[0].box if found else None))
                if image_id != sha:  # a PNG already in normal form keeps its id: no step to record
                    edge_rows.append(run.stamp(
                        child_id=image_id, parent_id=sha, operation="normalize", model="pillow", created_at=utcnow(),
                        params=to_json({"exif_transposed": decoded.exif_transposed, "max_side": config.max_side,
                                         "original_mode": decoded.original_mode, "original_size": decoded.original_size}
                                        | ({"decoded_scale": decoded.scale} if decoded.scale > 1 else {}))))
                if found:
                    row.update(face_box=to_json(found[0].box), face_size=found[0].size,
                               embedding=[float(v) for v in found[0].embedding])
                if not found:
                    raise ImageRejected(name, "no_face", "no face found")
                if len(found) > 1:
                    raise ImageRejected(name, "several_faces", f"{len(found)} faces found; a source must show one person")
                if found[0].size < config.min_face_px:
                    raise ImageRejected(name, "face_too_small",
                                        f"face is {found[0].size}px, below the {config.min_face_px}px minimum")
                near = [n for h, c, n in accepted_hashes
                        if is_near_duplicate(h, c, row["phash"], row["colorhash"], config.near_duplicate_distance)]
                row["near_duplicate_of"] = near[0] if near else None
                row.update(status="accepted", reason_code="ok",
                           reason="accepted" + (f" (near-duplicate of {near[0]})" if near else ""))
                accepted_hashes.append((row["phash"], row["colorhash"], name))
            except ImageRejected as exc:
                row.update(reason_code=exc.code, reason=str(exc))
                context.log.warning(f"rejected {exc}")
            rows.append(row)
            tiles.append(Tile(shown, name, row["status"] == "accepted"))
            image_rows.append(run.stamp(image_id=sha, path=f"{part_rel}/{original_rel}",
                                        original_name=name, status=row["status"], reason=row["reason"], created_at=utcnow()))
            if row["image_id"]:
                image_rows.append(run.stamp(image_id=row["image_id"], path=f"{part_rel}/{row['image_path']}",
                                            original_name=name, width=row["width"], height=row["height"],
                                            phash=row["phash"], n_faces=row["n_faces"], face_boxes=row["face_box"],
                                            embedding=row["embedding"], status=row["status"], reason=row["reason"],
                                            created_at=utcnow()))
            decision_rows.append(run.stamp(image_id=row["image_id"] or sha, gate="source",
                                           passed=row["status"] == "accepted", reason=row["reason"],
                                           source="gate", decided_at=utcnow()))
        refused = folder.refused
    for refusal in refused:  # never read: no content id, no original, only the name and why
        entry_id = refused_entry_id(refusal.name)
        rows.append(new_row(refusal.name, run.iteration, reason_code=refusal.code, reason=refusal.message))
        context.log.warning(f"rejected {refusal.message}")
        tiles.append(Tile(None, refusal.name, False))
        image_rows.append(run.stamp(image_id=entry_id, path=None, original_name=refusal.name, status="rejected",
                                    reason=refusal.message, created_at=utcnow()))
        decision_rows.append(run.stamp(image_id=entry_id, gate="source", passed=False, reason=refusal.message,
                                       source="gate", decided_at=utcnow()))

    flag_identity_outliers(rows, tiles)
    write_manifest(rows, staged)
    run.lineage.append("images", image_rows)
    run.lineage.append("edges", edge_rows)
    run.lineage.append("decisions", decision_rows)

    accepted = [r for r in rows if r["status"] == "accepted"]
    rejected = [r for r in rows if r["status"] != "accepted"]
    reasons = Counter(r["reason_code"] for r in rejected)
    reject_table = "\n".join(["| file | reason |", "|---|---|"] +
                             [f"| {r['original_name']} | {r['reason']} |" for r in rejected]) if rejected else "none"
    yield publish(run, project, staged,
                  params=config.model_dump(), models={"faces": f"face_recognition/{faces.model}"},
                  metadata={"files": len(rows), "new_files": new_files, "accepted": len(accepted),
                            "rejected": len(rejected), "rejected_by_reason": dict(reasons),
                            "rejected_files": dg.MetadataValue.md(reject_table)},
                  sheet=tiles)
    yield dg.AssetCheckResult(
        check_name="all_inbox_files_usable", passed=not rejected, severity=dg.AssetCheckSeverity.WARN,
        metadata={"rejected": len(rejected), "reasons": dg.MetadataValue.md(reject_table)})
    yield dg.AssetCheckResult(
        check_name="enough_sources", passed=len(accepted) >= 3, severity=dg.AssetCheckSeverity.WARN,
        metadata={"accepted": len(accepted)})


def flag_identity_outliers(rows: list[dict], tiles: list[Tile]) -> None:
    """Mark accepted sources that look like another person amber on the contact sheet, with the reason
    (identity_reference keeps them out of the training set unless a person accepts them)."""
    accepted = [i for i, r in enumerate(rows) if r["status"] == "accepted" and r.get("embedding")]
    if len(accepted) < MIN_SOURCES_TO_CALIBRATE:
        return
    inlier = find_inliers(np.array([rows[i]["embedding"] for i in accepted], dtype=np.float64), Calibration())
    for i, ok in zip(accepted, inlier):
        if not ok:
            tiles[i] = Tile(tiles[i].image, f"{rows[i]['original_name']} · identity outlier", True, flagged=True)


class IdentityConfig(dg.Config):
    """How the identity threshold is calibrated (flen_resources.identity.calibrate_threshold)."""

    default_threshold: float = Calibration.default_threshold
    min_threshold: float = Calibration.min_threshold
    margin: float = Calibration.margin
    outlier_distance: float = Calibration.outlier_distance

    def calibration(self) -> Calibration:
        return Calibration(self.default_threshold, self.min_threshold, self.margin, self.outlier_distance)


@partition_asset(
    GROUP,
    check_specs=[partition_check("sources_agree_with_reference", "identity_reference",
                                 "Every accepted source is within the threshold of the reference; no outliers.")],
)
def identity_reference(context: dg.AssetExecutionContext, config: IdentityConfig, project: ProjectResource,
                       source_images: PartitionFolder):
    """The character's identity: mean face embedding of the sources and a calibrated distance threshold.

    Sources farther than `outlier_distance` from the mean of the others (another person in the
    inbox) are left out of the mean, and out of the training set unless a person accepts them on
    the review page (policy auto rejects them; required and mixed ask a human first).
    """
    run = PartitionRun.start(context, project)
    sources = [r for r in source_images.rows() if r["status"] == "accepted"]
    if not sources:
        raise dg.Failure(f"no usable source photo for {run.character}|{run.iteration}: "
                         "see source_images' rejected_files metadata")
    reference, fits = build_reference(np.array([r["embedding"] for r in sources], dtype=np.float64),
                                      [r["original_name"] for r in sources], config.calibration())
    threshold, rule = reference.threshold, reference.rule
    policy = review_policy(run, "", -1.0)
    humans = human_decisions(run.project, run.lineage, run.asset, run.character, run.iteration)
    staged = project.dvc.stage(run.asset, run.character, run.iteration)
    reference.save(staged)
    rows, decision_rows, tiles, verdicts = [], [], [], []
    for src, fit in zip(sources, fits):
        failed = [] if fit.inlier and fit.distance <= threshold else ["identity"]
        gate_reason = ("in reference" if not failed else
                       f"identity outlier: distance {fit.distance:.3f} to the reference, another person?" if not fit.inlier
                       else f"beyond the threshold: distance {fit.distance:.3f} > {threshold:.3f}")
        decided = source_verdict(policy, failed, humans.get(src["image_id"]))
        verdicts.append(decided)
        rows.append(dict(image_id=src["image_id"], original_name=fit.name, inlier=fit.inlier, distance=fit.distance,
                         image_path=src["image_path"], identity_distance=fit.distance, identity_threshold=threshold,
                         failed_gates=",".join(failed), gate_reason=gate_reason, accepted=decided.accepted,
                         review_status=decided.status, policy_status=decided.policy_status,
                         policy_reason=decided.policy_reason, review_source=decided.decided_by))
        now = utcnow()
        decision_rows += [run.stamp(image_id=src["image_id"], gate="identity_reference", passed=not failed,
                                    value=fit.distance, threshold=config.outlier_distance, reason=gate_reason,
                                    source="gate", decided_at=now),
                          run.stamp(image_id=src["image_id"], gate="policy", passed=PASSED[decided.policy_status],
                                    value=fit.distance, threshold=threshold, reason=decided.policy_reason,
                                    source="policy", decided_at=now)]
        label = fit.name if not failed else f"{fit.name} · {decided.status}: outlier"
        tiles.append(Tile(Image.open(source_images.path / src["image_path"]), label, decided.accepted,
                          flagged=bool(failed) and not decided.accepted))
    write_manifest(rows, staged)
    run.lineage.append("metrics", [run.stamp(name="identity_threshold", value=threshold, recorded_at=utcnow())])
    run.lineage.append("decisions", decision_rows)
    outliers = [r for r in rows if not r["inlier"]]
    far = [r for r in rows if r["inlier"] and r["distance"] > threshold]
    table = "\n".join(["| source | distance | in reference | training set |", "|---|---|---|---|"] +
                      [f"| {r['original_name']} | {r['distance']:.3f} | {'yes' if r['inlier'] else 'no (outlier)'} "
                       f"| {r['review_status']} |" for r in rows])
    yield publish(run, project, staged, params={**config.model_dump(), "policy": policy.policy},
                  metadata={"threshold": threshold, "rule": rule, "sources_used": reference.n_sources,
                            "outliers": len(outliers), "distances": dg.MetadataValue.md(table),
                            **review_metadata(run.project, run.asset, run.character, run.iteration, verdicts, policy)},
                  sheet=tiles)
    yield dg.AssetCheckResult(check_name="sources_agree_with_reference", passed=not outliers and not far,
                              severity=dg.AssetCheckSeverity.WARN,
                              metadata={"outliers": dg.MetadataValue.json([r["original_name"] for r in outliers]),
                                        "beyond_threshold": dg.MetadataValue.json([r["original_name"] for r in far])})


@dg.asset_check(asset=identity_reference, blocking=True, partitions_def=character_iteration,
                description="No source photo awaits human review (an identity outlier under policy required or "
                            "mixed). Blocking: nothing downstream runs until a person has decided.")
def sources_review_complete(context: dg.AssetCheckExecutionContext, project: ProjectResource,
                            identity_reference: PartitionFolder) -> dg.AssetCheckResult:
    character, iteration = partition_keys(context)
    return review_check(project.project, project.lineage, "identity_reference", character, iteration)
