"""Where runs and steps execute on a cluster: the instance config, run launchers, step executor and Helm
values that run FLENwheel on Kubernetes (dagster-k8s) or on a Docker host (dagster-docker).

Config only, as plain dicts: nothing here talks to a cluster or imports dagster_k8s / dagster_docker at
module level (the `cluster` extra; the local deployment runs without it), except `step_executor` when
FLEN_EXECUTOR=k8s asks for the step pods. No credential is ever written: every pod and container reads the
PostgreSQL and S3 settings from its environment, filled from a Kubernetes Secret (or the Docker host's
environment), and the instance config names them with `env:` references. What the local instance already
decides (the run queue, one run per character, pools by op, run monitoring) is read from its one home,
flen_assets.instance.DAGSTER_YAML, and only the number of GPUs changes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from flen_assets.instance import DAGSTER_YAML, postgres_storage_config
from flen_resources.bucket import S3_KEY_ENV
from flen_resources.deployment import DEPLOYMENT_ENV, PG_ENV, S3_BUCKET_ENV, S3_ENDPOINT_ENV

if TYPE_CHECKING:
    from dagster import ExecutorDefinition

# The deployment's settings, by name (flen_resources.deployment reads them): PostgreSQL for the instance,
# the S3 bucket for blobs and lineage. FLEN_S3_ENDPOINT_URL is for MinIO or another S3-compatible store.
POSTGRES_ENV = tuple(PG_ENV.values())
S3_ENV = (S3_BUCKET_ENV, *S3_KEY_ENV[:2])  # FLEN_S3_PREFIX is optional: unset, "flenwheel"
# `k8s`: the code location runs each step in its own pod (step_executor); unset: Dagster's default executor.
STEP_EXECUTOR_ENV = "FLEN_EXECUTOR"

# The Kubernetes Secret holding every variable above (kubectl create secret generic ... --from-env-file).
ENV_SECRET = "flenwheel-env"
# The Helm release, and what the chart names after it: the instance ConfigMap it mounts in run and step
# pods, and the service account allowed to create their Jobs.
RELEASE = "dagster"
INSTANCE_CONFIG_MAP = f"{RELEASE}-instance"
SERVICE_ACCOUNT = RELEASE
# The Secret the chart reads the PostgreSQL password from (generatePostgresqlPasswordSecret: false).
CHART_PG_SECRET = "dagster-postgresql-secret"
DAGSTER_HOME_IN_PODS = "/opt/dagster/dagster_home"
CODE_PORT = 3030
CODE_LOCATION = "flenwheel"

# Dagster's op tag that dagster-k8s reads for a step's pod (dagster_k8s.job.USER_DEFINED_K8S_CONFIG_KEY;
# spelled here so that declaring the assets needs no dagster_k8s installed). The device plugin exposes
# cards as nvidia.com/gpu; GPU nodes are commonly tainted with the same key, so GPU pods tolerate it.
K8S_CONFIG_TAG = "dagster-k8s/config"
GPU_RESOURCE = "nvidia.com/gpu"

# A Kubernetes namespace is a DNS-1123 label.
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
# Docker's reference grammar (a registry host with an optional port, lowercase path components), with a tag:
# pods pull by it, so each build gets its own.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(rf"(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?{_COMPONENT}(?:/{_COMPONENT})*:\w[\w.-]{{0,127}}")


class DeploySettingError(ValueError):
    """A deployment setting that cannot work; `setting` names it (the CLI option), the message says why and the fix."""

    def __init__(self, setting: str, message: str):
        super().__init__(message)
        self.setting = setting


def check_namespace(namespace: str) -> str:
    """`namespace` when it is a valid Kubernetes namespace name (a DNS-1123 label), else DeploySettingError."""
    if _NAMESPACE.fullmatch(namespace or ""):
        return namespace
    fixed = re.sub(r"[^a-z0-9-]+", "-", (namespace or "").lower()).strip("-")[:63].strip("-") or "flenwheel"
    raise DeploySettingError("namespace", f"{namespace!r} is not a Kubernetes namespace name: use lowercase letters, "
                                          "digits and '-', starting and ending with a letter or digit, at most 63 "
                                          f"characters (e.g. {fixed})")


def check_image(image: str) -> str:
    """`image` when it is a Docker image reference with a tag (REPOSITORY:TAG), else DeploySettingError."""
    example = "(e.g. registry.example.com/flenwheel:0.1.0)"
    if not image or not image.strip():
        raise DeploySettingError("image", f"is empty: pass the image built from deploy/Dockerfile and pushed where "
                                          f"the cluster pulls from, REPOSITORY:TAG {example}")
    if "@" in image:
        raise DeploySettingError("image", f"{image!r} names a digest: pass REPOSITORY:TAG {example} (the Helm chart "
                                          "takes a repository and a tag)")
    if _IMAGE.fullmatch(image):
        return image
    if ":" not in image.rpartition("/")[2]:
        raise DeploySettingError("image", f"{image!r} has no tag: pass REPOSITORY:TAG {example}, a new tag for "
                                          "each build (pods pull by tag)")
    raise DeploySettingError("image", f"{image!r} is not a Docker image reference: pass REPOSITORY:TAG with a "
                                      f"lowercase repository {example}")


def split_image(image: str) -> tuple[str, str]:
    """(repository, tag) of a checked image reference."""
    repository, _, tag = check_image(image).rpartition(":")
    return repository, tag


def check_gpus(gpus: int) -> int:
    """`gpus` when at least 1 (the `gpu` pool's limit: one GPU step per card), else DeploySettingError."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise DeploySettingError("gpus", f"{gpus!r} is not a number of GPUs: pass 1 or more (the cards the "
                                         "cluster's GPU nodes offer together)")
    return gpus


