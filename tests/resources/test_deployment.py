"""The deployment setting: `local` by default, `cluster` with its servers' settings from the environment or a secrets file."""

from __future__ import annotations

from pathlib import Path

import pytest

from flen_resources.deployment import DeploymentError, cluster_settings, deployment_name

CLUSTER = {"FLEN_DEPLOYMENT": "cluster", "FLEN_PG_HOST": "db.internal", "FLEN_PG_USER": "flen",
           "FLEN_PG_PASSWORD": "secret", "FLEN_PG_DB": "flen", "FLEN_S3_BUCKET": "studio"}


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (*CLUSTER, "FLEN_PG_PORT", "FLEN_S3_PREFIX", "FLEN_S3_ENDPOINT_URL", "FLEN_SECRETS_FILE"):
        monkeypatch.delenv(var, raising=False)


def test_local_is_the_default_and_has_no_cluster_settings() -> None:
    assert deployment_name() == "local" and cluster_settings() is None


def test_a_mistyped_deployment_names_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEN_DEPLOYMENT", "clustr")
    with pytest.raises(DeploymentError, match=r"FLEN_DEPLOYMENT='clustr' is not a deployment \(did you mean cluster\?\)"):
        deployment_name()


def test_cluster_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CLUSTER.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FLEN_S3_ENDPOINT_URL", "http://minio:9000")
    settings = cluster_settings()
    assert (settings.pg_host, settings.pg_port, settings.bucket, settings.prefix) == ("db.internal", 5432, "studio", "flenwheel")
    assert settings.dvc_remote_url == "s3://studio/flenwheel/dvc"
    assert settings.lineage_key("runs", "x.parquet") == "studio/flenwheel/lineage/runs/x.parquet"
    assert "secret" not in repr(settings)  # the password stays in the environment


def test_a_missing_setting_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in CLUSTER.items():
        if key not in ("FLEN_PG_PASSWORD", "FLEN_S3_BUCKET"):
            monkeypatch.setenv(key, value)
    with pytest.raises(DeploymentError, match="FLEN_DEPLOYMENT=cluster needs FLEN_PG_PASSWORD, FLEN_S3_BUCKET"):
        cluster_settings()
    monkeypatch.setenv("FLEN_PG_PASSWORD", "x")
    monkeypatch.setenv("FLEN_S3_BUCKET", "b")
    monkeypatch.setenv("FLEN_PG_PORT", "five")
    with pytest.raises(DeploymentError, match="FLEN_PG_PORT='five' is not a port number"):
        cluster_settings()


def test_a_secrets_file_fills_what_the_environment_lacks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = tmp_path / "flenwheel.env"
    secrets.write_text("# kept out of git\n" + "\n".join(f"{k}={v}" for k, v in CLUSTER.items()) + "\nFLEN_PG_PORT='6543'\n")
    monkeypatch.setenv("FLEN_SECRETS_FILE", str(secrets))
    monkeypatch.setenv("FLEN_PG_HOST", "from-env")  # the environment wins
    settings = cluster_settings()
    assert (settings.pg_host, settings.pg_port, settings.bucket) == ("from-env", 6543, "studio")
    monkeypatch.setenv("FLEN_SECRETS_FILE", str(tmp_path / "missing.env"))
    with pytest.raises(DeploymentError, match="FLEN_SECRETS_FILE=.*missing.env: no such file"):
        deployment_name()
