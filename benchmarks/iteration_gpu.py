"""Benchmark: one production flywheel iteration on one card, projected from timed slices (issue 15).

A production iteration (the large-card run settings, resources/run_settings.py): 40 edits, 500 Qwen
adapter steps, 1,500 FLUX LoRA steps, lora_eval's prompts x seeds for every kept checkpoint, 16
synthetic images, all at 1024x1024. Running all of it takes longer than one device call, so every GPU
asset runs as a slice of at most 10 minutes through benchmarks/rehearsal_gpu.py (the resources the assets
call, each in its own process, on full-size random weights), and its production count is extrapolated:

    projected  = fixed + production_count * per_unit
    per_unit   = the steady-state cost of one step / image, timed inside the slice's process: a trainer's
                 logged steps from the first to the last (step 10 to the end), a generator's images from the
                 first to the last (the first image, which compiles the blocks, left out)
    fixed      = wall - count * per_unit       loading, encoding, compiling, the first steps, writing

The enrichment (not compiled; its edits run phase by phase, the VAE after every transformer pass) runs twice,
with a small and a larger count, and its line is fitted:

    per_unit   = (wall(b) - wall(a)) / (b - a)     fixed = wall(a) - a * per_unit

A fit over two processes is only as good as their fixed costs are equal: session 14's FLUX LoRA slices of 2
and 60 steps differed by 9.4 s (0.16 s a step, against 0.40 s timed in train_gpu.py the same hour), so the
compiled assets are paced in process. Peaks are the card's used memory (NVML, CUDA context included), the
largest of the slices.

Every slice starts with empty torch.compile caches (inductor's and Triton's), so compilation lands in
`fixed`: a first iteration's cost, the conservative one. `--caches warm` measures a later iteration on the same
machine instead: each compiled asset's caches are filled by one untimed slice of its smaller count first (the
same graphs: same model, shapes and settings), its row says so (`compile_caches`, `cache_fill`), and the JSON is
iteration_gpu-warm-<gpu>.json, beside the first iteration's.
Enrichment counts whole cycles of the `angles` recipe (7 entries: 4 with the angles + Lightning LoRAs,
2 Lightning only, 1 without LoRAs at 40 steps and true_cfg 4), so its per-edit cost is the recipe's mix.
An asset measured alone gets its input first, untimed: the adapter the enrichment's triplets, the FLUX
generator LoRA v1.

RTX 4090 projection (stated as one, never measured): per-unit time scales by the ratio of dense tensor
throughput (bf16 for nf4/bf16 work, fp8 for the fp8 FLUX path), fixed time by the ratio of memory
bandwidth; the card's 24 GB must hold each asset's peak.

    python benchmarks/iteration_gpu.py                                    # on a GPU, full size
    # one command per chain (a device call's 10 minutes; 64 GiB of disk holds one chain's models at a time):
    python benchmarks/iteration_gpu.py --only enriched_images,qwen_adapter
    rm -rf /tmp/flen-rehearsal/qwen
    python benchmarks/iteration_gpu.py --only flux_lora,lora_eval,synthetic_batch   # adds to the same JSON
    python benchmarks/iteration_gpu.py --only flux_lora --caches warm     # a later iteration: warm compile caches
    python benchmarks/iteration_gpu.py --only qwen_adapter --adapter-quantization nf4   # the adapter on an nf4 base
                                                                                       # (auto: fp8, blocks swapped)
    python benchmarks/iteration_gpu.py --scale tiny --device cpu --res 64 --workdir /tmp/it-tiny \\
        --out /tmp/it-out                                                 # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
REHEARSAL = REPO / "benchmarks" / "rehearsal_gpu.py"
GOAL_MIN = 25.0
GOAL_GIB = 20.0
SLICE_LIMIT_S = 600
# Checkpoints lora_eval scores: 1,500 steps, one kept every 250 (trainers/config.checkpoint_interval).
PRODUCTION_CHECKPOINTS = 1500 // 250
EVAL_PROMPTS = 3  # lora_eval's fixed prompts (flen_assets/assets/lora.py), 4 seeds each on a large card
# lora_eval: every checkpoint's prompts x seeds, and the base model without the LoRA once per prompt.
EVAL_IMAGES = EVAL_PROMPTS * 4 * PRODUCTION_CHECKPOINTS + EVAL_PROMPTS


RECIPE_CYCLE = 7  # entries of the `angles` recipe, which the rehearsal's enrichment cycles through
# What an asset reads from the one before it in the chain (under the work folder), and the untimed rehearsal
# phase that makes it when an asset is measured alone.
INPUTS = {"qwen_adapter": ("triplets.json", "enriched_images", "--edits", 4),
          "lora_eval": ("runs/flux_lora/output/astronaut_v1.safetensors", "flux_lora", "--train-steps", 2),
          "synthetic_batch": ("runs/flux_lora/output/astronaut_v1.safetensors", "flux_lora", "--train-steps", 2)}

# The model folder each asset needs (rehearsal_gpu.py's build phases).
CHAIN_BUILDS = {"enriched_images": "build_qwen", "qwen_adapter": "build_qwen", "flux_lora": "build_flux",
                "lora_eval": "build_flux", "synthetic_batch": "build_flux"}


@dataclass(frozen=True)
class Slice:
    """How one asset is timed: the rehearsal argument that sets its count, two counts, and production's count."""

    asset: str
    argument: str
    small: int
    large: int
    production: int
    unit: str
    paced: bool  # the rehearsal times its units in process (unit_s): one slice, the larger
    compiled: bool  # its resource compiles transformer blocks on a GPU (what `--caches warm` fills first)
    work: str  # which throughput its per-unit time scales with on another card: "bf16" or "fp8" (a slice that
    # reports its quantization, a trainer's or a generator's, replaces it by what ran)


