"""Full-size dress rehearsal of one flywheel iteration on a GPU (issue 5, step 7).

Builds both pipelines at their real architecture size with random weights (no download), saves
them with `save_pretrained`, then runs the GPU work of every GPU asset of one iteration through
the same resources the assets call, with short settings, nf4 where the 24 GB plan uses it:

  enriched_images   QwenEditEditor (nf4, within the 20 GiB memory budget), recipe `angles`: camera presets with
                    the Multiple-angles + Lightning 8-step LoRAs (random stand-ins), 1024x1024 outputs, one
                    batch (edit_batch), as the asset sends them
  qwen_adapter      QwenEditLoraTrainer on the (source, prompt, edit) triplets: encode + LoRA (quantization
                    auto, as the asset: on an Ada/Hopper card fp8 with blocks swapped from host memory, else nf4)
  flux_lora         FluxLoraTrainer on the sources at 1024: encode + LoRA (quantization auto: fp8 on an Ada or
                    Hopper card within the budget, else nf4; compiled blocks)
  lora_eval         FluxGenerator (auto: fp8 on Ada/Hopper within the budget, else nf4) with LoRA v1: a prompt x
                    seed grid at 1024, 28 steps
  synthetic_batch   FluxGenerator (auto, as lora_eval) with LoRA v1: a small batch at 1024, 28 steps

Each asset runs in its own process (as a Dagster step does) and reports its wall time (loading
included) and peak GPU memory: torch's peak allocated / reserved, and the whole card's used
memory sampled through NVML every 20 ms (CUDA context and bitsandbytes buffers included). The
goal: every asset under 20 GiB, so a 24 GB card runs the whole flywheel. With two GPUs the Qwen
and FLUX chains run side by side (one GPU each); with one, one after the other.

Not run here: the CPU parts of the assets (face gates, DVC, lineage, Dagster), which the CPU
test suite covers, and face scoring of the generated images (dlib is not on the GPU machine;
random weights give noise anyway).

    python benchmarks/rehearsal_gpu.py                                  # full size, on a GPU
    python benchmarks/rehearsal_gpu.py --scale tiny --device cpu --res 128 --edits 4 --train-steps 2 \
        --eval-steps 2 --workdir /tmp/reh-tiny --out /tmp/reh-out     # smoke test on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
GIB = 2**30
CHAINS = {"qwen": ["build_qwen", "enriched_images", "qwen_adapter"],
          "flux": ["build_flux", "flux_lora", "lora_eval", "synthetic_batch"]}
GOAL_GIB = 20.0
TRIGGER = "astronaut_flen"


def importable() -> None:
    from qwen_edit_gpu import ensure_project_importable

    ensure_project_importable()


# -- measuring one phase ----------------------------------------------------------------------------
class CardMemory:
    """Peak used memory of a GPU (default: this process's current one, e.g. its leased card), sampled
    through NVML (None without NVML or a GPU). torch maps the CUDA index to NVML's, CUDA_VISIBLE_DEVICES
    included."""

    def __init__(self, interval: float = 0.02, device: int | None = None):
        self.interval, self.peak, self._stop = interval, None, threading.Event()
        try:
            import torch

            card = torch.cuda.current_device() if device is None else device  # here: the sampler thread's is 0
            self._used = lambda: torch.cuda.device_memory_used(card)
            self.baseline, self._sampling = self._used(), True
        except Exception:  # no NVML or no GPU (CPU smoke test)
            self._sampling = False

    def __enter__(self) -> CardMemory:
        if self._sampling:
            self.peak = 0
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used() - self.baseline)
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._sampling:
            self._thread.join()


def measured(fn) -> dict:
    """Run fn() with peak memory tracking; its dict plus wall time and peaks."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    with CardMemory() as card:
        details = fn()
        if cuda:
            torch.cuda.synchronize()
    out = {"wall_s": round(time.perf_counter() - started, 1), **details}
    if cuda:
        out.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                   peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2))
    if card.peak is not None:
        out["peak_card_used_gib"] = round(card.peak / GIB, 2)
    return out


