"""Benchmark: image ingest + identity throughput, and lineage trace time over a million image rows.

    .venv/bin/python benchmarks/ingest_lineage.py                # everything, defaults
    .venv/bin/python benchmarks/ingest_lineage.py --images 1000 --rows 100000 --no-dagster

Prints the figures and writes them, with the machine and the command line, to
benchmarks/results/ingest_lineage-<hostname>.json (one file per machine, overwritten each run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

RESULTS = Path(__file__).resolve().parent / "results"
# The astronaut crops of the sample inbox (one face each): the files an ingest normally sees.
ASTRONAUT_CROPS = ["portrait.jpg", "closeup.png", "side_light.jpg", "rotated_exif.jpg", "print_cmyk.jpg",
                   "scan_16bit.png", "poster_palette.png"]
TRACE_CHARACTER, TRACE_ITERATION = "bench", "v1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=40, help="sample images to ingest (astronaut crops, cycled)")
    ap.add_argument("--max-side", type=int, default=1024, help="normalisation size, as SourceConfig.max_side")
    ap.add_argument("--face-model", choices=["hog", "cnn"], default="hog", help="face_recognition detector")
    ap.add_argument("--no-dagster", action="store_true", help="skip timing a real source_images materialization")
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic image rows in the lineage store")
    ap.add_argument("--depth", type=int, default=3, help="edges per chain (chain = depth + 1 images)")
    ap.add_argument("--rerun-edges", type=float, default=1 / 3,
                    help="extra identical edge rows, as a fraction of the distinct edges (reruns append them again)")
    ap.add_argument("--members", type=int, default=1_000, help="members of the traced training_set partition")
    ap.add_argument("--member-runs", type=int, default=2, help="runs of that partition (the latest one is traced)")
    ap.add_argument("--files", type=int, default=4, help="Parquet files per lineage table")
    ap.add_argument("--repeat", type=int, default=3, help="trace timings per mode; the median is reported")
    ap.add_argument("--skip-ingest", action="store_true", help="only the lineage part")
    ap.add_argument("--skip-lineage", action="store_true", help="only the ingest part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it (default: a temp folder, removed)")
    ap.add_argument("--out", type=Path, default=None, help="JSON result path (default: results/ingest_lineage-<host>.json)")
    return ap.parse_args(argv)


@contextmanager
def workdir(keep: Path | None):
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    tmp = Path(tempfile.mkdtemp(prefix="flen-bench-"))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def machine_info() -> dict:
    import dagster
    import duckdb

    info = {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "python": sys.version.split()[0], "implementation": platform.python_implementation(),
            "platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "duckdb": duckdb.__version__, "pyarrow": pa.__version__, "numpy": np.__version__,
            "dagster": dagster.__version__}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None)
        with open("/proc/meminfo") as fh:
            info["mem_total_gb"] = round(int(fh.readline().split()[1]) / 1e6, 1)
    except OSError:
        pass
    return info


# -- (a) ingest + identity --------------------------------------------------------------------------
def write_samples(folder: Path, n: int) -> list[Path]:
    from flen_assets.demo_data import sample_files

    files = sample_files()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        name = ASTRONAUT_CROPS[i % len(ASTRONAUT_CROPS)]
        path = folder / f"{i:05d}-{name}"
        path.write_bytes(files[name])
        paths.append(path)
    return paths


def bench_ingest(work: Path, args: argparse.Namespace) -> dict:
    """The per-file work of source_images: hash, decode, normalize, save, pHash; then faces + embedding."""
    from flen_resources.faces import FaceAnalyzer
    from flen_resources.imaging import (
        color_hash,
        decode_image,
        perceptual_hash,
        resize_max_side,
        save_png,
        sha256_file,
        sharpness,
    )

    paths = write_samples(work / "inbox", args.images)
    out = work / "normalized"
    out.mkdir()
    analyzer = FaceAnalyzer(args.face_model, max_side=args.max_side)
    analyzer.analyze(resize_max_side(decode_image(paths[0]).image, args.max_side))  # load dlib's models first
    t_decode = t_faces = 0.0
    faces_found = 0
    wall = time.perf_counter()
    for path in paths:
        t0 = time.perf_counter()
        sha256_file(path)
        decoded = decode_image(path)
        img = resize_max_side(decoded.image, args.max_side)
        save_png(img, out)
        perceptual_hash(img), color_hash(img)
        t1 = time.perf_counter()
        found = analyzer.analyze(img)
        sharpness(img, found[0].box if found else None)
        t2 = time.perf_counter()
        t_decode += t1 - t0
        t_faces += t2 - t1
        faces_found += len(found)
    wall = time.perf_counter() - wall
    n = len(paths)
    return {"images": n, "faces_found": faces_found, "face_model": args.face_model, "max_side": args.max_side,
            "decode_s": round(t_decode, 3), "faces_s": round(t_faces, 3), "total_s": round(wall, 3),
            "decode_images_per_s": round(n / t_decode, 2), "faces_images_per_s": round(n / t_faces, 2),
            "total_images_per_s": round(n / wall, 2)}


def bench_dagster(work: Path) -> dict:
    """A real source_images materialization of the demo inbox through Dagster (DVC publish included)."""
    project_dir = work / "project"
    project_dir.mkdir()
    env = {**os.environ, "FLEN_PROJECT_DIR": str(project_dir), "DAGSTER_HOME": str(project_dir / ".flen" / "dagster"),
           "PYTHONWARNINGS": "ignore"}
    code = r"""
