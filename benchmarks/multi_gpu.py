"""Benchmark: two characters' FLUX LoRA trainings on a host with two GPUs, one after the other on one
card against side by side, each card leased per step (resources/gpu_lease.py; issue 14 item 6).

Each character's training is its own process, as a Dagster step is, and takes its card through
`step_gpu` (an flock per card of the host, then `torch.cuda.set_device`); the trainer's device
"auto" (`pick_device`) is then the leased card. The training is train_gpu.py's `ours-compile`
variant on the full-size FLUX.1-dev transformer with random weights, saved once by train_gpu's
`build`: the project's trainer (`_transformer`, `_loss`, 8-bit AdamW, grad clipping, compiled
blocks, cuDNN attention) at 1024x1024, LoRA r16, nf4 base, 512 text tokens, `--warmup` untimed
steps and then `--steps` timed ones.

  sequential  A, then B: both take card 0, one after the other
  concurrent  A and B started at once: the lease puts them on different cards

Per phase: its wall time (process start to the last process's end, loading and compiling
included) and the steady-state step time of each process; per process: the card its lease gave,
torch's peak allocated memory over the timed steps (`max_memory_allocated` on that card) and the
card's used memory over the whole process (NVML, rehearsal_gpu.CardMemory). Every process starts
with an empty torch.compile cache of its own, so no phase reuses another's compilation.

  throughput_ratio   = sequential wall / concurrent wall: trainings per unit time, two cards vs one
  steady_state_ratio = steps per second of the concurrent processes together / of one sequential one
Goal: throughput_ratio >= 1.8 with no card's peak above the sequential peak.

    python benchmarks/multi_gpu.py --steps 40                       # two GPUs: build, then both phases
    python benchmarks/multi_gpu.py --scale tiny --device cpu --res 256 --steps 2 --warmup 1 \\
        --workdir /tmp/mgpu-tiny --out /tmp/mgpu-out                  # smoke test on a CPU (no cards: no lease)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from rehearsal_gpu import GIB, CardMemory, write_json  # noqa: E402
from train_gpu import build, importable, run_variant  # noqa: E402

VARIANT = "ours-compile"
PHASES = ["sequential", "concurrent"]
GOAL_RATIO = 1.8
PEAK_TOLERANCE_GIB = 0.05  # allocator rounding; anything more is a real change of the card's peak


def leased(label: str, fn) -> dict:
    """fn(device) inside a GPU lease of this host, the leased card being torch's current device and
    pick_device("auto") (no card: the CPU); its result with the lease's card, torch's current card,
    the device the work ran on and what the lease said."""
    import torch

    importable()
    from flen_resources.gpu_lease import step_gpu
    from flen_resources.models.pipelines import pick_device

    said: list[str] = []
    with step_gpu(label, said.append) as lease:
        device = pick_device("auto")
        result = fn(str(device))
        cuda = device.type == "cuda"
        return {"lease_card": lease.device if lease else None, "lease_said": said,
                "current_card": torch.cuda.current_device() if cuda else None, "device": str(device),
                "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", **result}


def train_one(args: argparse.Namespace) -> dict:
    """One character's training in this process, on the card its lease gives, and that card's NVML peak."""
    def train(device: str) -> dict:
        with CardMemory() as card:  # the current card: the leased one
            result = run_variant(VARIANT, "flux", args.workdir, args.steps, args.warmup, device, args.res,
                                 "nf4" if args.device == "cuda" else "none")
        return {**result, "peak_card_used_gib": round(card.peak / GIB, 3) if card.peak is not None else None}

    return leased(f"flux_lora {args.one}", train)


def build_once(args: argparse.Namespace) -> dict:
    """The random FLUX transformer saved to --workdir (train_gpu.build; reused when there), under a lease."""
    import torch

    return {**leased("multi_gpu build", lambda device: build(args.workdir, "flux", args.scale, device)),
            "gpus": torch.cuda.device_count(), "torch": torch.__version__}


def child(args: argparse.Namespace, *extra: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, *extra, "--workdir", str(args.workdir), "--scale", args.scale, "--device",
           args.device, "--res", str(args.res), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = dict(os.environ if env is None else env)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # no card to lease: pick_device("auto") is the CPU
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def result_of(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    line = next((l for l in out.splitlines() if l.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": (err or out)[-2500:], "returncode": proc.returncode}


def start_training(args: argparse.Namespace, phase: str, character: str) -> tuple[subprocess.Popen, float]:
    """A character's training process with an empty compile cache of its own."""
    cache = args.workdir / "compile-cache" / f"{phase}-{character}"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}
    return child(args, "--one", character, env=env), time.perf_counter()