class Ticks:
    """When each unit of a phase ended (a trainer's logged steps, a generator's images): its steady-state pace."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.at: list[tuple[int, float]] = []
        self.clock = clock
        self.started = clock()

    def mark(self, unit: int) -> None:
        self.at.append((unit, self.clock()))

    def unit_s(self) -> float | None:
        """Seconds per unit from the first mark to the last (what came before the first, warm-up included, left
        out); None with fewer than two marks."""
        if len(self.at) < 2 or self.at[-1][0] <= self.at[0][0]:
            return None
        (first, t0), (last, t1) = self.at[0], self.at[-1]
        return round((t1 - t0) / (last - first), 4)

    def trainer_log(self, message: str) -> None:
        """A trainer's log callback: the message to stderr after the seconds since the phase began (where the
        fixed time goes), and a mark at every logged step ("step N/M ...")."""
        print(f"[{self.clock() - self.started:7.1f} s] {message}", file=sys.stderr, flush=True)
        found = re.match(r"step (\d+)/\d+", message)
        if found:
            self.mark(int(found.group(1)))


class TimedPipeline:
    """A diffusers pipeline whose calls (one image each, as FluxGenerator makes them) mark `ticks`."""

    def __init__(self, pipe: Any, ticks: Ticks) -> None:
        self._pipe, self._ticks = pipe, ticks

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self._pipe(*args, **kwargs)  # PIL images: the card's work is done when it returns
        self._ticks.mark(len(self._ticks.at) + 1)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


# -- the phases ---------------------------------------------------------------------------------------
def build_qwen(args: argparse.Namespace) -> dict:
    """Qwen-Image-Edit-2509 at `scale`, saved, plus random Lightning and Multiple-angles LoRAs."""
    import torch
    from qwen_edit_gpu import build_pipeline_folder, ensure_lightning_lora, read_marker

    folder = args.workdir / "qwen"
    device = torch.device(args.device)
    info = {"reused": True} if read_marker(folder) else build_pipeline_folder(folder, args.scale, device, "5GB", 0)
    lightning = ensure_lightning_lora(folder, rank=16, scale=0.5, seed=0, name="lightning-8step")
    angles = folder / "angles.safetensors"
    if not angles.is_file():
        shutil.copyfile(ensure_lightning_lora(folder, rank=16, scale=0.5, seed=1, name="lightning-8step"), angles)
        ensure_lightning_lora(folder, rank=16, scale=0.5, seed=0, name="lightning-8step")
    return {"folder": str(folder), "loras": [lightning.name, angles.name],
            **{k: v for k, v in info.items() if k in ("build_s", "save_s", "size_gib", "params_b", "reused")}}


def build_flux(args: argparse.Namespace) -> dict:
    """FLUX.1-dev at `scale` (CLIP-L + T5-XXL + transformer + VAE), saved with save_pretrained."""
    import torch
    from diffusers import FluxPipeline

    from flen_resources.models.architectures import build_flux_components

    folder = args.workdir / "flux"
    if (folder / "model_index.json").is_file():
        return {"folder": str(folder), "reused": True}
    partial = folder.with_name("flux.partial")
    shutil.rmtree(partial, ignore_errors=True)
    t = time.perf_counter()
    components = build_flux_components(args.scale, seed=0, dtype=torch.bfloat16, device=args.device)
    params = {k: round(sum(p.numel() for p in m.parameters()) / 1e9, 3)
              for k, m in components.items() if isinstance(m, torch.nn.Module)}
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    FluxPipeline(**components).save_pretrained(partial, safe_serialization=True, max_shard_size="5GB")
    partial.rename(folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"folder": str(folder), "params_b": params, "build_s": round(build_s, 1),
            "save_s": round(time.perf_counter() - t, 1), "size_gib": round(size / GIB, 2)}


def sources(args: argparse.Namespace) -> list[Path]:
    """The sample character's clean photos (the ones source_images accepts), as RGB PNGs."""
    import io

    from PIL import Image, ImageOps

    from flen_assets.demo_data import sample_files

    folder = args.workdir / "sources"
    folder.mkdir(parents=True, exist_ok=True)
    keep = ["portrait.jpg", "closeup.png", "side_light.jpg", "rotated_exif.jpg", "print_cmyk.jpg", "poster_palette.png"]
    paths = []
    for name, data in sample_files().items():
        if name in keep:
            path = folder / (Path(name).stem + ".png")
            if not path.is_file():
                img = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
                img.convert("RGB").save(path)
            paths.append(path)
    return paths