import json, time
from pathlib import Path
import dagster as dg
from flen_assets.runs import init_project
from flen_assets.demo_data import write_sample_inbox
from flen_assets.definitions import defs
from flen_assets.partitions import add_partitions
from flen_resources.project import Project
project = Project.discover()
instance = init_project(project)
files = write_sample_inbox(project.inbox_for("astronaut"))
key = add_partitions(instance, "astronaut", "v1")
job = defs.resolve_job_def("training_set_job")
t0 = time.perf_counter()
result = job.execute_in_process(instance=instance, partition_key=str(key), asset_selection=[dg.AssetKey("source_images")],
                                raise_on_error=False)
print("RESULT " + json.dumps({"success": result.success, "files": len(files), "seconds": time.perf_counter() - t0}))
"""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    process_s = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"source_images materialization failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    res = json.loads(line[len("RESULT "):])
    if not res["success"]:
        raise RuntimeError(f"source_images run failed:\n{proc.stderr[-3000:]}")
    return {"files": res["files"], "run_s": round(res["seconds"], 3), "process_s": round(process_s, 3),
            "files_per_s": round(res["files"] / res["seconds"], 2)}


# -- (b) lineage at scale ---------------------------------------------------------------------------
HEX = np.array([f"{i:02x}" for i in range(256)], dtype="S2")


def hex_ids(rng: np.random.Generator, n: int, nbytes: int = 32) -> pa.Array:
    """n random sha256-like hex strings, vectorised."""
    raw = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    text = np.ascontiguousarray(HEX[raw]).view(f"S{2 * nbytes}").ravel()
    return pa.array(text, type=pa.binary()).cast(pa.string())


def timestamps(start: datetime, offsets_us: np.ndarray) -> pa.Array:
    base = np.datetime64(start.replace(tzinfo=None), "us")
    return pa.array(base + offsets_us.astype("timedelta64[us]"), type=pa.timestamp("us", tz="UTC"))


def repeat_str(value: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, dtype=np.int32)), pa.array([value])).cast(pa.string())


def pick(values: list[str], idx: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(idx.astype(np.int32)), pa.array(values)).cast(pa.string())


def write_table(store, table: str, data: pa.Table, files: int) -> list[Path]:
    from flen_resources.lineage import SCHEMAS

    data = data.select(SCHEMAS[table].names).cast(SCHEMAS[table])
    folder = store.table_dir(table)
    paths = []
    step = max(1, -(-data.num_rows // files))
    for i, offset in enumerate(range(0, data.num_rows, step)):
        path = folder / f"{time.time_ns():020d}-bench-{i:03d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(data.slice(offset, step), tmp, compression="zstd")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def synthesize(store, args: argparse.Namespace) -> dict:
    """`rows` images in chains original -> ... (depth edges) -> leaf, reruns' duplicate edges, and members."""
    rng = np.random.default_rng(args.seed)
    length = args.depth + 1
    chains = args.rows // length
    n = chains * length
    if args.members > chains:
        raise SystemExit(f"--members {args.members} > {chains} chains")
    ids = hex_ids(rng, n)  # image k of chain c is at c * length + k; k = 0 is the original file
    chain = np.repeat(np.arange(chains), length)
    step = np.tile(np.arange(length), chains)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    characters = [f"c{i:03d}" for i in range(100)]
    assets = ["source_images", "source_images", *["enriched_images"] * max(0, length - 2)][:length]
    ops = ["normalize", *[f"op{i}" for i in range(1, length)]][: length - 1]
    asset_idx = np.minimum(step, len(assets) - 1)
    char_idx = chain % len(characters)
    created = (chain * 1000 + step).astype(np.int64)
    paths = pc.binary_join_element_wise(pa.scalar("data/"), pick(assets, asset_idx), pa.scalar("/"),
                                        pick(characters, char_idx), pa.scalar("/v1/images/"), ids, pa.scalar(".png"), "")
    images = pa.table({
        "image_id": ids, "run_id": pick([f"run-{c}" for c in characters], char_idx),
        "asset": pick(assets, asset_idx), "character": pick(characters, char_idx), "iteration": repeat_str("v1", n),
        "path": paths,
        "original_name": pc.if_else(pa.array(step == 0), pc.binary_join_element_wise(
            pa.scalar("photo-"), pa.array(chain).cast(pa.string()), pa.scalar(".jpg"), ""), pa.nulls(n, pa.string())),
        "width": pa.array(np.full(n, 1024, np.int32)), "height": pa.array(np.full(n, 1024, np.int32)),
        "phash": pc.utf8_slice_codeunits(ids, 0, 16), "n_faces": pa.array(np.ones(n, np.int32)),
        "face_boxes": pa.nulls(n, pa.string()), "embedding": pa.nulls(n, pa.list_(pa.float32())),
        "status": repeat_str("accepted", n), "reason": pa.nulls(n, pa.string()),
        "created_at": timestamps(t0, created),
    })
    # edges: child = image k+1 of a chain, parent = image k
    child_pos = np.flatnonzero(step > 0)
    e = len(child_pos)
    dup = rng.choice(e, size=int(e * args.rerun_edges), replace=False) if args.rerun_edges > 0 else np.zeros(0, int)
    rows = np.concatenate([np.arange(e), np.sort(dup)])
    cpos = child_pos[rows]
    cstep = step[cpos]
    edges = pa.table({
        "child_id": ids.take(pa.array(cpos)), "parent_id": ids.take(pa.array(cpos - 1)),
        "run_id": pick([f"run-{c}" for c in characters], char_idx[cpos]),
        "asset": pick(assets, asset_idx[cpos]), "character": pick(characters, char_idx[cpos]),
        "iteration": repeat_str("v1", len(rows)), "operation": pick(ops, cstep - 1),
        "params": repeat_str('{"factor": 1.1}', len(rows)), "prompt": pa.nulls(len(rows), pa.string()),
        "seed": pa.array(cpos.astype(np.int64)), "model": pick(["pillow", "classic/1"], (cstep > 1).astype(int)),
        "created_at": timestamps(t0, created[cpos] + np.where(np.arange(len(rows)) >= e, 10**9, 0)),
    })
    # members: the training_set partition traced below, over several runs (latest wins)
    member_tables = []
    for r in range(args.member_runs):
        chosen = np.sort(rng.choice(chains, size=args.members, replace=False)) * length + (length - 1)
        m = len(chosen)
        member_tables.append(pa.table({
            "run_id": repeat_str(f"ts-run-{r}", m), "asset": repeat_str("training_set", m),
            "character": repeat_str(TRACE_CHARACTER, m), "iteration": repeat_str(TRACE_ITERATION, m),
            "image_id": ids.take(pa.array(chosen)),
            "path": pc.binary_join_element_wise(pa.scalar(f"data/training_set/{TRACE_CHARACTER}/{TRACE_ITERATION}/images/"),
                                                ids.take(pa.array(chosen)), pa.scalar(".png"), ""),
            "origin": repeat_str("enriched", m), "caption": repeat_str(f"photo of {TRACE_CHARACTER}_flen", m),
            "created_at": timestamps(t0, np.full(m, 10**12 + r * 10**6, np.int64)),
        }))
    members = pa.concat_tables(member_tables)
    files = {t: write_table(store, t, d, args.files) for t, d in
             (("images", images), ("edges", edges), ("members", members))}
    return {"chains": chains, "depth": args.depth, "images": n, "edges": edges.num_rows, "distinct_edges": e,
            "members": members.num_rows, "member_runs": args.member_runs, "latest_members": args.members,
            "files_per_table": {t: len(p) for t, p in files.items()},
            "bytes": {t: sum(p.stat().st_size for p in ps) for t, ps in files.items()}}


