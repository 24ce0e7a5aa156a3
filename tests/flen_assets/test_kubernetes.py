"""Kubernetes and Docker, on paper but checked: the generated launcher, executor and instance config pass
dagster-k8s's, dagster-docker's and Dagster's own config schemas, the GPU steps' tags build real Kubernetes
models, and the Helm values use the chart's keys. No cluster, no Docker daemon: nothing here connects."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import run_flen
from dagster._config import process_config, resolve_to_config_type, validate_config

from flen_assets.instance import DAGSTER_YAML, FlenRunCoordinator
from flen_assets.launchers import (
    CHART_PG_SECRET,
    ENV_SECRET,
    GPU_RESOURCE,
    POSTGRES_ENV,
    S3_ENDPOINT_ENV,
    S3_ENV,
    STEP_EXECUTOR_ENV,
    DeploySettingError,
    check_image,
    check_namespace,
    cluster_concurrency,
    docker_instance_config,
    docker_run_launcher_config,
    gpu_step_tags,
    helm_values,
    k8s_executor_config,
    k8s_instance_config,
    k8s_run_launcher_config,
    step_executor,
    to_yaml,
)

IMAGE = "registry.example.com/flenwheel:0.1.0"
GPU_ASSETS = {"enriched_images", "flux_lora", "lora_eval", "synthetic_batch", "qwen_adapter"}
# Values that must never reach a generated file: the tests set them as the deployment's credentials.
SECRETS = {"FLEN_PG_PASSWORD": "pg-sentinel-9f31", "AWS_SECRET_ACCESS_KEY": "aws-sentinel-77c2",
           "AWS_ACCESS_KEY_ID": "AKIA-SENTINEL-0001"}


def processed(schema, config: dict) -> dict:
    """`config` processed by Dagster against `schema` (defaults filled, env resolved); fails the test on errors."""
    result = process_config(resolve_to_config_type(schema), config)
    assert result.success, [error.message for error in result.errors]
    return result.value


def rejected(schema, config: dict) -> list[str]:
    """The error messages of Dagster's validation of `config` against `schema` (it must fail)."""
    result = validate_config(resolve_to_config_type(schema), config)
    assert not result.success, f"accepted: {config}"
    return [error.message for error in result.errors]


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The deployment's variables set as a run's container would have them (credentials: sentinels)."""
    env = {"FLEN_PG_HOST": "postgresql", "FLEN_PG_PORT": "5432", "FLEN_PG_USER": "flenwheel", "FLEN_PG_DB": "flenwheel",
           "FLEN_S3_BUCKET": "flenwheel", S3_ENDPOINT_ENV: "http://minio:9000", **SECRETS}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


# -- run launchers and executor ------------------------------------------------------------------------

def test_k8s_run_launcher_config_passes_dagster_k8s_schema():
    from dagster_k8s import K8sRunLauncher

    config = k8s_run_launcher_config(IMAGE, "flenwheel")
    value = processed(K8sRunLauncher.config_type(), config)
    assert value["job_image"] == IMAGE and value["job_namespace"] == "flenwheel"
    assert value["env_secrets"] == [ENV_SECRET]
    assert "FLEN_DEPLOYMENT=cluster" in value["env_vars"] and f"{STEP_EXECUTOR_ENV}=k8s" in value["env_vars"]
    # The schema is live: a secret name where a list belongs, or no instance ConfigMap, is refused.
    assert rejected(K8sRunLauncher.config_type(), {**config, "env_secrets": ENV_SECRET})
    assert rejected(K8sRunLauncher.config_type(), {k: v for k, v in config.items() if k != "instance_config_map"})


def test_docker_run_launcher_config_passes_dagster_docker_schema(cluster_env: dict[str, str]):
    import docker
    from dagster._core.utils import parse_env_var
    from dagster_docker import DockerRunLauncher

    config = docker_run_launcher_config(IMAGE, network="flenwheel")
    value = processed(DockerRunLauncher.config_type(), config)
    launcher = DockerRunLauncher.from_config_value(None, value)  # its own checks of container_kwargs
    assert launcher.image == IMAGE and launcher.networks == ["flenwheel"]
    # Every setting is passed through by name, resolved from the daemon's environment when a run starts.
    env = dict(parse_env_var(var) for var in launcher.env_vars)
    assert env == {**cluster_env, "FLEN_DEPLOYMENT": "cluster"}
    assert set(POSTGRES_ENV) | set(S3_ENV) <= set(launcher.env_vars)
    # docker-py turns the device request into what `docker run --gpus all` sends.
    host = docker.types.HostConfig(version="1.44", device_requests=launcher.container_kwargs["device_requests"])
    assert host["DeviceRequests"] == [{"Driver": "", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]],
                                       "Options": {}}]
    without = docker_run_launcher_config(IMAGE, s3_endpoint=False)
    assert S3_ENDPOINT_ENV not in without["env_vars"] and "network" not in without
    assert rejected(DockerRunLauncher.config_type(), {**config, "env_vars": "FLEN_PG_HOST"})


def test_k8s_executor_config_passes_the_executor_schema(monkeypatch: pytest.MonkeyPatch):
    from dagster_k8s import k8s_job_executor

    schema = k8s_job_executor.config_schema.config_type
    value = processed(schema, k8s_executor_config("flenwheel", max_concurrent=3))
    assert value["max_concurrent"] == 3 and value["job_namespace"] == "flenwheel"
    processed(schema, k8s_executor_config())  # the namespace comes from the run launcher
    assert rejected(schema, {**k8s_executor_config(), "max_concurrent": "four"})

    monkeypatch.delenv(STEP_EXECUTOR_ENV, raising=False)
    assert step_executor() is None
    monkeypatch.setenv(STEP_EXECUTOR_ENV, "k8s")
    executor = step_executor()
    assert executor.name == "k8s" and executor.config_schema.as_field().is_required is False
    monkeypatch.setenv(STEP_EXECUTOR_ENV, "kubernetes")
    with pytest.raises(ValueError, match=f"{STEP_EXECUTOR_ENV}='kubernetes' is not an executor"):
        step_executor()


def test_the_code_location_runs_steps_in_pods_when_told(tmp_path: Path):
    import os
    import subprocess
    import sys

    code = ("from flen_assets.definitions import defs; "
            "print(defs.resolve_job_def('flywheel_job').executor_def.name)")
    env = {**os.environ, STEP_EXECUTOR_ENV: "k8s", "FLEN_PROJECT_DIR": str(tmp_path), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "k8s"


# -- GPU steps --------------------------------------------------------------------------------------------

def test_gpu_step_tags_build_a_pod_that_asks_for_a_card():
    import kubernetes.client as k8s
    from dagster_k8s.job import (
        USER_DEFINED_K8S_CONFIG_KEY,
        DagsterK8sJobConfig,
        UserDefinedDagsterK8sConfig,
        construct_dagster_k8s_job,
        get_user_defined_k8s_config,
    )
    from dagster_k8s.models import k8s_model_from_dict

    tags = gpu_step_tags()
    assert list(tags) == [USER_DEFINED_K8S_CONFIG_KEY]
    parsed = UserDefinedDagsterK8sConfig.from_dict(json.loads(tags[USER_DEFINED_K8S_CONFIG_KEY]))
    resources = k8s_model_from_dict(k8s.V1ResourceRequirements, parsed.container_config["resources"])
    assert resources.limits == {GPU_RESOURCE: "1"} and resources.requests == {GPU_RESOURCE: "1"}
    tolerations = [k8s_model_from_dict(k8s.V1Toleration, t) for t in parsed.pod_spec_config["tolerations"]]
    assert [(t.key, t.operator, t.effect) for t in tolerations] == [(GPU_RESOURCE, "Exists", "NoSchedule")]

    # The step pod as K8sStepHandler builds it: the tags read as it reads them, the launcher's settings.
    launcher = k8s_run_launcher_config(IMAGE)
    job_config = DagsterK8sJobConfig(**{k: launcher[k] for k in (
        "job_image", "image_pull_policy", "service_account_name", "instance_config_map", "dagster_home",
        "env_secrets", "env_vars")})
    job = construct_dagster_k8s_job(job_config, ["dagster", "api", "execute_step"], "dagster-step-flux-lora",
                                    user_defined_k8s_config=get_user_defined_k8s_config(gpu_step_tags(2)))
    pod = job.spec.template.spec
    (container,) = pod.containers
    assert container.image == IMAGE
    assert container.resources.limits == {GPU_RESOURCE: "2"} and container.resources.requests == {GPU_RESOURCE: "2"}
    assert [t.key for t in pod.tolerations] == [GPU_RESOURCE]
    assert [source.secret_ref.name for source in container.env_from if source.secret_ref] == [ENV_SECRET]
    assert {e.name: e.value for e in container.env}["FLEN_DEPLOYMENT"] == "cluster"
    with pytest.raises(DeploySettingError):
        gpu_step_tags(0)


def test_the_gpu_assets_and_only_they_carry_the_gpu_tags():
    from flen_assets.definitions import defs

    tagged = {a.key.to_user_string() for a in defs.assets if a.op.tags.get("dagster-k8s/config") is not None}
    gpu_pool = {a.key.to_user_string() for a in defs.assets if a.op.pool == "gpu"}
    assert tagged == gpu_pool == GPU_ASSETS
    for asset in defs.assets:
        if asset.key.to_user_string() in GPU_ASSETS:
            assert dict(asset.op.tags) == gpu_step_tags()
    # cluster_concurrency sets the default pool limit for the `gpu` pool: it must be the only pool.
    assert {a.op.pool for a in defs.assets} == {None, "gpu"}


# -- the instance -----------------------------------------------------------------------------------------

def _check_instance(folder: Path, config: dict, launcher_class) -> dict:
    """Write `config` as folder/dagster.yaml, load it as Dagster loads an instance's, and check each
    configurable section against its class's own schema (nothing connects to PostgreSQL)."""
    from dagster._core.instance.config import dagster_instance_config
    from dagster_postgres import DagsterPostgresStorage

    folder.mkdir()
    (folder / "dagster.yaml").write_text(to_yaml(config, "test"))
    loaded, custom_class = dagster_instance_config(str(folder))
    assert custom_class is None
    storage = processed(DagsterPostgresStorage.config_type(), loaded["storage"]["postgres"])
    assert storage["postgres_db"]["port"] == 5432  # from the environment, as an int
    processed(launcher_class.config_type(), loaded["run_launcher"]["config"])
    processed(FlenRunCoordinator.config_type(), loaded["run_coordinator"]["config"])
    return loaded