def enriched_images(args: argparse.Namespace) -> dict:
    """`args.edits` edits of the sources with the `angles` recipe's qwen_edit entries (Lightning 8-step)."""
    from PIL import Image

    from flen_assets.recipe import builtin_recipe_path, load_recipe
    from flen_resources.editors.qwen_edit import QwenEditEditor

    folder = args.workdir / "qwen"
    editor = QwenEditEditor(model=str(folder), quantization=args.quantization, device=args.device, dtype="bf16",
                            loras={"lightning-8step": str(folder / "lightning-8step.safetensors"),
                                   "angles": str(folder / "angles.safetensors")},
                            output_area=args.res * args.res)
    recipe = load_recipe(builtin_recipe_path("angles"))
    srcs = sources(args)
    out = args.workdir / "enriched"
    out.mkdir(exist_ok=True)
    from flen_resources.editors.base import EditJob

    triplets, done = [], []
    t = time.perf_counter()
    _ = editor.pipe
    load_s = time.perf_counter() - t
    picks = [(recipe.entries[i % len(recipe.entries)], srcs[i % len(srcs)]) for i in range(args.edits)]
    jobs = [EditJob([Image.open(parent).convert("RGB")], entry.request_for(parent.stem, recipe.version))
            for entry, parent in picks]
    t = time.perf_counter()
    results = editor.edit_batch(jobs, progress=lambda: done.append(round(time.perf_counter() - t, 2)))
    batch_s = time.perf_counter() - t
    for i, ((entry, parent), job, result) in enumerate(zip(picks, jobs, results, strict=True)):
        target = out / f"{i:02d}-{entry.id}-{parent.stem}.png"
        result.image.save(target)
        triplets.append({"controls": [str(parent)], "prompt": job.request.prompt, "target": str(target),
                         "caption": f"photo of {TRIGGER}, {entry.caption}"})
    request = jobs[-1].request
    (args.workdir / "triplets.json").write_text(json.dumps(triplets, indent=1))
    return {"edits": len(triplets), "load_s": round(load_s, 1), "batch_s": round(batch_s, 1),
            "transformer_done_at_s": done, "size": list(result.image.size),
            "loras": sorted(request.params.get("loras", {}))}