def deployment_env_vars() -> list[str]:
    """The variables every run and step container gets set (besides the Secret's): the cluster deployment and,
    on Kubernetes, one pod per step."""
    return [f"{DEPLOYMENT_ENV}=cluster", f"{STEP_EXECUTOR_ENV}=k8s"]


def gpu_step_tags(gpus: int = 1) -> dict[str, str]:
    """The op tags that make a GPU step's pod ask for `gpus` cards and tolerate the GPU nodes' taint."""
    count = str(check_gpus(gpus))
    config = {
        # Extended resources are never overcommitted: the request must equal the limit.
        "container_config": {"resources": {"limits": {GPU_RESOURCE: count}, "requests": {GPU_RESOURCE: count}}},
        "pod_spec_config": {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]},
    }
    return {K8S_CONFIG_TAG: json.dumps(config, sort_keys=True)}


def k8s_run_launcher_config(image: str, namespace: str = "flenwheel", *, env_secret: str = ENV_SECRET,
                            instance_config_map: str = INSTANCE_CONFIG_MAP,
                            service_account: str = SERVICE_ACCOUNT) -> dict[str, Any]:
    """Config of dagster_k8s.K8sRunLauncher: one Job per run in `namespace`, its settings from `env_secret`."""
    return {
        "job_image": check_image(image),
        "image_pull_policy": "IfNotPresent",  # each build has its own tag (check_image)
        "job_namespace": check_namespace(namespace),
        "service_account_name": service_account,
        "load_incluster_config": True,
        "instance_config_map": instance_config_map,
        "dagster_home": DAGSTER_HOME_IN_PODS,
        "env_secrets": [env_secret],
        "env_vars": deployment_env_vars(),
    }


def k8s_executor_config(namespace: str | None = None, *, max_concurrent: int = 4) -> dict[str, Any]:
    """Config of dagster_k8s.k8s_job_executor: one pod per step, at most `max_concurrent` at once per run. The
    image, Secret and variables come from the run launcher; the namespace too unless given."""
    config: dict[str, Any] = {
        "max_concurrent": max_concurrent,
        # Step Jobs are owned by their run's pod: deleting a run's pod deletes its steps' pods too.
        "enable_owner_references": True,
    }
    if namespace is not None:
        config["job_namespace"] = check_namespace(namespace)
    return config


def step_executor() -> ExecutorDefinition | None:
    """dagster_k8s's k8s_job_executor (one pod per step) when FLEN_EXECUTOR=k8s, else None (Dagster's default)."""
    choice = os.environ.get(STEP_EXECUTOR_ENV, "")
    if not choice:
        return None
    if choice != "k8s":
        raise ValueError(f"{STEP_EXECUTOR_ENV}={choice!r} is not an executor: set it to k8s (one pod per step, "
                         "on Kubernetes) or leave it unset (steps run in the run's process)")
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor.configured(k8s_executor_config())


def docker_run_launcher_config(image: str, network: str | None = None, *, s3_endpoint: bool = True) -> dict[str, Any]:
    """Config of dagster_docker.DockerRunLauncher: one container per run on the daemon's Docker host, with its
    GPUs and the settings passed through from the daemon's environment (`s3_endpoint`: FLEN_S3_ENDPOINT_URL too)."""
    names = [*POSTGRES_ENV, *S3_ENV, *([S3_ENDPOINT_ENV] if s3_endpoint else [])]
    config: dict[str, Any] = {
        "image": check_image(image),
        # A bare name is passed through from the daemon's environment (it must be set there).
        "env_vars": [*names, f"{DEPLOYMENT_ENV}=cluster"],
        # `docker run --gpus all`: each GPU step leases one of the box's cards itself.
        "container_kwargs": {"device_requests": [{"count": -1, "capabilities": [["gpu"]]}]},
    }
    if network:
        config["network"] = network
    return config


def local_instance_settings() -> dict[str, Any]:
    """The local instance's dagster.yaml as a dict: the run queue, run limits, pools and run monitoring it sets."""
    return yaml.safe_load(DAGSTER_YAML)


def cluster_concurrency(gpus: int) -> dict[str, Any]:
    """The local instance's `concurrency` section, with the pools' default limit (the `gpu` pool, the only
    one) set to the number of GPUs."""
    concurrency = local_instance_settings()["concurrency"]
    concurrency["pools"]["default_limit"] = check_gpus(gpus)
    return concurrency