def production_slices(scale: str) -> list[Slice]:
    """The assets of one iteration in run order, with the counts of a production run (tiny: a smoke test's)."""
    tiny = scale == "tiny"
    return [
        Slice("enriched_images", "--edits", 4 if tiny else RECIPE_CYCLE, 5 if tiny else 2 * RECIPE_CYCLE, 40, "edit",
              False, False, "bf16"),
        # trainers log every LOG_EVERY (10) steps (trainers/loop.py): the pace from step 10 to the last
        Slice("qwen_adapter", "--adapter-steps", 2, 20 if tiny else 30, 500, "step", True, True, "bf16"),
        Slice("flux_lora", "--train-steps", 2, 20 if tiny else 60, 1500, "step", True, True, "fp8"),
        # a grid of 2 prompts (rehearsal_gpu's), as the assets send theirs
        Slice("lora_eval", "--images", 2, 4 if tiny else 6, EVAL_IMAGES, "image", True, True, "fp8"),
        Slice("synthetic_batch", "--images", 2, 4 if tiny else 6, 16, "image", True, True, "fp8"),
    ]


@dataclass(frozen=True)
class Card:
    """A card's dense tensor throughput (TFLOPS, fp32 accumulation) and memory bandwidth (TB/s), from its datasheet."""

    name: str
    bf16_tflops: float
    fp8_tflops: float
    bandwidth_tbs: float
    memory_gib: float


H200 = Card("NVIDIA H200", 989.0, 1979.0, 4.8, 139.8)
RTX_4090 = Card("NVIDIA GeForce RTX 4090", 165.2, 330.3, 1.008, 23.6)


def fit(small: int, small_s: float, large: int, large_s: float) -> tuple[float, float]:
    """(fixed seconds, seconds per unit) of the line through two slices."""
    if large <= small:
        raise ValueError(f"the larger slice ({large}) must count more than the smaller ({small})")
    per_unit = max(0.0, (large_s - small_s) / (large - small))
    return max(0.0, small_s - small * per_unit), per_unit


def paced(count: int, wall_s: float, unit_s: float) -> tuple[float, float]:
    """(fixed seconds, seconds per unit) of a slice whose units were timed in process."""
    return max(0.0, wall_s - count * unit_s), unit_s


def project(fixed_s: float, per_unit_s: float, count: int) -> float:
    """Seconds for `count` units."""
    return fixed_s + count * per_unit_s


def on_card(fixed_s: float, per_unit_s: float, work: str, measured: Card, target: Card) -> tuple[float, float]:
    """(fixed, per unit) seconds projected from `measured` to `target`: compute by the throughput ratio of `work`,
    the rest by the bandwidth ratio."""
    compute = getattr(measured, f"{work}_tflops") / getattr(target, f"{work}_tflops")
    return fixed_s * measured.bandwidth_tbs / target.bandwidth_tbs, per_unit_s * compute


