"""`flen deploy k8s | docker`: write the Dagster instance (and Helm values) that run FLENwheel on a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from flen_assets.commands.common import fail

app = typer.Typer(help="Run on a cluster: write the Dagster instance and Helm values for Kubernetes or Docker "
                       "(docs/deploy.md).", no_args_is_help=True)

ImageOpt = Annotated[str, typer.Option(
    "--image", help="FLENwheel's image, built from deploy/Dockerfile and pushed where the cluster pulls from: "
                    "REPOSITORY:TAG, a new tag for each build.")]
OutOpt = Annotated[Path, typer.Option("--out", help="Folder to write into (made if missing).")]
GpusOpt = Annotated[int, typer.Option(
    "--gpus", help="GPUs the cluster offers together: the `gpu` pool's limit (one GPU step per card).")]

_HEADER = ("Written by `flen {command}` (flen_assets/launchers.py); run it again to rewrite this file.\n"
           "No credentials here: each is read from the environment, {source}.\nSee docs/deploy.md.")


def _write(out: Path, name: str, config: dict[str, Any], header: str) -> Path:
    """Write `config` as YAML to out/name atomically; returns the path."""
    from flen_assets.launchers import to_yaml
    from flen_resources.atomic import write_text_atomic

    return write_text_atomic(out / name, to_yaml(config, header))


@app.command("k8s")
def deploy_k8s(image: ImageOpt,
               namespace: Annotated[str, typer.Option("--namespace", help="Kubernetes namespace of the release, "
                                                                          "its runs and steps.")] = "flenwheel",
               out: OutOpt = Path("deploy"), gpus: GpusOpt = 1,
               pg_host: Annotated[str, typer.Option("--pg-host", help="PostgreSQL host (as FLEN_PG_HOST in the "
                                                                      "Secret).")] = "postgresql",
               pg_port: Annotated[int, typer.Option("--pg-port", help="PostgreSQL port (as FLEN_PG_PORT).")] = 5432,
               pg_db: Annotated[str, typer.Option("--pg-db", help="PostgreSQL database (as FLEN_PG_DB).")] = "flenwheel",
               pg_user: Annotated[str, typer.Option("--pg-user", help="PostgreSQL user (as FLEN_PG_USER).")]
               = "flenwheel") -> None:
    """Write dagster.yaml and values.yaml (chart dagster/dagster) for Kubernetes: a pod per run and per step."""
    from dagster.version import __version__

    from flen_assets.launchers import (
        CHART_PG_SECRET,
        ENV_SECRET,
        RELEASE,
        DeploySettingError,
        helm_values,
        k8s_instance_config,
    )

    try:
        instance = k8s_instance_config(image, namespace, gpus)
        values = helm_values(image, namespace, gpus=gpus, pg_host=pg_host, pg_port=pg_port, pg_db=pg_db,
                             pg_user=pg_user)
    except DeploySettingError as exc:
        fail(f"--{exc.setting} {exc}")
    source = f"which the Kubernetes Secret {ENV_SECRET} fills"
    written = [_write(out, "dagster.yaml", instance, _HEADER.format(command="deploy k8s", source=source)),
               _write(out, "values.yaml", values, _HEADER.format(
                   command="deploy k8s", source=f"{source};\nthe chart's PostgreSQL password from the Secret {CHART_PG_SECRET}"))]
    for path in written:
        typer.echo(f"wrote {path}")
    typer.echo(f"\nfirst, once: the Secrets {ENV_SECRET} and {CHART_PG_SECRET} in namespace {namespace} "
               "(docs/deploy.md), then:")
    typer.echo("  helm repo add dagster https://dagster-io.github.io/helm && helm repo update")
    typer.echo(f"  helm upgrade --install {RELEASE} dagster/dagster --version {__version__} --namespace {namespace} "
               f"--create-namespace -f {written[1]}")


@app.command("docker")
def deploy_docker(image: ImageOpt, out: OutOpt = Path("deploy"), gpus: GpusOpt = 1,
                  network: Annotated[Optional[str], typer.Option(
                      "--network", help="Docker network the run containers join (where PostgreSQL and MinIO "
                                        "are reachable).")] = None,
                  s3_endpoint: Annotated[bool, typer.Option(
                      "--s3-endpoint/--no-s3-endpoint", help="Pass FLEN_S3_ENDPOINT_URL to the runs (MinIO); "
                                                             "--no-s3-endpoint for AWS S3.")] = True) -> None:
    """Write dagster.yaml for one Docker host: each run in its own container, with the host's GPUs."""
    from flen_assets.launchers import DeploySettingError, docker_instance_config

    try:
        instance = docker_instance_config(image, network, gpus, s3_endpoint=s3_endpoint)
    except DeploySettingError as exc:
        fail(f"--{exc.setting} {exc}")
    path = _write(out, "dagster.yaml", instance,
                  _HEADER.format(command="deploy docker", source="which the daemon passes on to each run container"))
    typer.echo(f"wrote {path}")
    typer.echo("\nnext: put it in DAGSTER_HOME on the Docker host, export the FLEN_PG_*, FLEN_S3_* and AWS_* "
               "variables there, start the code server container, then `dagster-daemon run` and "
               "`dagster-webserver` (docs/deploy.md, Docker)")