def train_config(args: argparse.Namespace, steps: int, quantization: str = "auto"):
    from flen_resources.trainers.config import LoraTrainConfig

    cuda = args.device == "cuda"
    return LoraTrainConfig(max_steps=steps, rank=16, alpha=16.0, resolution=args.res,
                           quantization=quantization if cuda else "none",
                           compile=cuda, checkpoint_every=steps,  # optimizer and kept activations: auto
                           lr_warmup_steps=min(50, steps // 10), sample_every=0, device=args.device)


def qwen_adapter(args: argparse.Namespace) -> dict:
    """The Qwen-Image-Edit LoRA on this iteration's triplets (the asset's trainer and config)."""
    from flen_resources.trainers.qwen_edit_lora import QwenEditLoraTrainer, Triplet

    rows = json.loads((args.workdir / "triplets.json").read_text())
    triplets = [Triplet([Path(c) for c in r["controls"]], r["prompt"], Path(r["target"])) for r in rows]
    ticks = Ticks()
    trainer = QwenEditLoraTrainer(model=str(args.workdir / "qwen"), work_dir=args.workdir / "runs" / "qwen_adapter",
                                  log=ticks.trainer_log)
    result = trainer.train(triplets, train_config(args, args.adapter_steps, args.adapter_quantization),
                           name="astronaut_v1_adapter")
    return trained(result, len(triplets), ticks)


def trained(result, examples: int, ticks: Ticks) -> dict:
    losses = [v for _, v in result.losses]
    config = json.loads(result.metadata.get("flenwheel.config", "{}"))
    return {"examples": examples, "steps": result.steps, "train_s": round(result.seconds, 1), "unit_s": ticks.unit_s(),
            "quantization": config.get("quantization"), "swapped_blocks": config.get("swapped_blocks"),
            "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
            "trainer_peak_gib": result.peak_gib, "lora": str(result.lora_path)}


def flux_lora(args: argparse.Namespace) -> dict:
    """FLUX LoRA v1 on the sample sources (the chains run side by side, so not on the edits: the
    images are noise-level stand-ins either way; the sources keep several aspect buckets)."""
    from flen_resources.trainers.flux_lora import FluxLoraTrainer, TrainItem

    items = [TrainItem(p, f"photo of {TRIGGER}") for p in sources(args)]
    ticks = Ticks()
    trainer = FluxLoraTrainer(model=str(args.workdir / "flux"), work_dir=args.workdir / "runs" / "flux_lora",
                              log=ticks.trainer_log)
    result = trainer.train(items, train_config(args, args.train_steps), name="astronaut_v1")
    return trained(result, len(items), ticks)


def generate(args: argparse.Namespace, prompts: list[str], name: str) -> dict:
    """`args.images` images of LoRA v1 through FluxGenerator, as lora_eval and synthetic_batch call it: one grid of
    the prompts x seeds 1..images/prompts (the text encoders once per prompt, then the transformer)."""
    from flen_resources.generators.flux import FluxGenerator

    if args.images % len(prompts):
        raise SystemExit(f"--images {args.images}: give a multiple of the {len(prompts)} prompts")
    # the assets' generator setting: auto (fp8 on an Ada/Hopper card within the budget, else nf4 on a GPU)
    gen = FluxGenerator(model=str(args.workdir / "flux"), quantization="auto" if args.device == "cuda" else "none",
                        device=args.device)
    lora = args.workdir / "runs" / "flux_lora" / "output" / "astronaut_v1.safetensors"
    out = args.workdir / name
    out.mkdir(exist_ok=True)
    t = time.perf_counter()
    ticks = Ticks()
    gen._pipe = TimedPipeline(gen.pipe, ticks)  # each image's end: the pace after the first (which compiles)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    images = gen.generate_grid([p.format(trigger=TRIGGER) for p in prompts],
                               list(range(1, args.images // len(prompts) + 1)), lora=lora, width=args.res,
                               height=args.res, steps=args.eval_steps)
    grid_s = time.perf_counter() - t
    for n, img in enumerate(images):
        img.image.save(out / f"{n:03d}.png")
    return {"images": len(images), "quantization": gen.quantization, "load_s": round(load_s, 1),
            "grid_s": round(grid_s, 1), "s_per_image_in_grid": round(grid_s / len(images), 2), "unit_s": ticks.unit_s(),
            "steps": args.eval_steps}


EVAL_PROMPTS = ["photo of {trigger}, portrait, looking at the camera",
                "photo of {trigger} outdoors in a park, natural light"]


def lora_eval(args: argparse.Namespace) -> dict:
    return generate(args, EVAL_PROMPTS, "eval")


def synthetic_batch(args: argparse.Namespace) -> dict:
    return generate(args, ["photo of {trigger}, three-quarter view, studio light",
                           "photo of {trigger} smiling outdoors"], "synthetic")


PHASES = {f.__name__: f for f in (build_qwen, build_flux, enriched_images, qwen_adapter, flux_lora, lora_eval,
                                  synthetic_batch)}


# -- the driver -----------------------------------------------------------------------------------------
def run_chain(chain: str, gpu: str | None, args: argparse.Namespace, report: dict, lock: threading.Lock) -> None:
    """The chain's phases one after the other, each in its own process; stops at the first failure."""
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {})}
    for phase in CHAINS[chain]:
        if args.only and phase not in args.only.split(","):
            continue
        cmd = [sys.executable, __file__, "--phase", phase, *args.passthrough]
        started = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"error": (proc.stderr or proc.stdout)[-2500:]}
        result.update(asset=phase, chain=chain, gpu=gpu, process_s=round(time.time() - started, 1))
        with lock:
            report["phases"].append(result)
            write(report, args)
        print(json.dumps(result), flush=True)
        if "error" in result:
            return