def summarize(rows: list[dict], measured: Card | None) -> dict:
    """The projected iteration, the peaks, and the 4090 projection (when measured on a known card)."""
    done = [r for r in rows if "projected_s" in r]
    summary = {"projected_iteration_min": round(sum(r["projected_s"] for r in done) / 60, 1),
               "projected_min_by_asset": {r["asset"]: round(r["projected_s"] / 60, 2) for r in done},
               "peak_card_gib_by_asset": {r["asset"]: r.get("peak_card_gib") for r in rows},
               "failed": [r["asset"] for r in rows if "error" in r], "goal_min": GOAL_MIN, "goal_gib": GOAL_GIB}
    summary["unmeasured"] = [s.asset for s in production_slices("full") if s.asset not in {r["asset"] for r in done}]
    everything = not summary["unmeasured"]  # projected_iteration_min is then a part of the iteration
    summary["meets_goals"] = (everything and not summary["failed"] and len(done) == len(rows)
                              and summary["projected_iteration_min"] <= GOAL_MIN
                              and all(v is not None and v <= GOAL_GIB for v in summary["peak_card_gib_by_asset"].values()))
    if measured is not None and done:
        minutes = {}
        for r in done:
            fixed, per_unit = on_card(r["fixed_s"], r["per_unit_s"], r["work"], measured, RTX_4090)
            minutes[r["asset"]] = round(project(fixed, per_unit, r["production"]) / 60, 1)
        summary["rtx_4090_projection"] = {
            "projected_iteration_min": round(sum(minutes.values()), 1), "min_by_asset": minutes,
            "fits_24gb": all(v is not None and v <= RTX_4090.memory_gib for v in summary["peak_card_gib_by_asset"].values()),
            "how": (f"a projection, not a measurement: per-unit time x {measured.name}'s dense tensor TFLOPS / the "
                    f"4090's ({measured.bf16_tflops:g}/{RTX_4090.bf16_tflops:g} bf16, {measured.fp8_tflops:g}/"
                    f"{RTX_4090.fp8_tflops:g} fp8), fixed time x the bandwidth ratio ({measured.bandwidth_tbs:g}/"
                    f"{RTX_4090.bandwidth_tbs:g} TB/s); PCIe, host RAM and clocks under load not modelled")}
    return summary


def known_card(name: str) -> Card | None:
    """The datasheet figures of the card the slices ran on, when known."""
    return next((c for c in (H200, RTX_4090) if c.name.lower() in name.lower()), None)


def compile_env(cache: Path, warm: bool = False) -> dict[str, str]:
    """This environment with torch.compile's caches (inductor, Triton) in `cache`: emptied first unless `warm`."""
    if not warm:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    return {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}


def keep_log(out: Path, asset: str, count: int, stderr: str | bytes | None) -> None:
    """A slice's own log (a trainer's timed lines: loading, compiling, steps) in <out>/slice-logs/."""
    logs = out / "slice-logs"
    logs.mkdir(parents=True, exist_ok=True)
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr or ""
    (logs / f"{asset}-{count}.log").write_text(text)


def phase(asset: str, argument: str, count: int, args: argparse.Namespace, common: list[str]) -> dict:
    """One rehearsal phase with `count` units in its own process, with the run's compile caches (cold: emptied
    first); its RESULT or an error."""
    cmd = [sys.executable, str(REHEARSAL), "--phase", asset, argument, str(count), *common]
    # A fresh run folder: a trainer would resume from the last slice's checkpoint and reuse its feature cache.
    shutil.rmtree(args.workdir / "runs" / asset, ignore_errors=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=SLICE_LIMIT_S,
                              env=compile_env(args.workdir / "compile-cache", args.caches == "warm"))
    except subprocess.TimeoutExpired as exc:
        keep_log(args.out, asset, count, exc.stderr)  # where it was when stopped
        return {"error": f"{asset} with {count} units ran past {SLICE_LIMIT_S} s"}
    keep_log(args.out, asset, count, proc.stderr)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-2500:]}


