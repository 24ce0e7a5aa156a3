"""Real servers for the `cluster` tests, started and stopped by the tests: PostgreSQL from Debian's
package (initdb + pg_ctl in a temp folder, 127.0.0.1, a free port, password auth) and moto's S3
server (the real S3 HTTP API)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests_helpers import free_port

FLEN = [sys.executable, "-m", "flen_assets"]
PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    password: str
    db: str

    def env(self) -> dict[str, str]:
        return {"FLEN_PG_HOST": self.host, "FLEN_PG_PORT": str(self.port), "FLEN_PG_USER": self.user,
                "FLEN_PG_PASSWORD": self.password, "FLEN_PG_DB": self.db}


@dataclass(frozen=True)
class S3:
    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str

    def env(self, prefix: str = "flenwheel") -> dict[str, str]:
        return {"FLEN_S3_ENDPOINT_URL": self.endpoint_url, "FLEN_S3_BUCKET": self.bucket, "FLEN_S3_PREFIX": prefix,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1"}

    def client(self):  # noqa: ANN201 - boto3's generated client type
        """A boto3 S3 client with the server's real key."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key)


def _pg_tool(name: str) -> str:
    for folder in PG_BIN_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"PostgreSQL's {name} is missing: install Debian's postgresql package (scripts/setup-servers.sh)")
    return found


def _wait_for_port(port: int, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


@contextmanager
def postgres_server() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with user `flen` (password auth) and database `flen`."""
    if os.environ.get("FLEN_SKIP_SERVERS") == "1":
        pytest.skip("FLEN_SKIP_SERVERS=1: the cluster tests need PostgreSQL (scripts/setup-servers.sh installs it)")
    # PostgreSQL refuses to run as root: as root, its files and processes belong to the `postgres` user.
    as_root = os.geteuid() == 0
    run_as = ["runuser", "-u", "postgres", "--"] if as_root else []
    folder = Path(tempfile.mkdtemp(prefix="flen-pg-"))  # not under pytest's tmp, which is private to its user
    data, password, port = folder / "data", "flen-test-password", free_port()
    (folder / "pw").write_text(password)
    if as_root:
        entry = pwd.getpwnam("postgres")
        for path in (folder, folder / "pw"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    try:
        subprocess.run([*run_as, _pg_tool("initdb"), "-D", str(data), "-U", "flen", "--auth=scram-sha-256",
                        f"--pwfile={folder / 'pw'}", "-E", "UTF8", "--no-sync"], check=True, capture_output=True)
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c max_connections=200"
        subprocess.run([*run_as, _pg_tool("pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"),
                        "-w", "start"], check=True, capture_output=True)
        import psycopg2

        con = psycopg2.connect(host="127.0.0.1", port=port, user="flen", password=password, dbname="postgres")
        con.autocommit = True
        con.cursor().execute("CREATE DATABASE flen")
        con.close()
        yield Postgres("127.0.0.1", port, "flen", password, "flen")
    finally:
        subprocess.run([*run_as, _pg_tool("pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def s3_server(bucket: str = "flen-cluster") -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 (a real HTTP endpoint) that checks credentials, with one empty bucket
    and one IAM user allowed everything: a wrong key is refused as S3 refuses it."""
    import json

    import boto3

    port = free_port()
    # The first 4 requests (the IAM user, its policy and key) go unchecked; every later one needs the key.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(port, 60, proc)
        url = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=url, region_name="us-east-1", aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="flen")
        allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        policy = iam.create_policy(PolicyName="flen-all", PolicyDocument=json.dumps(allow_all))["Policy"]["Arn"]
        iam.attach_user_policy(UserName="flen", PolicyArn=policy)
        key = iam.create_access_key(UserName="flen")["AccessKey"]
        s3 = S3(url, bucket, key["AccessKeyId"], key["SecretAccessKey"])
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


class Host:
    """A working folder that runs `flen` in the cluster deployment."""

    def __init__(self, root: Path, servers: dict[str, str]):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "FLEN_DEPLOYMENT": "cluster", **servers, "FLEN_PROJECT_DIR": str(root),
                    "DAGSTER_HOME": str(root / ".flen" / "dagster"), "PYTHONWARNINGS": "ignore"}

    def flen(self, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
        proc = subprocess.run([*FLEN, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"[{self.root.name}] flen {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([*FLEN, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def sql(self, query: str) -> str:
        return self.flen("sql", query).stdout