COLD_TRACE = r"""
import json, sys, time
from pathlib import Path
from flen_resources.lineage import LineageStore
store = LineageStore(Path(sys.argv[1]))
t0 = time.perf_counter()
rows = store.trace(sys.argv[2], sys.argv[3])
print("RESULT " + json.dumps({"seconds": time.perf_counter() - t0, "rows": len(rows)}))
"""


def bench_trace(store, args: argparse.Namespace) -> dict:
    """trace() cold (first call of a fresh process) and warm (repeat calls in one process), medians."""
    cold = []
    for _ in range(args.repeat):
        proc = subprocess.run([sys.executable, "-c", COLD_TRACE, str(store.root), TRACE_CHARACTER, TRACE_ITERATION],
                              capture_output=True, text=True, timeout=3600)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise RuntimeError(f"cold trace failed:\n{proc.stderr[-3000:]}")
        cold.append(json.loads(line[len("RESULT "):]))
    store.trace(TRACE_CHARACTER, TRACE_ITERATION)  # warm-up
    warm, rows = [], []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        rows = store.trace(TRACE_CHARACTER, TRACE_ITERATION)
        warm.append(time.perf_counter() - t0)
    roots = {r["root_id"] for r in rows}
    deepest = max((r["depth"] for r in rows), default=-1)
    if len(roots) != args.members or deepest != args.depth or len(rows) != args.members * (args.depth + 1):
        raise RuntimeError(f"unexpected trace: {len(rows)} rows, {len(roots)} members, depth {deepest}")
    t0 = time.perf_counter()
    counts = store.rows("SELECT (SELECT count(*) FROM images) AS images, (SELECT count(*) FROM edges) AS edges, "
                        "(SELECT count(*) FROM image_edges) AS distinct_edges, (SELECT count(*) FROM members) AS members")[0]
    count_s = time.perf_counter() - t0
    return {"rows_returned": len(rows), "members_traced": len(roots), "max_depth": deepest,
            "cold_s": [round(c["seconds"], 3) for c in cold], "cold_median_s": round(statistics.median(c["seconds"] for c in cold), 3),
            "warm_s": [round(w, 3) for w in warm], "warm_median_s": round(statistics.median(warm), 3),
            "counts": counts, "count_query_s": round(count_s, 3)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
    result: dict = {"benchmark": "ingest_lineage", "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": [Path(sys.executable).name, *sys.argv] if argv is None else ["ingest_lineage.py", *argv],
                    "cwd": os.getcwd(), "machine": machine_info(),
                    "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    with workdir(args.keep) as work:
        print(f"work folder: {work}  ({result['machine']['cpu_count']} CPUs, Python {result['machine']['python']})")
        if not args.skip_ingest:
            ingest_dir = work / "ingest"
            shutil.rmtree(ingest_dir, ignore_errors=True)
            ing = bench_ingest(ingest_dir, args)
            result["ingest"] = ing
            print(f"\n(a) ingest + identity over {ing['images']} images ({ing['faces_found']} faces, "
                  f"{ing['face_model']}, max side {ing['max_side']}):")
            print(f"    decode+normalize+hash  {ing['decode_images_per_s']:8.2f} images/s  ({ing['decode_s']:.2f} s)")
            print(f"    faces+embedding        {ing['faces_images_per_s']:8.2f} images/s  ({ing['faces_s']:.2f} s)")
            print(f"    total                  {ing['total_images_per_s']:8.2f} images/s  ({ing['total_s']:.2f} s)")
            if not args.no_dagster:
                dag_dir = work / "dagster"
                shutil.rmtree(dag_dir, ignore_errors=True)
                dag_dir.mkdir()
                dag = bench_dagster(dag_dir)
                result["dagster_source_images"] = dag
                print(f"    Dagster source_images run of the demo inbox: {dag['files']} files in {dag['run_s']:.2f} s "
                      f"({dag['files_per_s']:.2f} files/s; {dag['process_s']:.1f} s with interpreter start and set-up)")
        if not args.skip_lineage:
            from flen_resources.lineage import LineageStore

            root = work / "lineage"
            shutil.rmtree(root, ignore_errors=True)
            store = LineageStore(root)
            store.ensure()
            t0 = time.perf_counter()
            syn = synthesize(store, args)
            syn["generate_s"] = round(time.perf_counter() - t0, 3)
            result["lineage_synthetic"] = syn
            print(f"\n(b) synthetic lineage: {syn['images']:,} images, {syn['edges']:,} edge rows "
                  f"({syn['distinct_edges']:,} distinct, chains of depth {syn['depth']}), {syn['members']:,} member rows; "
                  f"written in {syn['generate_s']:.1f} s, {sum(syn['bytes'].values()) / 1e6:.0f} MB")
            tr = bench_trace(store, args)
            result["trace"] = tr
            print(f"    trace({TRACE_CHARACTER!r}, {TRACE_ITERATION!r}): {tr['rows_returned']:,} rows "
                  f"({tr['members_traced']} members x depth 0..{tr['max_depth']})")
            print(f"    cold (new process)  median {tr['cold_median_s']:.3f} s  {tr['cold_s']}")
            print(f"    warm (same process) median {tr['warm_median_s']:.3f} s  {tr['warm_s']}")
            print(f"    count(*) of images, edges, image_edges, members: {tr['count_query_s']:.3f} s")
    result["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = args.out or RESULTS / f"ingest_lineage-{socket.gethostname()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    os.replace(tmp, out)
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