def measure(s: Slice, args: argparse.Namespace, common: list[str]) -> dict:
    """An asset's slices (one when paced in process, else two) and the projection from them."""
    row: dict = {"asset": s.asset, "unit": s.unit, "production": s.production, "work": s.work, "slices": []}
    if s.asset in INPUTS and not (args.workdir / INPUTS[s.asset][0]).exists():
        _, before, argument, count = INPUTS[s.asset]
        row["input"] = {"phase": before, "count": count, **phase(before, argument, count, args, common)}
        if "error" in row["input"]:
            row["error"] = row["input"]["error"]
            return row
    row["compile_caches"] = args.caches if s.compiled else "none"
    if row["compile_caches"] == "warm":  # a previous iteration's graphs: one untimed slice compiles them
        fill = phase(s.asset, s.argument, s.small, args, common)
        row["cache_fill"] = {"count": s.small, **{k: fill[k] for k in ("wall_s", "error") if k in fill}}
        if "error" in fill:
            row["error"] = fill["error"]
            return row
    for count in (s.large,) if s.paced else (s.small, s.large):
        result = phase(s.asset, s.argument, count, args, common)
        row["slices"].append({"count": count, **result})
        print(json.dumps({"asset": s.asset, "count": count, **result})[:2000], flush=True)
        if "error" in result:
            row["error"] = result["error"]
            return row
    b = row["slices"][-1]
    if b.get("quantization"):  # what the trainer chose (auto): its per-unit work scales with that throughput
        row["quantization"] = b["quantization"]
        row["work"] = "fp8" if b["quantization"] == "fp8" else "bf16"
    if s.paced:
        if not b.get("unit_s"):
            row["error"] = f"{s.asset}: the slice of {s.large} reported no in-process pace (unit_s)"
            return row
        row["per_unit_from"] = "in process"
        fixed, per_unit = paced(s.large, b["wall_s"], b["unit_s"])
    else:
        row["per_unit_from"] = "two-slice fit"
        fixed, per_unit = fit(s.small, row["slices"][0]["wall_s"], s.large, b["wall_s"])
    row["fixed_s"], row["per_unit_s"] = round(fixed, 3), round(per_unit, 4)
    row["projected_s"] = round(project(row["fixed_s"], row["per_unit_s"], s.production), 1)
    peaks = [x.get("peak_card_used_gib", x.get("peak_reserved_gib")) for x in row["slices"]]
    row["peak_card_gib"] = max(peaks) if None not in peaks else None
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["full", "tiny"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/flen-rehearsal"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--caches", choices=["cold", "warm"], default="cold",
                    help="torch.compile's caches for the compiled assets: cold (emptied before every slice, a first "
                         "iteration) or warm (filled by an untimed slice first, a later iteration)")
    ap.add_argument("--only", default="", help="measure only these assets (comma-separated), building only their "
                                               "models; the other assets' rows of an earlier run stay in the JSON")
    ap.add_argument("--adapter-quantization", choices=["auto", "nf4", "fp8"], default="auto",
                    help="qwen_adapter's base: auto (what the asset runs: fp8 with blocks swapped from host memory on "
                         "an Ada/Hopper card, models/block_swap.py), nf4 or fp8; nf4 and fp8 write "
                         "iteration_gpu-adapter-<it>-<gpu>.json")
    args = ap.parse_args(argv)
    import torch
    from rehearsal_gpu import result_name, write_json

    common = ["--scale", args.scale, "--device", args.device, "--res", str(args.res), "--workdir", str(args.workdir),
              "--eval-steps", "28" if args.scale == "full" else "2", "--adapter-quantization", args.adapter_quantization]
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    report = {"benchmark": "iteration_gpu", "command": " ".join([sys.executable, *sys.argv]), "gpu": gpu,
              "scale": args.scale, "res": args.res, "compile_caches": args.caches, "method": __doc__.split("\n\n")[1],
              "builds": [], "assets": []}
    slices = [s for s in production_slices(args.scale) if not args.only or s.asset in args.only.split(",")]
    benchmark = "iteration_gpu" + ("" if args.caches == "cold" else "-warm") \
        + ("" if args.adapter_quantization == "auto" else f"-adapter-{args.adapter_quantization}")
    earlier = args.out / result_name(benchmark, args.scale, gpu)
    if args.only and earlier.is_file():  # the rows this run does not measure, from the run before it
        measured_now = {s.asset for s in slices}
        report["assets"] = [r for r in json.loads(earlier.read_text())["assets"] if r["asset"] not in measured_now]
    started = time.time()
    for build in sorted({CHAIN_BUILDS[s.asset] for s in slices}):
        proc = subprocess.run([sys.executable, str(REHEARSAL), "--phase", build, *common], capture_output=True,
                              text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        report["builds"].append({"phase": build, **(json.loads(line[7:]) if line else
                                                    {"error": (proc.stderr or proc.stdout)[-2500:]})})
    order = [s.asset for s in production_slices(args.scale)]
    for s in slices:
        report["assets"].append(measure(s, args, common))
        report["assets"].sort(key=lambda r: order.index(r["asset"]))
        report["summary"] = summarize(report["assets"], known_card(gpu))
        report["wall_s"] = round(time.time() - started, 1)
        write_json(report, benchmark, args.scale, args.out)
    print(json.dumps({"summary": report.get("summary")}, indent=1), flush=True)
    return 0 if report.get("summary", {}).get("failed") == [] else 1


if __name__ == "__main__":
    sys.exit(main())
