"""Deployments: which consistent set of storage a project runs on, picked by one setting.

`local` (the default): everything under the project folder (Dagster on SQLite, a folder DVC
remote, lineage Parquet files). `cluster`: what many hosts can share without a shared filesystem:
the Dagster instance on PostgreSQL, DVC blobs and lineage objects in one S3-compatible bucket.
Credentials are read from the environment only (or a secrets file the environment points at, as
Kubernetes mounts them), never written to the project.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from flen_resources.project import did_you_mean

DEPLOYMENT_ENV = "FLEN_DEPLOYMENT"
LOCAL, CLUSTER = "local", "cluster"
DEPLOYMENTS = (LOCAL, CLUSTER)

# The cluster's settings, each from its environment variable (docs/deploy.md lists them).
PG_ENV = {"host": "FLEN_PG_HOST", "port": "FLEN_PG_PORT", "user": "FLEN_PG_USER", "password": "FLEN_PG_PASSWORD",
          "db": "FLEN_PG_DB"}
S3_BUCKET_ENV = "FLEN_S3_BUCKET"
S3_PREFIX_ENV = "FLEN_S3_PREFIX"  # the project's folder in the bucket; one bucket can hold many projects
S3_ENDPOINT_ENV = "FLEN_S3_ENDPOINT_URL"  # MinIO, Ceph, moto...; unset: AWS
S3_REGION_ENV = "AWS_REGION"
# A file of KEY=VALUE lines read for any of the variables above that the environment lacks.
SECRETS_FILE_ENV = "FLEN_SECRETS_FILE"


class DeploymentError(ValueError):
    """A deployment setting is missing or wrong; the message names the variable and the fix."""


@dataclass(frozen=True)
class ClusterSettings:
    """Where the cluster's PostgreSQL and bucket are (the password and S3 keys stay in the environment)."""

    pg_host: str
    pg_port: int
    pg_user: str
    pg_db: str
    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str

    @property
    def pg_where(self) -> str:
        return f"PostgreSQL at {self.pg_host}:{self.pg_port} (database {self.pg_db}, user {self.pg_user})"

    @property
    def bucket_where(self) -> str:
        return f"bucket s3://{self.bucket}/{self.prefix}" + (f" at {self.endpoint_url}" if self.endpoint_url else "")

    @property
    def dvc_remote_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/dvc"

    def lineage_key(self, *parts: str) -> str:
        """The bucket key (bucket/prefix/lineage/...) of a lineage table folder or object."""
        return "/".join([self.bucket, self.prefix, "lineage", *parts])


def setting(name: str) -> str | None:
    """A deployment variable: the environment's value, else the secrets file's ($FLEN_SECRETS_FILE)."""
    if name in os.environ:
        return os.environ[name]
    return _secrets_file(os.environ.get(SECRETS_FILE_ENV, "")).get(name)


@lru_cache(maxsize=4)
def _secrets_file(path: str) -> dict[str, str]:
    if not path:
        return {}
    file = Path(path)
    if not file.is_file():
        raise DeploymentError(f"{SECRETS_FILE_ENV}={path}: no such file: point it at a file of KEY=VALUE lines, or unset it")
    values = {}
    for line in file.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip().strip('"').strip("'")
    return values


def deployment_name() -> str:
    """The deployment this process runs in: $FLEN_DEPLOYMENT, `local` when unset."""
    name = (setting(DEPLOYMENT_ENV) or LOCAL).strip()
    if name not in DEPLOYMENTS:
        raise DeploymentError(f"{DEPLOYMENT_ENV}={name!r} is not a deployment"
                              f"{did_you_mean(name, list(DEPLOYMENTS), 'deployments')}: set local or cluster")
    return name


def cluster_settings() -> ClusterSettings | None:
    """The cluster's settings when the deployment is `cluster` (None for `local`); a missing one is an error."""
    if deployment_name() != CLUSTER:
        return None
    missing = [var for var in (*[PG_ENV[k] for k in ("host", "user", "password", "db")], S3_BUCKET_ENV)
               if not setting(var)]
    if missing:
        raise DeploymentError(f"{DEPLOYMENT_ENV}=cluster needs {', '.join(missing)}: set them in the environment "
                              f"or in the file {SECRETS_FILE_ENV} names (docs/deploy.md lists them)")
    port = setting(PG_ENV["port"]) or "5432"
    if not port.isdigit():
        raise DeploymentError(f"{PG_ENV['port']}={port!r} is not a port number: set the port PostgreSQL listens on")
    return ClusterSettings(
        pg_host=setting(PG_ENV["host"]), pg_port=int(port), pg_user=setting(PG_ENV["user"]),
        pg_db=setting(PG_ENV["db"]), bucket=setting(S3_BUCKET_ENV),
        prefix=(setting(S3_PREFIX_ENV) or "flenwheel").strip("/"),
        endpoint_url=setting(S3_ENDPOINT_ENV) or None, region=setting(S3_REGION_ENV) or "us-east-1")


def check_postgres(settings: ClusterSettings) -> None:
    """Connect once, quickly: an unreachable server or a refused login is one line naming the server."""
    import psycopg2

    try:
        psycopg2.connect(host=settings.pg_host, port=settings.pg_port, user=settings.pg_user,
                         password=setting(PG_ENV["password"]), dbname=settings.pg_db, connect_timeout=5).close()
    except psycopg2.Error as exc:
        reason = "; ".join(" ".join(line.split()) for line in str(exc).splitlines() if line.strip())
        raise DeploymentError(f"cannot reach {settings.pg_where}: {reason}: check {', '.join(PG_ENV.values())} "
                              "and that the server runs") from exc
