"""Benchmark (CPU): two characters' v1 training sets at once, on one host against two hosts of the cluster deployment.

`local`: one project folder (SQLite instance, folder DVC remote, lineage files), `flen materialize
alice v1` and `bob v1` started together. `cluster`: two working folders that share nothing but a
PostgreSQL server and an S3 bucket (Debian's PostgreSQL and moto's S3 server, started here, as the
tests start them), each materializing one character; a third folder then counts the lineage rows.
Both with the tiny pack and two recipe entries (as tests/flen_assets/test_cluster.py). Prints the
wall times and the lineage row counts per table, and writes benchmarks/results/two_hosts-<machine>.json.

    python benchmarks/two_hosts.py                 # about 4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the servers the cluster tests start, and their `flen` host

import yaml  # noqa: E402
from cluster_servers import Host, postgres_server, s3_server  # noqa: E402

from flen_assets.demo_data import write_sample_inbox  # noqa: E402

CHARACTERS = ("alice", "bob")
TABLES = ("runs", "artifacts", "images", "edges", "members", "decisions", "metrics")
COUNT_SQL = " UNION ALL ".join(f"SELECT '{t}' AS tbl, count(*) AS n FROM {t}" for t in TABLES)


def run_both(hosts: dict[str, Host], config: Path) -> float:
    """Start `flen materialize CHARACTER v1` on each character's host at once; the wall time until both end."""
    started = time.monotonic()
    procs = {c: h.start("materialize", c, "v1", "--config", str(config)) for c, h in hosts.items()}
    for character, proc in procs.items():
        out = proc.communicate(timeout=1800)[0]
        if proc.returncode != 0:
            raise SystemExit(f"flen materialize {character} v1 failed:\n{out[-4000:]}")
    return time.monotonic() - started


def lineage_counts(host: Host) -> dict[str, int]:
    """Rows per lineage table, as DuckDB reads them in `host`'s folder."""
    out = host.flen("sql", f"SELECT tbl, n FROM ({COUNT_SQL})").stdout
    counts = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│| ").split("│")]
        if len(cells) == 2 and cells[0] in TABLES:
            counts[cells[0]] = int(cells[1])
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--machine", default="vm", help="name of this machine in the result file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flen-two-hosts-"))
    config = work / "run_config.yaml"
    config.write_text(yaml.safe_dump({"ops": {"enriched_images": {"config": {"max_entries": 2}}}}))
    try:
        one = Host(work / "one-host", {"FLEN_DEPLOYMENT": "local"})
        one.flen("init")
        for character in CHARACTERS:
            write_sample_inbox(one.root / "inbox" / character)
        local_s = run_both(dict.fromkeys(CHARACTERS, one), config)
        local_counts = lineage_counts(one)
        print(f"one host (local):       {local_s:6.1f} s  {local_counts}")

        with postgres_server() as pg, s3_server() as s3:
            env = {**pg.env(), **s3.env("two-hosts"), "FLEN_DEPLOYMENT": "cluster"}
            hosts = {c: Host(work / f"host-{c}", env) for c in CHARACTERS}
            for character, host in hosts.items():
                host.flen("init")
                write_sample_inbox(host.root / "inbox" / character)
            cluster_s = run_both(hosts, config)
            reader = Host(work / "reader", env)
            reader.flen("init")
            cluster_counts = lineage_counts(reader)
        print(f"two hosts (cluster):    {cluster_s:6.1f} s  {cluster_counts}")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "two_hosts",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"name": args.machine, "cpus": os.cpu_count(), "platform": platform.platform()},
        "setup": "alice v1 and bob v1 training sets at once, tiny pack, 2 recipe entries; cluster: PostgreSQL 15 "
                 "(Debian) and moto's S3 server on this machine, two working folders as two hosts",
        "one_host": {"wall_s": round(local_s, 1), "lineage_rows": local_counts},
        "two_hosts": {"wall_s": round(cluster_s, 1), "lineage_rows": cluster_counts},
        "summary": {"wall_ratio_two_hosts_vs_one": round(cluster_s / local_s, 2),
                    "same_lineage_row_counts": local_counts == cluster_counts},
        "note": "both 'hosts' share this machine's cores, so the wall time shows the cluster's overhead "
                "(PostgreSQL, S3 round trips), not a speed-up",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"two_hosts-{args.machine}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