def finish(proc: subprocess.Popen, started: float, phase: str, character: str) -> dict:
    result = result_of(proc)
    result.update(phase=phase, character=character, process_s=round(time.perf_counter() - started, 1))
    if "step_times_s" in result:
        result["timed_steps_s"] = round(sum(result["step_times_s"]), 1)
    print(json.dumps({k: v for k, v in result.items() if k != "step_times_s"}), flush=True)
    return result


def run_phase(args: argparse.Namespace, phase: str, report: dict) -> None:
    """All characters one after the other (sequential) or at once (concurrent); the phase's wall time."""
    started = time.perf_counter()
    if phase == "sequential":
        for character in args.characters:
            report["processes"].append(finish(*start_training(args, phase, character), phase, character))
            write(report, args)
    else:
        running = [(start_training(args, phase, c), c) for c in args.characters]
        for (proc, t), character in running:
            report["processes"].append(finish(proc, t, phase, character))
    report["phases"][phase] = {"wall_s": round(time.perf_counter() - started, 1)}
    write(report, args)


def phase_figures(report: dict, phase: str) -> dict:
    rows = [p for p in report["processes"] if p["phase"] == phase]
    ok = [p for p in rows if "step_times_s" in p]
    steps = [t for p in ok for t in p["step_times_s"]]
    fig = {"wall_s": report["phases"].get(phase, {}).get("wall_s"), "failed": [p["character"] for p in rows if p not in ok],
           "cards": {p["character"]: p.get("lease_card") for p in ok},
           "step_s_median": round(statistics.median(steps), 4) if steps else None,
           "steps_per_s": round(sum(1 / statistics.median(p["step_times_s"]) for p in ok), 3) if ok else None,
           "load_s": {p["character"]: p["load_s"] for p in ok}, "warmup_s": {p["character"]: p["warmup_s"] for p in ok},
           "process_s": {p["character"]: p["process_s"] for p in ok}}
    if phase == "sequential" and ok:  # one card at a time: one process's rate
        fig["steps_per_s"] = round(1 / fig["step_s_median"], 3)
    peaks, card_peaks = [p.get("peak_allocated_gib") for p in ok], [p.get("peak_card_used_gib") for p in ok]
    fig["peak_allocated_gib"] = max(peaks) if peaks and None not in peaks else None
    fig["peak_card_used_gib"] = max(card_peaks) if card_peaks and None not in card_peaks else None
    fig["peaks_by_card"] = {}  # card: [torch peak, NVML peak] of each process that ran on it
    for p in ok:
        fig["peaks_by_card"].setdefault(str(p.get("lease_card")), []).append(
            [p.get("peak_allocated_gib"), p.get("peak_card_used_gib")])
    return fig


