"""Benchmark: FLUX.1-dev images through FluxGenerator with its blocks compiled against eager, side by side (issue 15).

Every variant runs in its own process on the rehearsal's full-size random-weight FLUX and LoRA v1
(rehearsal_gpu.py --phase build_flux, then --phase flux_lora): load the pipeline, a warm-up image of 2
steps per prompt (the prompts encoded, the compiled variant's blocks compiled), then a timed grid of lora_eval's two prompts x
seeds at 1024x1024, 28 steps, as lora_eval and synthetic_batch call it. The generator's quantization is
its `auto` (fp8 on an Ada/Hopper card). Writes benchmarks/results/generate_gpu-<gpu>.json.

    python benchmarks/generate_gpu.py --workdir /tmp/flen-rehearsal --variants eager,compiled,eager,compiled
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from rehearsal_gpu import EVAL_PROMPTS, TRIGGER, importable, measured, write_json  # noqa: E402

VARIANTS = {"eager": False, "compiled": True}  # variant -> FluxGenerator(compile=...)


def one_variant(args: argparse.Namespace) -> dict:
    """Load, warm up and time one variant's grid in this process."""
    import torch

    from flen_resources.generators.flux import FluxGenerator

    gen = FluxGenerator(model=str(args.workdir / "flux"), quantization="auto", device="cuda",
                        compile=VARIANTS[args.variant])
    lora = args.workdir / "runs" / "flux_lora" / "output" / "astronaut_v1.safetensors"
    prompts = [p.format(trigger=TRIGGER) for p in EVAL_PROMPTS]
    seeds = list(range(1, args.images // len(prompts) + 1))
    t = time.perf_counter()
    _ = gen.pipe
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    # every prompt: the timed grid then encodes nothing and moves no text encoder (session 14's run warmed
    # up on one prompt, so its timed grids also encoded the second and moved the encoders on and off)
    gen.generate_grid(prompts, [0], lora=lora, width=args.res, height=args.res, steps=2)
    warmup_s = time.perf_counter() - t
    torch.cuda.synchronize()
    t = time.perf_counter()
    images = gen.generate_grid(prompts, seeds, lora=lora, width=args.res, height=args.res, steps=args.steps)
    torch.cuda.synchronize()
    grid_s = time.perf_counter() - t
    return {"variant": args.variant, "compiled": gen.compiles, "quantization": gen.quantization,
            "images": len(images), "steps": args.steps, "load_s": round(load_s, 1), "warmup_s": round(warmup_s, 1),
            "s_per_image": round(grid_s / len(images), 3), "s_per_step": round(grid_s / len(images) / args.steps, 4)}


def summarize(results: list[dict]) -> dict:
    """Each variant's best per-image time, and the compiled one's speed-up over eager."""
    best = {}
    for r in results:
        if "error" not in r:
            best[r["variant"]] = min(best.get(r["variant"], r["s_per_image"]), r["s_per_image"])
    out: dict = {"best_s_per_image": best}
    if {"eager", "compiled"} <= best.keys():
        out["compiled_speedup"] = round(best["eager"] / best["compiled"], 2)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/flen-rehearsal"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--variants", default="eager,compiled", help=f"comma-separated, each of {', '.join(VARIANTS)}")
    ap.add_argument("--images", type=int, default=6, help="timed images per variant (a multiple of 2 prompts)")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS)  # internal: one variant
    args = ap.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        ap.error(f"--variants: no variant {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    importable()
    if args.variant:
        print("RESULT " + json.dumps(measured(lambda: one_variant(args))), flush=True)
        return 0
    import torch

    report = {"benchmark": "flux_generation", "command": " ".join([sys.executable, *sys.argv]),
              "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "setup": f"{args.res}x{args.res}, {args.steps} steps, LoRA v1 (r16), the generator's auto quantization, "
                       "timed after a 2-step warm-up image per prompt", "results": []}
    for variant in args.variants.split(","):
        passed = [a for a in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run([sys.executable, __file__, *passed, "--variant", variant], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"variant": variant, "error": (proc.stderr or proc.stdout)[-2500:]}
        report["results"].append(result)
        print(json.dumps(result), flush=True)
        report["summary"] = summarize(report["results"])
        write_json(report, "generate_gpu", "full", args.out)
    print(json.dumps(report["summary"]), flush=True)
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