def summarize(report: dict) -> dict:
    assets = {p["asset"]: p for p in report["phases"] if not p["asset"].startswith("build")}
    peaks = {a: p.get("peak_card_used_gib", p.get("peak_reserved_gib")) for a, p in assets.items() if "error" not in p}
    return {"peak_gib_by_asset": peaks, "wall_s_by_asset": {a: p.get("wall_s") for a, p in assets.items()},
            "failed": [a for a, p in assets.items() if "error" in p],
            "all_under_goal": bool(peaks) and all(v is not None and v < GOAL_GIB for v in peaks.values())
            and len(peaks) == sum(len(v) - 1 for v in CHAINS.values()), "goal_gib": GOAL_GIB,
            "note": "peak = the card's used memory (NVML), CUDA context and allocator slack included"}


def write(report: dict, args: argparse.Namespace) -> None:
    report["summary"] = summarize(report)
    write_json(report, "rehearsal_gpu", args.scale, args.out)


def result_name(benchmark: str, scale: str, gpu: str, machine: str = "") -> str:
    """<benchmark>-[<scale>-]<gpu, as a slug><machine>.json (no scale when full): a result file's name."""
    from qwen_edit_gpu import slug

    card = slug(gpu) + machine
    return f"{benchmark}-{card}.json" if scale == "full" else f"{benchmark}-{scale}-{card}.json"


def write_json(report: dict, benchmark: str, scale: str, out: Path, machine: str = "") -> None:
    """<out>/result_name(...), a copy in $OUT when set."""
    name = result_name(benchmark, scale, report["gpu"], machine)
    for folder in [out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(report, indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["full", "tiny"], default="full")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/flen-rehearsal"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--edits", type=int, default=4, help="Qwen edits (also the adapter's triplets; >= 4)")
    ap.add_argument("--train-steps", type=int, default=50, help="FLUX LoRA steps")
    ap.add_argument("--adapter-steps", type=int, default=30, help="Qwen adapter steps")
    ap.add_argument("--eval-steps", type=int, default=28, help="sampling steps of eval and synthetic images")
    ap.add_argument("--images", type=int, default=4, help="images of lora_eval and of synthetic_batch, each (a multiple "
                    "of their 2 prompts)")
    ap.add_argument("--adapter-quantization", choices=["auto", "nf4", "fp8"], default="auto",
                    help="the Qwen adapter's base: auto (the asset's: on an Ada/Hopper card fp8, blocks swapped from "
                         "host memory as LoraTrainConfig.swapped_blocks auto decides), nf4 or fp8")
    ap.add_argument("--chains", default="qwen,flux")
    ap.add_argument("--only", default="", help="run only these phases of the chains (comma-separated)")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)  # internal: one phase, print JSON
    args = ap.parse_args(argv)
    args.quantization = "nf4" if args.device == "cuda" else "none"
    args.passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    importable()
    if args.phase:
        result = measured(lambda: PHASES[args.phase](args))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    report = {"benchmark": "flywheel_rehearsal", "command": " ".join([sys.executable, *sys.argv]),
              "gpu": torch.cuda.get_device_name(0) if gpus else "cpu", "gpus": gpus, "scale": args.scale,
              "settings": {k: getattr(args, k) for k in ("res", "edits", "train_steps", "adapter_steps", "eval_steps", "images",
                                                         "quantization")}, "phases": []}
    from qwen_edit_gpu import package_versions

    report["versions"] = package_versions()
    lock = threading.Lock()
    chains = args.chains.split(",")
    if gpus >= 2:  # one chain per GPU, side by side
        threads = [threading.Thread(target=run_chain, args=(c, str(i), args, report, lock)) for i, c in enumerate(chains)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for chain in chains:
            run_chain(chain, None, args, report, lock)
    write(report, args)
    print(json.dumps({"summary": report["summary"]}, indent=1), flush=True)
    return 0 if not report["summary"]["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