def summarize(report: dict) -> dict:
    seq, conc = phase_figures(report, "sequential"), phase_figures(report, "concurrent")
    out = {"sequential": seq, "concurrent": conc, "peak_gib_sequential": seq["peak_allocated_gib"],
           "peak_gib_concurrent": conc["peak_allocated_gib"], "card_used_gib_sequential": seq["peak_card_used_gib"],
           "card_used_gib_concurrent": conc["peak_card_used_gib"], "goal_ratio": GOAL_RATIO,
           "note": "peak_gib_* = torch max_memory_allocated on the process's leased card over the timed steps (the "
                   "largest over the phase's processes); card_used_gib_* = NVML used memory of that card over the "
                   "whole process, CUDA context and allocator slack included"}
    if seq["wall_s"] and conc["wall_s"] and not seq["failed"] and not conc["failed"]:
        out["throughput_ratio"] = round(seq["wall_s"] / conc["wall_s"], 3)
        out["steady_state_ratio"] = round(conc["steps_per_s"] / seq["steps_per_s"], 3)
        cards = list(conc["cards"].values())
        out["distinct_cards_concurrent"] = len(set(cards)) == len(cards) if None not in cards else None  # None: no cards
        if seq["peak_allocated_gib"] is not None and conc["peak_allocated_gib"] is not None:
            out["peak_change_gib"] = round(conc["peak_allocated_gib"] - seq["peak_allocated_gib"], 3)
            out["goal_met"] = (out["throughput_ratio"] >= GOAL_RATIO and out["distinct_cards_concurrent"]
                               and out["peak_change_gib"] <= PEAK_TOLERANCE_GIB)
    return out


def write(report: dict, args: argparse.Namespace) -> None:
    """benchmarks/results/multi_gpu-<gpu>-x<cards>.json (and $OUT's copy), rewritten after every process."""
    report["summary"] = summarize(report)
    write_json(report, "multi_gpu", args.scale, args.out, f"-x{report['gpus']}" if report["gpus"] > 1 else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["full", "tiny"], default="full")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cuda: each process on the card its lease gives (pick_device('auto'))")
    ap.add_argument("--workdir", type=Path, help="where the random transformer is saved (default /tmp/flen-flux-<scale>, "
                                                 "as train_gpu.py)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per character")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    ap.add_argument("--characters", default="alice,bob", help="comma-separated: one training each")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: train one character, print its JSON
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)  # internal: save the transformer
    args = ap.parse_args(argv)
    args.workdir = args.workdir or Path(f"/tmp/flen-flux-{args.scale}")
    args.characters = args.characters.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one or args.build:
        print("RESULT " + json.dumps(train_one(args) if args.one else build_once(args)), flush=True)
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    built = result_of(child(args, "--build"))  # in a process of its own: this one never touches a card
    print(json.dumps({"build": built, "process_s": round(time.perf_counter() - started, 1)}), flush=True)
    if "error" in built:
        return 1
    report = {"benchmark": "flux_lora_two_characters_multi_gpu", "command": " ".join([sys.executable, *sys.argv]),
              "gpu": built["gpu"], "gpus": built["gpus"], "torch": built["torch"], "scale": args.scale,
              "setup": f"train_gpu.py's {VARIANT} variant per character: {args.res}x{args.res}, batch 1, LoRA r16 on "
                       f"attention projections, {'nf4' if args.device == 'cuda' else 'bf16'} base, gradient "
                       f"checkpointing, 8-bit AdamW on a GPU; {args.warmup} warm-up + {args.steps} timed steps; "
                       "every process through step_gpu, its own empty compile cache",
              "settings": {"steps": args.steps, "warmup": args.warmup, "res": args.res, "characters": args.characters},
              "build": built, "phases": {}, "processes": []}
    for phase in args.phases.split(","):
        run_phase(args, phase, report)
    print(json.dumps({"summary": report["summary"]}, indent=1), flush=True)
    s = report["summary"]
    if "throughput_ratio" in s:
        print(f"throughput_ratio {s['throughput_ratio']} (sequential {s['sequential']['wall_s']} s / concurrent "
              f"{s['concurrent']['wall_s']} s), steady_state_ratio {s['steady_state_ratio']}, cards "
              f"{s['sequential']['cards']} -> {s['concurrent']['cards']}, peak {s['peak_gib_sequential']} -> "
              f"{s['peak_gib_concurrent']} GiB (card used {s['card_used_gib_sequential']} -> "
              f"{s['card_used_gib_concurrent']} GiB)", flush=True)
    return 0 if s.get("throughput_ratio") else 1


if __name__ == "__main__":
    sys.exit(main())
