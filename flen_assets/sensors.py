"""Sensors: new characters appear as folders under inbox/."""


import dagster as dg

from flen_assets.jobs import training_set_job
from flen_assets.partitions import character_partitions, iteration_partitions, partition_key
from flen_assets.project import InvalidNameError, validate_slug
from flen_resources.dagster_resources import ProjectResource


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