def test_k8s_dagster_yaml_loads_as_an_instance_config(tmp_path: Path, cluster_env: dict[str, str]):
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config
    from dagster_k8s import K8sRunLauncher

    config = k8s_instance_config(IMAGE, "flenwheel", gpus=4)
    loaded = _check_instance(tmp_path / "k8s", config, K8sRunLauncher)
    assert loaded["run_launcher"]["class"] == "K8sRunLauncher"
    local = yaml.safe_load(DAGSTER_YAML)
    # The local instance's rules, once: the run queue, run monitoring, one run per character; 4 GPU slots.
    assert loaded["run_coordinator"] == local["run_coordinator"]
    assert loaded["run_monitoring"] == local["run_monitoring"]
    assert loaded["concurrency"]["runs"] == local["concurrency"]["runs"]
    assert loaded["concurrency"]["pools"] == {**local["concurrency"]["pools"], "default_limit": 4}
    text = (tmp_path / "k8s" / "dagster.yaml").read_text()
    assert not [value for value in SECRETS.values() if value in text]
    # The loader is live: a second storage, a pool granularity it does not know, or a misspelt section is refused.
    broken = tmp_path / "broken"
    broken.mkdir()
    for wrong in ({**config, "storage": {**config["storage"], "sqlite": {"base_dir": "x"}}},
                  {**config, "concurrency": {**config["concurrency"], "pools": {"granularity": "step"}}},
                  {**config, "run_launchers": config["run_launcher"]}):
        (broken / "dagster.yaml").write_text(to_yaml(wrong, "broken"))
        with pytest.raises(DagsterInvalidConfigError):
            dagster_instance_config(str(broken))


