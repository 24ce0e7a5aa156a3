"""The `cluster` deployment: two hosts that share nothing but PostgreSQL and an S3 bucket.

Each "host" is a working folder of its own (its own git + DVC repo, lineage mirror and Dagster
home); the servers are real (Debian's PostgreSQL, moto's S3 HTTP server), started by the tests.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from cluster_servers import FLEN, S3, Host, Postgres, postgres_server, s3_server

from flen_assets.demo_data import write_sample_inbox
from flen_resources.project import Project
from flen_resources.storage import DvcStore

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[Postgres, S3]]:
    with postgres_server() as pg, s3_server() as s3:
        yield pg, s3


def _env(servers: tuple[Postgres, S3], prefix: str) -> dict[str, str]:
    pg, s3 = servers
    return {**pg.env(), **s3.env(prefix)}


def _small_run_config(folder: Path) -> Path:
    config = folder / "run_config.yaml"  # two recipe entries instead of all: the same code path, faster
    config.write_text(yaml.safe_dump({"ops": {"enriched_images": {"config": {"max_entries": 2}}}}))
    return config


def _finish(procs: dict[str, subprocess.Popen], timeout_s: int = 900) -> dict[str, str]:
    outputs = {}
    for name, proc in procs.items():
        try:
            outputs[name] = proc.communicate(timeout=timeout_s)[0]
        except subprocess.TimeoutExpired:
            for p in procs.values():
                p.kill()
            raise
        assert proc.returncode == 0, f"{name} failed:\n{outputs[name][-6000:]}"
    return outputs


def test_two_hosts_materialize_at_once_and_a_third_traces_and_restores(servers, tmp_path: Path) -> None:
    env = _env(servers, "two-hosts")
    host_a, host_b, host_c = (Host(tmp_path / name, env) for name in ("host-a", "host-b", "host-c"))
    config = _small_run_config(tmp_path)
    for host, character in ((host_a, "alice"), (host_b, "bob")):
        host.flen("init")
        write_sample_inbox(host.root / "inbox" / character)

    started = time.monotonic()
    _finish({"alice": host_a.start("materialize", "alice", "v1", "--config", str(config)),
             "bob": host_b.start("materialize", "bob", "v1", "--config", str(config))})
    both_s = time.monotonic() - started

    # Nothing but the servers is shared: host C has never seen either character's files.
    host_c.flen("init")
    assert not (host_c.root / "data" / "training_set").exists()
    counts = host_c.sql("SELECT character, count(*) AS n FROM artifacts GROUP BY character ORDER BY character")
    assert "alice" in counts and "bob" in counts
    for character in ("alice", "bob"):
        tree = host_c.flen("lineage", character, "v1").stdout
        assert "source" in tree.lower() and character in tree

    # A second version of alice's training set, from host A; host C restores the first from the bucket.
    first = _versions(host_c, "alice")
    assert len(first) == 1
    (config_one := tmp_path / "one_entry.yaml").write_text(
        yaml.safe_dump({"ops": {"enriched_images": {"config": {"max_entries": 1}}}}))
    host_a.flen("materialize", "alice", "v1", "--config", str(config_one))
    versions = _versions(host_c, "alice")
    assert len(versions) == 2 and versions[-1] == first[0]
    host_c.flen("checkout", "training_set", "alice", "v1", first[0])
    restored = pq.read_table(host_c.root / "data" / "training_set" / "alice" / "v1" / "manifest.parquet")
    original_a = _versions(host_a, "alice")
    assert original_a == versions and restored.num_rows > 0
    # Host B, which never ran alice, reads her training set as lineage last recorded it: from the bucket.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in host_b.env.items():
            mp.setenv(key, value)
        path, md5 = DvcStore(Project(host_b.root)).published("training_set", "alice", "v1")
    assert md5 == versions[0] and (path / "manifest.parquet").is_file()
    assert pq.read_table(path / "manifest.parquet").num_rows != restored.num_rows or versions[0] != versions[1]
    # An object deleted from the bucket behind the project's back: restoring names the partition and the object.
    s3 = servers[1].client()
    bob_md5 = _versions(host_c, "bob")[0]
    key = f"two-hosts/dvc/files/md5/{bob_md5[:2]}/{bob_md5[2:]}"
    s3.delete_object(Bucket=env["FLEN_S3_BUCKET"], Key=key)
    proc = host_c.flen("checkout", "training_set", "bob", "v1", bob_md5, check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "training_set bob|v1" in proc.stderr and bob_md5[2:] in proc.stderr, proc.stderr
    assert not (host_c.root / "data" / "training_set" / "bob" / "v1.dvc").exists()
    print(f"two hosts, alice v1 + bob v1 at once: {both_s:.0f} s")


def _versions(host: Host, character: str) -> list[str]:
    out = host.flen("versions", "training_set", character, "v1").stdout
    return [line.split()[2] for line in out.splitlines() if line.strip()]


def test_a_host_killed_midway_leaves_no_partial_partition_and_the_rerun_completes(servers, tmp_path: Path) -> None:
    env = _env(servers, "killed")
    host, reader = Host(tmp_path / "host-a", env), Host(tmp_path / "host-c", env)
    config = _small_run_config(tmp_path)
    host.flen("init")
    reader.flen("init")
    write_sample_inbox(host.root / "inbox" / "carol")
    proc = subprocess.Popen([*FLEN, "materialize", "carol", "v1", "--config", str(config)], env=host.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = ""
    for line in proc.stdout:  # kill it while enriched_images runs: after source_images was published
        seen += line
        if "enrich carol/v1" in line:
            break
    os.killpg(proc.pid, 9)
    proc.wait()
    assert "enrich carol/v1" in seen, seen[-3000:]

    published = reader.sql("SELECT asset FROM latest_artifacts WHERE character = 'carol' ORDER BY asset")
    assert "source_images" in published and "training_set" not in published and "filtered_images" not in published
    # Every version lineage names can be read back on another host: nothing half-pushed became visible.
    with pytest.MonkeyPatch.context() as mp:
        for key, value in reader.env.items():
            mp.setenv(key, value)
        path, _ = DvcStore(Project(reader.root)).published("source_images", "carol", "v1")
    assert (path / "manifest.parquet").is_file()

    out = host.flen("materialize", "carol", "v1", "--config", str(config)).stdout
    assert "succeeded" in out
    runs = reader.sql("SELECT asset, count(*) AS n FROM runs WHERE character = 'carol' GROUP BY asset ORDER BY asset")
    assert "training_set" in runs


def test_unreachable_servers_get_one_line_naming_them_and_nothing_is_written(servers, tmp_path: Path) -> None:
    pg, s3 = servers
    wrong_password = Host(tmp_path / "pw", {**_env(servers, "bad"), "FLEN_PG_PASSWORD": "wrong"})
    proc = wrong_password.flen("init", check=False)
    assert proc.returncode == 1
    assert f"cannot reach PostgreSQL at 127.0.0.1:{pg.port} (database flen, user flen)" in proc.stderr
    assert "password authentication failed" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (wrong_password.root / "data").exists() and not (wrong_password.root / ".dvc").exists()

    no_bucket = Host(tmp_path / "s3", {**_env(servers, "bad"), "FLEN_S3_ENDPOINT_URL": "http://127.0.0.1:9"})
    proc = no_bucket.flen("init", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot reach the bucket s3://flen-cluster/bad at http://127.0.0.1:9" in proc.stderr
    assert not (no_bucket.root / ".flen").exists()

    wrong_key = Host(tmp_path / "key", {**_env(servers, "bad"), "AWS_SECRET_ACCESS_KEY": "not-the-key"})
    proc = wrong_key.flen("init", check=False)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "the bucket s3://flen-cluster/bad at http" in proc.stderr and "refused the credentials" in proc.stderr
    assert not (wrong_key.root / ".flen").exists()

    typo = Host(tmp_path / "typo", {**_env(servers, "bad"), "FLEN_DEPLOYMENT": "clutser"})
    proc = typo.flen("init", check=False)
    assert proc.returncode == 1 and "FLEN_DEPLOYMENT='clutser' is not a deployment (did you mean cluster?)" in proc.stderr