def cluster_instance_config(run_launcher: Mapping[str, Any], gpus: int = 1) -> dict[str, Any]:
    """A dagster.yaml for the cluster: PostgreSQL storage, `run_launcher` ({module, class, config}), and the
    local instance's run queue, run monitoring and concurrency (pool limit: `gpus`)."""
    local = local_instance_settings()
    return {
        "telemetry": local["telemetry"],
        "storage": postgres_storage_config(),
        "run_launcher": dict(run_launcher),
        "run_coordinator": local["run_coordinator"],
        "run_monitoring": local["run_monitoring"],
        "concurrency": cluster_concurrency(gpus),
    }


def k8s_instance_config(image: str, namespace: str = "flenwheel", gpus: int = 1) -> dict[str, Any]:
    """The dagster.yaml of a Kubernetes deployment (K8sRunLauncher)."""
    launcher = {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": k8s_run_launcher_config(image, namespace)}
    return cluster_instance_config(launcher, gpus)


def docker_instance_config(image: str, network: str | None = None, gpus: int = 1, *,
                           s3_endpoint: bool = True) -> dict[str, Any]:
    """The dagster.yaml of a Docker deployment (DockerRunLauncher)."""
    launcher = {"module": "dagster_docker", "class": "DockerRunLauncher",
                "config": docker_run_launcher_config(image, network, s3_endpoint=s3_endpoint)}
    return cluster_instance_config(launcher, gpus)


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.capitalize() for part in rest)


def helm_values(image: str, namespace: str = "flenwheel", *, gpus: int = 1, pg_host: str = "postgresql",
                pg_port: int = 5432, pg_db: str = "flenwheel", pg_user: str = "flenwheel",
                env_secret: str = ENV_SECRET) -> dict[str, Any]:
    """Values of Dagster's Helm chart (dagster/dagster): FLENwheel's image for the webserver, the daemon and the
    code location (they import FlenRunCoordinator), an external PostgreSQL (its password from the chart's
    Secret), the K8sRunLauncher and the local instance's run queue, run monitoring and concurrency."""
    repository, tag = split_image(image)
    launcher = k8s_run_launcher_config(image, namespace, env_secret=env_secret)
    local = local_instance_settings()
    image_values = {"repository": repository, "tag": tag, "pullPolicy": launcher["image_pull_policy"]}
    concurrency = cluster_concurrency(gpus)
    return {
        "dagsterWebserver": {"image": image_values},
        "dagsterDaemon": {
            "image": image_values,
            "runCoordinator": {"enabled": True, "type": "CustomRunCoordinator",
                               "config": {"customRunCoordinator": local["run_coordinator"]}},
            "runMonitoring": {_camel(k): v for k, v in local["run_monitoring"].items()},
        },
        "dagster-user-deployments": {
            "enabled": True,
            "enableSubchart": True,
            "deployments": [{
                "name": CODE_LOCATION,
                "image": image_values,
                "dagsterApiGrpcArgs": ["-m", "flen_assets.definitions"],
                "port": CODE_PORT,
                "env": dict(var.split("=", 1) for var in launcher["env_vars"]),
                "envSecrets": [{"name": secret} for secret in launcher["env_secrets"]],
                # Runs get the code location's variables and Secret as well.
                "includeConfigInLaunchedRuns": {"enabled": True},
            }],
        },
        "postgresql": {"enabled": False, "postgresqlHost": pg_host, "postgresqlUsername": pg_user,
                       "postgresqlDatabase": pg_db, "service": {"port": pg_port}},
        # The password is read from the Secret dagster-postgresql-secret (key postgresql-password), created beforehand.
        "generatePostgresqlPasswordSecret": False,
        "runLauncher": {"type": "K8sRunLauncher", "config": {"k8sRunLauncher": {
            # No image: runs use the code location's (the chart sets DAGSTER_CURRENT_IMAGE on it).
            "imagePullPolicy": launcher["image_pull_policy"],
            "jobNamespace": launcher["job_namespace"],
            "loadInclusterConfig": launcher["load_incluster_config"],
            "envSecrets": [{"name": secret} for secret in launcher["env_secrets"]],
            "envVars": launcher["env_vars"],
        }}},
        "concurrency": {
            "enabled": True,
            "pools": {_camel(k): v for k, v in concurrency["pools"].items()},
            "runs": {"maxConcurrentRuns": concurrency["runs"]["max_concurrent_runs"],
                     "tagConcurrencyLimits": concurrency["runs"]["tag_concurrency_limits"]},
        },
        "telemetry": local["telemetry"],
    }


class _PlainDumper(yaml.SafeDumper):
    """YAML without anchors: a value used twice (the image) is written out twice, as a person would."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(config: Mapping[str, Any], header: str) -> str:
    """`config` as YAML in its own key order, after `header` (comment lines)."""
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comments + yaml.dump(dict(config), Dumper=_PlainDumper, sort_keys=False, default_flow_style=False)
