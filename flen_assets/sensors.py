"""Sensors: new characters appear as folders under inbox/; a reviewed iteration launches the next."""


import dagster as dg

from flen_assets.dagster_resources import ProjectResource
from flen_assets.instance import release_dead_runs
from flen_assets.jobs import flywheel_job, training_set_job
from flen_assets.partitions import character_partitions, iteration_partitions, partition_key
from flen_assets.review.store import Partition, ReviewStore, review_command
from flen_resources.project import InvalidNameError, validate_slug


@dg.sensor(job=training_set_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Adds a character partition (and v1) when a folder with files appears under inbox/, "
                       "and launches its v1 run.")
def inbox_sensor(context: dg.SensorEvaluationContext, project: ProjectResource) -> dg.SensorResult | dg.SkipReason:
    inbox = project.project.inbox_dir
    if not inbox.is_dir():
        return dg.SkipReason(f"no inbox folder at {inbox}")
    known = set(context.instance.get_dynamic_partitions(character_partitions.name))
    new, skipped = [], []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            name = validate_slug(folder.name)
        except InvalidNameError as exc:
            skipped.append(str(exc))
            continue
        if name not in known and any(f.is_file() for f in folder.iterdir()):
            new.append(name)
    for message in skipped:
        context.log.warning(f"inbox folder skipped: {message}")
    if not new:
        return dg.SkipReason("no new character folders" + (f" ({len(skipped)} invalid names skipped)" if skipped else ""))
    requests = [character_partitions.build_add_request(new)]
    if "v1" not in context.instance.get_dynamic_partitions(iteration_partitions.name):
        requests.append(iteration_partitions.build_add_request(["v1"]))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(run_key=f"inbox:{n}:v1", partition_key=str(partition_key(n, "v1"))) for n in new],
        dynamic_partitions_requests=requests,
    )


@dg.sensor(job=flywheel_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description="Opt-in: when a character's synthetic batch vN is published and reviewed, add v(N+1) "
                       "and launch the whole flywheel for it.")
def next_iteration_sensor(context: dg.SensorEvaluationContext, project: ProjectResource) -> dg.SensorResult | dg.SkipReason:
    proj = project.project
    iterations = set(context.instance.get_dynamic_partitions(iteration_partitions.name))
    requests, new_iterations, waiting = [], set(), []
    for character in context.instance.get_dynamic_partitions(character_partitions.name):
        done = proj.latest_iteration(character)
        if done == 0 or (proj.data_dir / "training_set" / character / f"v{done + 1}.dvc").exists():
            continue
        # Under review policy `required` or `mixed`, v{done}'s synthetic images wait for a human on the
        # review page: training set v{done + 1} must not read an unreviewed batch.
        pending = ReviewStore.shared(proj, project.lineage).pending(Partition.of("synthetic_batch", character, f"v{done}"))
        if pending:
            waiting.append(f"{character}|v{done}: {pending} synthetic image(s) await review "
                           f"({review_command(proj, character, f'v{done}', 'synthetic_batch')})")
            continue
        nxt = f"v{done + 1}"
        if nxt not in iterations:
            new_iterations.add(nxt)
        requests.append(dg.RunRequest(run_key=f"iterate:{character}:{nxt}",
                                      partition_key=str(partition_key(character, nxt))))
    if not requests:
        return dg.SkipReason("; ".join(waiting) if waiting else
                             "no character has a finished iteration waiting for the next one")
    return dg.SensorResult(run_requests=requests, dynamic_partitions_requests=(
        [iteration_partitions.build_add_request(sorted(new_iterations))] if new_iterations else []))


@dg.sensor(minimum_interval_seconds=15, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Fails runs whose process died, stops the step processes a killed run worker left "
                       "running, and frees their pool slots (flen commands do the same when they start).")
def dead_runs_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    released = release_dead_runs(context.instance, context.log.info)
    return dg.SkipReason(f"released {len(released)} dead run(s)" if released else "no dead run holds anything")