def test_docker_dagster_yaml_loads_as_an_instance_config(tmp_path: Path, cluster_env: dict[str, str]):
    from dagster_docker import DockerRunLauncher

    loaded = _check_instance(tmp_path / "docker", docker_instance_config(IMAGE, "flenwheel", gpus=2), DockerRunLauncher)
    assert loaded["concurrency"]["pools"]["default_limit"] == 2


# -- Helm values ------------------------------------------------------------------------------------------

# The keys FLENwheel sets, as Dagster's chart declares them (helm/dagster/schema/schema/charts/dagster/values.py
# and its subschema: webserver.py, daemon.py, run_launcher.py, postgresql.py, concurrency.py;
# dagster_user_deployments/subschema/user_deployments.py). A key outside these is silently ignored by Helm.
CHART_KEYS = {
    (): {"dagsterWebserver", "dagster-user-deployments", "postgresql", "generatePostgresqlPasswordSecret",
         "rabbitmq", "redis", "flower", "ingress", "imagePullSecrets", "computeLogManager", "scheduler",
         "runLauncher", "pythonLogs", "dagsterDaemon", "busybox", "migrate", "telemetry", "serviceAccount",
         "global", "retention", "concurrency", "additionalInstanceConfig"},
    ("dagsterWebserver",): {"image", "replicaCount", "env", "envConfigMaps", "envSecrets", "workspace", "service",
                            "nodeSelector", "tolerations", "resources", "labels", "annotations"},
    ("dagsterWebserver", "image"): {"repository", "tag", "pullPolicy"},
    ("dagsterDaemon",): {"enabled", "image", "runCoordinator", "heartbeatTolerance", "env", "envConfigMaps",
                         "envSecrets", "runMonitoring", "runRetries", "sensors", "schedules", "resources"},
    ("dagsterDaemon", "image"): {"repository", "tag", "pullPolicy"},
    ("dagsterDaemon", "runCoordinator"): {"enabled", "type", "config"},
    ("dagsterDaemon", "runCoordinator", "config"): {"queuedRunCoordinator", "customRunCoordinator"},
    ("dagsterDaemon", "runCoordinator", "config", "customRunCoordinator"): {"module", "class", "config"},
    # runMonitoring is a free dict in the schema; these are the keys templates/configmap-instance.yaml reads.
    ("dagsterDaemon", "runMonitoring"): {"enabled", "startTimeoutSeconds", "cancelTimeoutSeconds",
                                         "maxResumeRunAttempts", "pollIntervalSeconds", "freeSlotsAfterRunEndSeconds"},
    ("dagster-user-deployments",): {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    ("dagster-user-deployments", "deployments", 0): {
        "name", "image", "port", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns", "env",
        "envConfigMaps", "envSecrets", "annotations", "nodeSelector", "affinity", "tolerations", "resources",
        "labels", "volumeMounts", "volumes", "schedulerName"},
    ("dagster-user-deployments", "deployments", 0, "image"): {"repository", "tag", "pullPolicy"},
    ("dagster-user-deployments", "deployments", 0, "includeConfigInLaunchedRuns"): {"enabled"},
    ("postgresql",): {"postgresqlScheme", "image", "enabled", "postgresqlHost", "postgresqlUsername",
                      "postgresqlPassword", "postgresqlDatabase", "postgresqlParams", "service"},
    ("postgresql", "service"): {"port"},
    ("runLauncher",): {"type", "config"},
    ("runLauncher", "config"): {"celeryK8sRunLauncher", "k8sRunLauncher", "customRunLauncher"},
    ("runLauncher", "config", "k8sRunLauncher"): {
        "image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile", "envConfigMaps",
        "envSecrets", "envVars", "volumeMounts", "volumes", "labels", "failPodOnRunFailure", "resources",
        "schedulerName", "securityContext", "runK8sConfig"},
    ("concurrency",): {"enabled", "pools", "runs"},
    ("concurrency", "pools"): {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    ("concurrency", "runs"): {"maxConcurrentRuns", "tagConcurrencyLimits"},
    ("concurrency", "runs", "tagConcurrencyLimits", 0): {"key", "value", "limit"},
    ("telemetry",): {"enabled"},
}


def _at(values: dict, path: tuple):
    for step in path:
        values = values[step]
    return values


def test_helm_values_use_the_charts_keys_and_no_secret(cluster_env: dict[str, str]):
    values = helm_values(IMAGE, "flenwheel", gpus=2, pg_host="pg.db", pg_db="flen", pg_user="flen")
    text = to_yaml(values, "test")
    assert yaml.safe_load(text) == values  # round-trips
    for path, allowed in CHART_KEYS.items():
        assert set(_at(values, path)) <= allowed, f"{path}: {set(_at(values, path)) - allowed}"
    assert "&" not in text and "*" not in text  # no YAML anchors: one image, written out where it is used
    assert not [value for value in SECRETS.values() if value in text]
    assert "postgresqlPassword" not in text and values["generatePostgresqlPasswordSecret"] is False
    assert values["postgresql"] == {"enabled": False, "postgresqlHost": "pg.db", "postgresqlUsername": "flen",
                                    "postgresqlDatabase": "flen", "service": {"port": 5432}}

    image = {"repository": "registry.example.com/flenwheel", "tag": "0.1.0", "pullPolicy": "IfNotPresent"}
    code = values["dagster-user-deployments"]["deployments"][0]
    assert values["dagsterWebserver"]["image"] == values["dagsterDaemon"]["image"] == code["image"] == image
    assert code["dagsterApiGrpcArgs"] == ["-m", "flen_assets.definitions"] and code["port"] == 3030
    assert code["envSecrets"] == [{"name": ENV_SECRET}]

    # What the chart renders into the instance (templates/helpers/instance/*.tpl) is what dagster.yaml says.
    instance = k8s_instance_config(IMAGE, "flenwheel", gpus=2)
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher = instance["run_launcher"]["config"]
    assert [s["name"] for s in k8s["envSecrets"]] == launcher["env_secrets"]
    assert k8s["envVars"] == launcher["env_vars"] and k8s["jobNamespace"] == launcher["job_namespace"]
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert coordinator["type"] == "CustomRunCoordinator"
    assert coordinator["config"]["customRunCoordinator"] == instance["run_coordinator"]
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    assert monitoring == {"enabled": True, "pollIntervalSeconds": 10, "maxResumeRunAttempts": 0,
                          "freeSlotsAfterRunEndSeconds": 60}
    concurrency = values["concurrency"]
    rendered = {"pools": {"default_limit": concurrency["pools"]["defaultLimit"],
                          "granularity": concurrency["pools"]["granularity"]},
                "runs": {"max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"],
                         "tag_concurrency_limits": concurrency["runs"]["tagConcurrencyLimits"]}}
    assert concurrency["enabled"] is True and rendered == cluster_concurrency(2) == instance["concurrency"]


# -- settings and the CLI ---------------------------------------------------------------------------------

@pytest.mark.parametrize("namespace", ["Flen_Wheel", "flenwheel-", "-x", "a" * 64, ""])
def test_bad_namespaces_are_refused(namespace: str):
    with pytest.raises(DeploySettingError, match="is not a Kubernetes namespace name") as caught:
        check_namespace(namespace)
    assert caught.value.setting == "namespace"


@pytest.mark.parametrize("image", ["", "  ", "flenwheel", "Flenwheel:1", "flenwheel@sha256:abc", "registry:5000/flen"])
def test_bad_images_are_refused(image: str):
    with pytest.raises(DeploySettingError) as caught:
        check_image(image)
    assert caught.value.setting == "image"


def test_good_names_pass():
    assert check_namespace("flenwheel") == "flenwheel" and check_namespace("a" * 63) == "a" * 63
    for image in (IMAGE, "flenwheel:v1", "localhost:5000/team/flen-wheel:2025.1_a"):
        assert check_image(image) == image


def test_flen_deploy_k8s_writes_both_files(tmp_path: Path):
    out = tmp_path / "deploy"
    proc = run_flen("deploy", "k8s", "--image", IMAGE, "--namespace", "flen-prod", "--gpus", "2", "--out", str(out),
                    project=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["dagster.yaml", "values.yaml"]
    assert f"wrote {out / 'dagster.yaml'}" in proc.stdout and f"wrote {out / 'values.yaml'}" in proc.stdout
    assert ("helm upgrade --install dagster dagster/dagster" in proc.stdout
            and f"--namespace flen-prod --create-namespace -f {out / 'values.yaml'}" in proc.stdout)
    assert ENV_SECRET in proc.stdout and CHART_PG_SECRET in proc.stdout
    assert yaml.safe_load((out / "dagster.yaml").read_text()) == k8s_instance_config(IMAGE, "flen-prod", 2)
    assert yaml.safe_load((out / "values.yaml").read_text()) == helm_values(IMAGE, "flen-prod", gpus=2)


def test_flen_deploy_docker_writes_the_instance(tmp_path: Path):
    out = tmp_path / "deploy"
    proc = run_flen("deploy", "docker", "--image", IMAGE, "--network", "flen", "--out", str(out), project=tmp_path)
    assert [p.name for p in out.iterdir()] == ["dagster.yaml"]
    assert f"wrote {out / 'dagster.yaml'}" in proc.stdout
    assert yaml.safe_load((out / "dagster.yaml").read_text()) == docker_instance_config(IMAGE, "flen")


def test_flen_deploy_refuses_a_typod_namespace_in_one_line(tmp_path: Path):
    out = tmp_path / "deploy"
    proc = run_flen("deploy", "k8s", "--image", IMAGE, "--namespace", "Flen_Wheel", "--out", str(out),
                    project=tmp_path, check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: --namespace 'Flen_Wheel' is not a Kubernetes namespace name: use lowercase letters, digits and '-', "
        "starting and ending with a letter or digit, at most 63 characters (e.g. flen-wheel)"]
    assert not out.exists()
    proc = run_flen("deploy", "k8s", "--image", "", "--out", str(out), project=tmp_path, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: --image is empty: pass the image built from deploy/Dockerfile")
