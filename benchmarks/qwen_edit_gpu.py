"""Benchmark: Qwen-Image-Edit edits (2509, or 2511 with --edit-model) through the project's editor, at full
size with random weights.

Issue 3 step 6. Builds the real (published) configurations with random weights, saves the pipeline
with `save_pretrained` and loads it back through the project's own code (resolve_model ->
load_pipeline -> QwenEditEditor), then edits one reference image at RESxRES:

- `default`    : --steps-default steps (40), true_cfg 4 (two transformer forwards a step);
- `lightning8` : a random Lightning-style LoRA (lightx2v keys), Lightning scheduler, 8 steps, cfg 1.

For each quantization (`nf4`, `bf16`) it records seconds per edit, the whole pipeline's peak GPU
memory (text encoder + transformer + VAE, model CPU offload included) and the transformer's time per
forward inside the pipeline (forward hooks). Side by side in the same run, the naive baseline of
shared/reference/full_size/gpu_probe.py (the transformer alone, from_pretrained on the GPU, one
no_grad forward with the same token layout) gives the figure to compare with:
ratio = baseline s/forward / pipeline s/forward (>= 1: no worse). Goal: nf4 whole-pipeline peak
<= 16 GiB.

    python benchmarks/qwen_edit_gpu.py                                   # GPU, full size, everything
    python benchmarks/qwen_edit_gpu.py --variants nf4 --steps-default 8  # a quicker GPU run
    python benchmarks/qwen_edit_gpu.py --edit-model qwen-image-edit-2511 --variants nf4   # 2511
    .venv/bin/python benchmarks/qwen_edit_gpu.py --scale tiny --variants bf16 --steps-default 2 --res 256

2511 differs from 2509 only in its transformer's config (zero_cond_t, no parameter of its own), so
its folder (`<workdir>-2511`) links every file of the 2509 build and holds its own config: the
weights are built and saved once.

Every result is printed as one JSON line as soon as it exists, and the JSON file
(<out>/qwen_edit_gpu-<gpu-name>.json, qwen_edit_gpu-2511-<gpu-name>.json for 2511, `-tiny` added at
tiny scale; a copy in $OUT when set and in the work folder) is rewritten after each measurement, so a run cut off by a time limit keeps
what it measured. The figures are meaningless as images (random weights) but the compute and the
memory are the real model's.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
LIGHTNING = "lightning-8step"  # the registry's 8-step Lightning LoRA of the release measured (registry.lora_for)
MARKER = ".flen-bench-complete"  # dot file: resolve_model's folder hash skips it
NF4_PEAK_GOAL_GIB = 16.0
PROMPT = "Turn the camera 45 degrees to the left"
BATCH_GOAL_S, BATCH_PEAK_GOAL_GIB, BATCH_SPEEDUP_GOAL = 4.5, 20.0, 2.8  # issue 15, item 1
# the batch's prompts, cycled: different lengths, as a recipe's entries have
PROMPTS = [PROMPT, "Turn the camera 45 degrees to the right", "Close-up of the face, soft window light from the left",
           "Replace the background with a sunny beach, keep the person unchanged"]
MODES = ("lightning8", "default")
VARIANTS = ("nf4", "bf16")
NOTES = [
    "edit_s: one whole edit (text encoding, VAE, offload moves, every step), synchronized",
    "peak_*_gib: torch.cuda peaks during that edit, whole pipeline (model CPU offload), reset before it",
    "transformer_forward_median_s: median of the transformer's forwards in that edit (CUDA events); "
    "the first forward includes the offload move of the transformer onto the GPU",
    "default mode runs 2 forwards a step (true_cfg > 1); lightning8 runs 1 with the LoRA active (unfused)",
    "baseline: gpu_probe.py's naive transformer-only forward, same token layout, no LoRA; "
    "ratio = baseline forward_s / pipeline forward_s (>= 1: no worse)",
]


# -- set-up ---------------------------------------------------------------------------------------
def ensure_project_importable() -> None:
    """Make `flen_resources` importable from this checkout when the project is not pip-installed
    (the GPU machine gets a copy of the tree, not the virtual environment)."""
    try:
        import flen_resources  # noqa: F401
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("flen_resources", REPO / "resources" / "__init__.py",
                                                  submodule_search_locations=[str(REPO / "resources")])
    module = importlib.util.module_from_spec(spec)
    sys.modules["flen_resources"] = module
    spec.loader.exec_module(module)


def csv_choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list whose items are all in `allowed`."""
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return items
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ensure_project_importable()
    from flen_resources.models.registry import DEFAULT_EDIT_MODEL, QWEN_EDIT_MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=["full", "tiny"], default="full",
                    help="architecture size; tiny runs the whole script on a CPU in a minute")
    ap.add_argument("--edit-model", choices=QWEN_EDIT_MODELS, default=DEFAULT_EDIT_MODEL,
                    help="the release measured; 2511's folder links the 2509 build's weights")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one), cuda, cpu")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the random (2509) pipeline is saved and reused (default /tmp/flen-qwen-<scale>)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the work folder even if it is complete")
    ap.add_argument("--build-only", action="store_true", help="build and save the pipeline, measure nothing")
    ap.add_argument("--shard-size", default="10GB", help="save_pretrained max_shard_size")
    ap.add_argument("--variants", type=csv_choices(VARIANTS), default=list(VARIANTS),
                    help="nf4,bf16 (nf4 needs CUDA: dropped on the CPU)")
    ap.add_argument("--modes", type=csv_choices(MODES), default=list(MODES), help="lightning8,default")
    ap.add_argument("--res", type=int, default=1024, help="output side in pixels (square edit)")
    ap.add_argument("--steps-default", type=int, default=40, help="steps of the default mode (the real one is 40)")
    ap.add_argument("--true-cfg", type=float, default=4.0, help="true_cfg of the default mode")
    ap.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up edit (default mode)")
    ap.add_argument("--image", choices=["astronaut", "noise"], default="astronaut", help="the reference image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-rank", type=int, default=16, help="rank of the random Lightning-style LoRA")
    ap.add_argument("--lora-scale", type=float, default=0.01,
                    help="std of its random factors (small: the LoRA must not blow up the activations)")
    ap.add_argument("--skip-baseline", action="store_true", help="no naive transformer-only baseline")
    ap.add_argument("--baseline-warmup", type=int, default=2, help="baseline forwards before timing")
    ap.add_argument("--baseline-reps", type=int, default=5, help="timed baseline forwards (median reported)")
    ap.add_argument("--baseline-text-tokens", type=int, default=256, help="text tokens of the baseline forward")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="folder of the JSON result")
    ap.add_argument("--batched", action="store_true",
                    help="issue 15: the per-edit loop of before (model CPU offload, one pipeline call per edit) "
                         "and edit_batch side by side, lightning8; writes qwen_edit_gpu-batched-<gpu>.json")
    ap.add_argument("--batch-edits", type=int, default=16, help="edits of the batch (--batched)")
    ap.add_argument("--loop-edits", type=int, default=16,
                    help="edits timed in the per-edit loop (the first ones of the batch; --batched; 0: no loop)")
    ap.add_argument("--memory-budget", type=float, default=None,
                    help="the editor's memory budget in GiB (--batched; default: the editor's own)")
    ap.add_argument("--merge", action="store_true",
                    help="keep results of variants not run now from the previous JSON (in --out, else the work folder)")
    args = ap.parse_args(argv)
    if args.workdir is None:
        args.workdir = Path(f"/tmp/flen-qwen-{args.scale}")
    args.workdir = args.workdir.expanduser().resolve()
    release = release_suffix(args.edit_model)
    # the pipeline folder measured: the build itself, or a release's folder beside it
    args.model_dir = args.workdir if not release else args.workdir.with_name(f"{args.workdir.name}-{release}")
    return args


def release_suffix(edit_model: str) -> str:
    """'' for the default release (its file names predate the option), else its date, e.g. '2511'."""
    from flen_resources.models.registry import DEFAULT_EDIT_MODEL

    return "" if edit_model == DEFAULT_EDIT_MODEL else edit_model.rsplit("-", 1)[-1]


def pick_device(arg: str) -> torch.device:
    """`auto`: CUDA when available, else the CPU."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if arg == "auto" else arg)


def is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def configure_backends(device: torch.device) -> None:
    """NO_CUDNN_SDP=1 disables cuDNN SDPA, as gpu_probe.py does (it hit illegal memory accesses there)."""
    if is_cuda(device) and os.environ.get("NO_CUDNN_SDP") == "1":
        torch.backends.cuda.enable_cudnn_sdp(False)
        emit({"event": "cudnn_sdp_disabled"})


def package_versions() -> dict[str, str | None]:
    """Versions of the packages the figures depend on (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in ("torch", "diffusers", "transformers", "bitsandbytes", "peft", "accelerate", "safetensors"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(device: torch.device) -> dict[str, Any]:
    """GPU name and memory (or the CPU), CUDA and the package versions."""
    info: dict[str, Any] = {"device": str(device), "gpu_name": None, "gpu_total_gib": None,
                            "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_total_gib=round(props.total_memory / GIB, 2))
    return {**info, "versions": package_versions()}


def slug(text: str) -> str:
    """`NVIDIA H100 80GB HBM3` -> `nvidia-h100-80gb-hbm3`."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def disk_free_gib(path: Path) -> float:
    """Free space of the file system that holds `path` (or its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return round(shutil.disk_usage(path).free / GIB, 1)


def emit(record: dict[str, Any]) -> None:
    """One JSON line on stdout, flushed (partial output survives a time limit)."""
    print(json.dumps(record, default=str), flush=True)


# -- GPU memory -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and give cached GPU blocks back."""
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if is_cuda(device):
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> dict[str, float | None]:
    """Peak allocated and reserved GiB since the last reset, and what is allocated now (None on the CPU)."""
    if not is_cuda(device):
        return {"peak_allocated_gib": None, "peak_reserved_gib": None, "allocated_now_gib": None}
    sync(device)
    return {"peak_allocated_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / GIB, 3),
            "allocated_now_gib": round(torch.cuda.memory_allocated(device) / GIB, 3)}


def failure(exc: BaseException) -> dict[str, Any]:
    """What a failed stage records instead of its figures."""
    oom = isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()
    return {"error": f"{type(exc).__name__}: {str(exc)[:500]}", "oom": oom,
            "traceback": traceback.format_exc(limit=6)[-2000:]}


# -- the report file ------------------------------------------------------------------------------
class Report:
    """The JSON result, rewritten (atomically) in every destination after each measurement."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        info = machine_info(device)
        name = slug(info["gpu_name"] or "cpu") + ("-tiny" if args.scale == "tiny" else "")
        release = release_suffix(args.edit_model)
        self.batched = args.batched
        prefix = "".join(f"{part}-" for part in ("batched" if args.batched else "", release) if part)
        self.filename = f"qwen_edit_gpu-{prefix}{name}.json"
        self.paths = [args.out / self.filename, args.model_dir.parent / f"{args.model_dir.name}-{self.filename}"]
        if os.environ.get("OUT"):
            self.paths.append(Path(os.environ["OUT"]) / self.filename)
        self.data: dict[str, Any] = {
            "benchmark": "qwen_edit_gpu", "issue": "3 step 6",
            "command": " ".join([sys.executable, *sys.argv]), "argv": sys.argv,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), **info,
            "edit_model": args.edit_model, "model_dir": str(args.model_dir), "scale": args.scale, "res": args.res, "steps_default": args.steps_default, "true_cfg": args.true_cfg,
            "lora_rank": args.lora_rank, "image": args.image, "workdir": str(args.workdir),
            "nf4_peak_goal_gib": NF4_PEAK_GOAL_GIB, "notes": NOTES, "build": None, "variants": {}, "summary": {},
        }
        if args.merge:
            self._merge_previous(args)

    def _merge_previous(self, args: argparse.Namespace) -> None:
        """Keep the variants of the newest previous file (in --out or beside the work folder; same GPU,
        scale and res) that are not run again now."""
        found = [p for p in self.paths[:2] if p.is_file()]
        if not found:
            return
        path = max(found, key=lambda p: p.stat().st_mtime)
        old = json.loads(path.read_text())
        same = (args.scale, args.res, self.data["gpu_name"], args.edit_model)
        if (old.get("scale"), old.get("res"), old.get("gpu_name"), old.get("edit_model", args.edit_model)) != same:
            emit({"event": "merge_skipped", "file": str(path), "reason": "other scale, res, GPU or release"})
            return
        kept = {k: v for k, v in old.get("variants", {}).items() if k not in args.variants}
        self.data["variants"].update(kept)
        self.data["merged_from"] = {"file": str(path), "command": old.get("command"), "variants": sorted(kept)}

    def variant(self, name: str) -> dict[str, Any]:
        return self.data["variants"].setdefault(name, {"modes": {}})

    def write(self) -> None:
        self.data["summary"] = summarize_batched(self.data) if self.batched else summarize(self.data["variants"])
        self.data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        text = json.dumps(self.data, indent=1, default=str)
        for path in self.paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text(text)
                tmp.replace(path)
            except OSError as exc:
                emit({"event": "write_failed", "path": str(path), "error": str(exc)})


def summarize(variants: dict[str, Any]) -> dict[str, Any]:
    """Per variant: ratio baseline/pipeline s per transformer forward for each mode, and the nf4 memory goal."""
    out: dict[str, Any] = {}
    for name, v in variants.items():
        base = (v.get("baseline") or {}).get("forward_s")
        row: dict[str, Any] = {"baseline_forward_s": base,
                               "load_peak_allocated_gib": (v.get("load") or {}).get("load_peak_allocated_gib")}
        peaks = []
        for mode, m in v.get("modes", {}).items():
            fwd = m.get("transformer_forward_median_s")
            row[f"{mode}_forward_s"] = fwd
            row[f"{mode}_ratio"] = round(base / fwd, 3) if base and fwd else None
            row[f"{mode}_no_worse"] = (base / fwd >= 1.0) if base and fwd else None
            row[f"{mode}_edit_s"] = m.get("edit_s")
            row[f"{mode}_peak_allocated_gib"] = m.get("peak_allocated_gib")
            if m.get("peak_allocated_gib") is not None:
                peaks.append(m["peak_allocated_gib"])
        row["peak_allocated_gib"] = max(peaks) if peaks else None
        if name == "nf4":
            row["peak_goal_met"] = (max(peaks) <= NF4_PEAK_GOAL_GIB) if peaks else None
        out[name] = row
    return out


def summarize_batched(data: dict[str, Any]) -> dict[str, Any]:
    """Per variant: seconds per edit of the loop and of the batch, the speed-up, the peak and the goals of issue 15."""
    out: dict[str, Any] = {}
    for name, v in data["variants"].items():
        loop, batch = v.get("loop") or {}, v.get("batch") or {}
        loop_s, batch_s = loop.get("edit_s_mean"), batch.get("edit_s_mean")
        peak = batch.get("peak_allocated_gib")
        row = {"loop_edit_s": loop_s, "batch_edit_s": batch_s, "loop_peak_allocated_gib": loop.get("peak_allocated_gib"),
               "batch_peak_allocated_gib": peak, "speedup": round(loop_s / batch_s, 2) if loop_s and batch_s else None,
               "pixels_max_abs_diff": (v.get("compare") or {}).get("max_abs_diff")}
        row["goals"] = {"edit_s_le_4_5": batch_s is not None and batch_s <= BATCH_GOAL_S,
                        "peak_le_20_gib": peak is not None and peak <= BATCH_PEAK_GOAL_GIB,
                        "speedup_ge_2_8": row["speedup"] is not None and row["speedup"] >= BATCH_SPEEDUP_GOAL}
        out[name] = row
    return out


# -- building the random full-size pipeline -------------------------------------------------------
def read_marker(workdir: Path) -> dict[str, Any] | None:
    marker = workdir / MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def build_pipeline_folder(workdir: Path, scale: str, device: torch.device, shard_size: str, seed: int) -> dict:
    """Build the components at `scale` (bf16, on `device`), save_pretrained them into `workdir`.

    Saves into `<workdir>.partial` first and renames it when complete, so a cut-off build is never
    taken for a finished one; frees the device memory before returning. Returns the timings.
    """
    from diffusers import QwenImageEditPlusPipeline

    from flen_resources.models.architectures import build_qwen_edit_components

    partial = workdir.with_name(workdir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    emit({"event": "build_start", "scale": scale, "device": str(device), "disk_free_gib": disk_free_gib(workdir)})
    t = time.perf_counter()
    components = build_qwen_edit_components(scale, seed=seed, dtype=torch.bfloat16, device=device)
    sync(device)
    params = {k: round(sum(p.numel() for p in m.parameters()) / 1e9, 3)
              for k, m in components.items() if isinstance(m, torch.nn.Module)}
    build_s = time.perf_counter() - t
    emit({"event": "built", "seconds": round(build_s, 1), "params_b": params, **memory(device)})
    t = time.perf_counter()
    pipe = QwenImageEditPlusPipeline(**components)
    pipe.save_pretrained(partial, safe_serialization=True, max_shard_size=shard_size)
    save_s = time.perf_counter() - t
    del pipe, components
    free_memory(device)
    size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
    marker = {"scale": scale, "seed": seed, "build_s": round(build_s, 1), "save_s": round(save_s, 1),
              "params_b": params, "size_gib": round(size / GIB, 2), "versions": package_versions()}
    (partial / MARKER).write_text(json.dumps(marker, indent=1))
    partial.rename(workdir)
    emit({"event": "saved", "seconds": round(save_s, 1), "size_gib": marker["size_gib"], "path": str(workdir),
          "disk_free_gib": disk_free_gib(workdir)})
    return marker


def ensure_pipeline_folder(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The saved random pipeline at `args.scale`: reused when complete, else built."""
    marker = read_marker(args.workdir)
    if marker is not None and args.rebuild:
        shutil.rmtree(args.workdir)
        marker = None
    if marker is not None:
        if marker.get("scale") != args.scale:
            raise SystemExit(f"{args.workdir} holds a {marker.get('scale')} pipeline; pass --rebuild or another --workdir")
        emit({"event": "reuse", "path": str(args.workdir), **marker})
        return {**marker, "reused": True}
    if args.workdir.exists():
        raise SystemExit(f"{args.workdir} exists but is not a complete benchmark folder (no {MARKER}); "
                         "remove it or choose another --workdir")
    args.workdir.parent.mkdir(parents=True, exist_ok=True)
    return {**build_pipeline_folder(args.workdir, args.scale, device, args.shard_size, args.seed), "reused": False}


def ensure_release_folder(args: argparse.Namespace) -> dict[str, Any] | None:
    """The folder of a release other than the build's: a link to every file of the build, but its own
    transformer config (the release's flags, registry.release_flags) and marker; made afresh each run."""
    from flen_resources.models.registry import release_flags

    if args.model_dir == args.workdir:
        return None
    shutil.rmtree(args.model_dir, ignore_errors=True)
    for src in args.workdir.rglob("*"):
        loose_lora = src.parent == args.workdir and src.suffix == ".safetensors"  # each release writes its own
        if src.is_file() and not src.is_symlink() and src.name != MARKER and not loose_lora:
            dest = args.model_dir / src.relative_to(args.workdir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.symlink_to(src)
    config_path = args.model_dir / "transformer" / "config.json"
    config = {**json.loads((args.workdir / "transformer" / "config.json").read_text()), **release_flags(args.edit_model)}
    config_path.unlink()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    marker = {**(read_marker(args.workdir) or {}), "edit_model": args.edit_model, "linked_from": str(args.workdir)}
    (args.model_dir / MARKER).write_text(json.dumps(marker, indent=1))
    record = {"event": "release_folder", "path": str(args.model_dir), "edit_model": args.edit_model,
              "transformer_flags": release_flags(args.edit_model)}
    emit(record)
    return record


def ensure_lightning_lora(workdir: Path, rank: int, scale: float, seed: int, name: str) -> Path:
    """A random Lightning-style LoRA (lightx2v keys, alpha = rank) for the saved transformer.

    Written from the saved config on the meta device (only the Linear shapes are needed, so no
    weights are loaded); rewritten when the rank or scale asked for differs from the file's.
    """
    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    from flen_resources.models.tiny_pack import _qwen_lora

    path = workdir / f"{name}.safetensors"
    wanted = {"rank": str(rank), "scale": str(scale), "seed": str(seed)}
    if path.is_file():
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        if all(meta.get(k) == v for k, v in wanted.items()):
            return path
    config = QwenImageTransformer2DModel.load_config(workdir / "transformer")
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(config)
    t = time.perf_counter()
    tensors = _qwen_lora(transformer, "lightx2v", rank, scale, seed=seed)
    save_file(tensors, str(path), metadata={"format": "pt", "flenwheel": "benchmark random Lightning LoRA", **wanted})
    emit({"event": "lora_written", "path": str(path), "rank": rank, "tensors": len(tensors),
          "params_m": round(sum(v.numel() for v in tensors.values() if v.dim() == 2) / 1e6, 2),
          "seconds": round(time.perf_counter() - t, 1)})
    return path


# -- the naive baseline (shared/reference/full_size/gpu_probe.py) ---------------------------------
def baseline_inputs(config: Any, res: int, text_tokens: int, device: torch.device) -> dict[str, Any]:
    """gpu_probe.py's qwen inputs: target + one reference image's tokens, `text_tokens` text tokens.

    The reference takes the pipeline's own size (VAE_IMAGE_SIZE, 1024x1024 for a square image), so
    the layout matches the pipeline's at any --res; at 1024 it is gpu_probe's 2 x (res/16)^2 tokens.
    """
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE

    side = res // 16
    ref_side = int(VAE_IMAGE_SIZE**0.5) // 16
    n = side * side + ref_side * ref_side
    dt = torch.bfloat16
    return dict(hidden_states=torch.randn(1, n, config.in_channels, device=device, dtype=dt),
                encoder_hidden_states=torch.randn(1, text_tokens, config.joint_attention_dim, device=device, dtype=dt),
                encoder_hidden_states_mask=torch.ones(1, text_tokens, device=device, dtype=torch.bool),
                timestep=torch.tensor([0.5], device=device, dtype=dt),
                img_shapes=[[(1, side, side), (1, ref_side, ref_side)]], return_dict=False)


def load_baseline_transformer(workdir: Path, variant: str, device: torch.device) -> Any:
    """The transformer alone, as gpu_probe.py loads it: nf4 through diffusers' BitsAndBytesConfig or bf16."""
    from diffusers import BitsAndBytesConfig, QwenImageTransformer2DModel

    kwargs: dict[str, Any] = {"torch_dtype": torch.bfloat16, "use_safetensors": True}
    if variant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
    if is_cuda(device):
        kwargs["device_map"] = str(device)
    model = QwenImageTransformer2DModel.from_pretrained(workdir / "transformer", **kwargs)
    if not is_cuda(device):
        model.to(device)
    return model.requires_grad_(False).eval()


def time_calls(fn: Callable[[], Any], warm: int, reps: int, device: torch.device) -> list[float]:
    """Seconds of `reps` calls of `fn` after `warm` untimed ones (synchronized around each)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def measure_baseline(args: argparse.Namespace, variant: str, device: torch.device) -> dict[str, Any]:
    """Median seconds per no_grad forward of the transformer alone, its weights and peak memory."""
    free_memory(device)
    reset_peak(device)
    t = time.perf_counter()
    model = load_baseline_transformer(args.model_dir, variant, device)
    load_s = time.perf_counter() - t
    weights = memory(device)["allocated_now_gib"]
    try:
        kwargs = baseline_inputs(model.config, args.res, args.baseline_text_tokens, device)
        reset_peak(device)
        with torch.no_grad():
            times = time_calls(lambda: model(**kwargs), args.baseline_warmup, args.baseline_reps, device)  # noqa: F821 (del in finally)
        peak = memory(device)
    finally:
        del model
        free_memory(device)
    return {"forward_s": round(statistics.median(times), 4), "forward_times_s": [round(x, 4) for x in times],
            "load_s": round(load_s, 1), "weights_gib": weights, "peak_allocated_gib": peak["peak_allocated_gib"],
            "peak_reserved_gib": peak["peak_reserved_gib"], "image_tokens": kwargs["hidden_states"].shape[1],
            "text_tokens": args.baseline_text_tokens}


# -- the project's editor ---------------------------------------------------------------------------
class ForwardTimer:
    """Times every forward of `module` (CUDA events on a GPU, perf_counter on the CPU) and records
    the token layouts it sees. Model CPU offload moves the module inside its forward, so the first
    forward of an edit includes that move: the median leaves it out."""

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.module, self.device = module, device
        self.marks: list[tuple[Any, Any]] = []
        self.layouts: list[tuple[int, int]] = []  # distinct (image tokens, text tokens) seen
        self._handles: list[Any] = []

    def _now(self) -> Any:
        if is_cuda(self.device):
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _pre(self, _module: Any, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        text = kwargs.get("encoder_hidden_states")
        if hidden is not None and text is not None:
            layout = (int(hidden.shape[1]), int(text.shape[1]))
            if layout not in self.layouts:
                self.layouts.append(layout)
        self.marks.append((self._now(), None))

    def _post(self, _module: Any, _args: tuple, _kwargs: dict, _output: Any) -> None:
        start, _ = self.marks[-1]
        self.marks[-1] = (start, self._now())

    def __enter__(self) -> ForwardTimer:
        self._handles = [self.module.register_forward_pre_hook(self._pre, with_kwargs=True),
                         self.module.register_forward_hook(self._post, with_kwargs=True)]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()

    def seconds(self) -> list[float]:
        """Seconds of each completed forward."""
        sync(self.device)
        if is_cuda(self.device):
            return [start.elapsed_time(end) / 1000 for start, end in self.marks if end is not None]
        return [end - start for start, end in self.marks if end is not None]


def reference_image(kind: str, res: int, seed: int) -> Any:
    """One RGB reference image of res x res: skimage's astronaut photo, or uniform noise."""
    import numpy as np
    from PIL import Image

    if kind == "astronaut":
        from skimage import data

        return Image.fromarray(data.astronaut()).convert("RGB").resize((res, res), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8), "RGB")


def request_for(mode: str, steps_default: int, true_cfg: float, seed: int, lora: str) -> Any:
    """The EditRequest of a mode: the Lightning LoRA `lora` in the stack, or the default steps and true_cfg."""
    from flen_resources.editors.base import EditRequest

    params = {"loras": {lora: 1.0}} if mode == "lightning8" else {"steps": steps_default, "true_cfg": true_cfg}
    return EditRequest(recipe_id=f"bench-{mode}", operation="qwen_edit", params=params, prompt=PROMPT, seed=seed)


def load_editor(args: argparse.Namespace, variant: str, lora: Path, device: torch.device) -> tuple[Any, dict]:
    """QwenEditEditor over the saved folder, its pipeline loaded (timed), and the LoRA loaded (timed)
    when lightning8 is measured (then the default mode runs with it loaded but disabled, as in use)."""
    from flen_resources.editors.qwen_edit import QwenEditEditor

    editor = QwenEditEditor(model=str(args.model_dir), quantization="nf4" if variant == "nf4" else "none",
                            device=str(device), dtype="bf16", loras={lora.stem: str(lora)},
                            output_area=args.res * args.res, default_steps=args.steps_default,
                            default_true_cfg=args.true_cfg, model_key=args.edit_model)
    free_memory(device)
    reset_peak(device)
    t = time.perf_counter()
    _ = editor.pipe  # resolve_model + load_pipeline (+ model CPU offload on CUDA)
    sync(device)
    load_s = time.perf_counter() - t
    stats = {"load_s": round(load_s, 1), **{f"load_{k}": v for k, v in memory(device).items()}}
    stats["lora_loaded"] = "lightning8" in args.modes
    if stats["lora_loaded"]:
        t = time.perf_counter()
        editor._lora(lora.stem)  # load the LoRA now so that no edit times its loading
        stats["lora_load_s"] = round(time.perf_counter() - t, 1)
    return editor, stats


def timed_edit(editor: Any, image: Any, request: Any, device: torch.device) -> dict[str, Any]:
    """One edit, synchronized: seconds, whole-pipeline peak memory and the transformer's forwards."""
    free_memory(device)
    reset_peak(device)
    with ForwardTimer(editor.pipe.transformer, device) as timer:
        sync(device)
        t = time.perf_counter()
        result = editor.edit([image], request)
        sync(device)
        edit_s = time.perf_counter() - t
    forwards = timer.seconds()
    return {"edit_s": round(edit_s, 3), "steps": result.params["steps"], "true_cfg": result.params["true_cfg"],
            "scheduler": result.params["scheduler"], "width": result.params["width"],
            "height": result.params["height"], **memory(device),
            "transformer_forwards": len(forwards),
            "transformer_forward_median_s": round(statistics.median(forwards), 4) if forwards else None,
            "transformer_forward_first_s": round(forwards[0], 4) if forwards else None,
            "transformer_total_s": round(sum(forwards), 3),
            "outside_transformer_s": round(edit_s - sum(forwards), 3),
            # [image tokens, text tokens] of each distinct forward (true_cfg > 1: prompt, then negative prompt)
            "token_layouts": [list(layout) for layout in timer.layouts]}


# -- one variant --------------------------------------------------------------------------------------
def run_stage(name: str, fn: Callable[[], dict], record: dict[str, Any], key: str, report: Report,
              device: torch.device, tags: dict[str, Any]) -> dict | None:
    """Run one measurement; store its figures (or its error, OOM included) under record[key], print and save."""
    try:
        result = fn()
    except Exception as exc:  # an OOM or a failure of one stage must not lose the others
        result = None
        record[key] = failure(exc)
        free_memory(device)
        emit({"stage": name, **tags, **{k: v for k, v in record[key].items() if k != "traceback"}})
    else:
        record[key] = result
        emit({"stage": name, **tags, **result})
    report.write()
    return result


def run_variant(args: argparse.Namespace, variant: str, lora: Path, image: Any, device: torch.device,
                report: Report) -> None:
    """Baseline, then the editor: load, warm-up edit, one timed edit per mode; memory freed at the end."""
    record = report.variant(variant)
    record["modes"] = {}
    tags = {"variant": variant}
    if not args.skip_baseline:
        run_stage("baseline", lambda: measure_baseline(args, variant, device), record, "baseline", report, device, tags)
    holder: dict[str, Any] = {}

    def load() -> dict:
        holder["editor"], stats = load_editor(args, variant, lora, device)
        warm = request_for("default", args.warmup_steps, args.true_cfg, args.seed, lora.stem)
        stats["warmup_s"] = timed_edit(holder["editor"], image, warm, device)["edit_s"]
        return stats

    try:
        if run_stage("load", load, record, "load", report, device, tags) is None:
            return
        for mode in args.modes:
            request = request_for(mode, args.steps_default, args.true_cfg, args.seed, lora.stem)
            run_stage("edit", lambda: timed_edit(holder["editor"], image, request, device), record["modes"], mode,
                      report, device, {**tags, "mode": mode})
    finally:
        holder.clear()
        free_memory(device)


# -- issue 15: the per-edit loop of before and edit_batch, side by side ------------------------------
def batch_jobs(args: argparse.Namespace, image: Any, lora: str) -> list[Any]:
    """--batch-edits lightning8 edits of the reference: the prompts cycled, one seed each."""
    import dataclasses

    from flen_resources.editors.base import EditJob

    base = request_for("lightning8", args.steps_default, args.true_cfg, args.seed, lora)
    return [EditJob([image], dataclasses.replace(base, prompt=PROMPTS[i % len(PROMPTS)], seed=args.seed + i))
            for i in range(args.batch_edits)]


def loop_editor(args: argparse.Namespace, variant: str, lora: Path) -> Any:
    """The editor as it was before batching: model CPU offload on a GPU (one component on the card at a time,
    moved for every edit) and one whole pipeline call per edit."""
    from flen_resources.editors.qwen_edit import QwenEditEditor
    from flen_resources.models.pipelines import load_pipeline

    class LoopEditor(QwenEditEditor):
        @property
        def pipe(self) -> Any:
            if self._pipe is None:
                self._pipe = load_pipeline(self.resolved, "QwenImageEditPlusPipeline", quantization=self.quantization,
                                           device=self.device, dtype=self.dtype, offload="auto")
                self._base_scheduler = dict(self._pipe.scheduler.config)
            return self._pipe

        def loop_edit(self, job: Any) -> Any:
            plan = self._plan(job)
            self._apply_stack(plan.stack)
            return self.pipe(image=plan.inputs[0], prompt=job.request.prompt, negative_prompt=None,
                             true_cfg_scale=plan.true_cfg, num_inference_steps=plan.steps, width=plan.width,
                             height=plan.height, generator=torch.Generator("cpu").manual_seed(job.request.seed)).images[0]

    return LoopEditor(model=str(args.model_dir), quantization="nf4" if variant == "nf4" else "none", device=args.device,
                      dtype="bf16", loras={lora.stem: str(lora)}, output_area=args.res * args.res,
                      model_key=args.edit_model)


def measure_loop(args: argparse.Namespace, variant: str, lora: Path, jobs: list[Any], device: torch.device,
                 images: list[Any]) -> dict[str, Any]:
    """The per-edit loop over the first --loop-edits jobs: load, one warm-up edit, then each edit timed."""
    editor = loop_editor(args, variant, lora)
    try:
        t = time.perf_counter()
        _ = editor.pipe
        editor._lora(lora.stem)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        editor.loop_edit(jobs[0])
        warm_s = time.perf_counter() - t
        free_memory(device)
        reset_peak(device)
        times = []
        for job in jobs[: args.loop_edits]:
            sync(device)
            t = time.perf_counter()
            images.append(editor.loop_edit(job))
            sync(device)
            times.append(time.perf_counter() - t)
        return {"edits": len(times), "load_s": round(load_s, 1), "warmup_s": round(warm_s, 1),
                "edit_s_mean": round(statistics.mean(times), 3), "edit_s": [round(x, 2) for x in times],
                **memory(device)}
    finally:
        del editor
        free_memory(device)


def measure_batch(args: argparse.Namespace, variant: str, lora: Path, jobs: list[Any], device: torch.device,
                  images: list[Any]) -> dict[str, Any]:
    """edit_batch over every job: load, a warm-up edit, every component parked, then the whole batch timed
    (moving the components onto the card included), with when each phase began."""
    from flen_resources.editors.qwen_edit import QwenEditEditor

    budget = {} if args.memory_budget is None else {"memory_budget_gib": args.memory_budget}
    editor = QwenEditEditor(model=str(args.model_dir), quantization="nf4" if variant == "nf4" else "none",
                            device=args.device, dtype="bf16", loras={lora.stem: str(lora)},
                            output_area=args.res * args.res, model_key=args.edit_model, **budget)
    try:
        t = time.perf_counter()
        place = editor.residency  # loads the pipeline
        editor._lora(lora.stem)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        editor.edit_batch(jobs[:1])
        warm_s = time.perf_counter() - t
        place.park_all()  # the batch starts as a partition does: nothing on the card
        free_memory(device)
        phases: list[dict[str, Any]] = []
        use = place.use

        def timed_use(*names: str) -> None:
            sync(device)
            phases.append({"at_s": round(time.perf_counter() - start, 2), "use": list(names)})
            use(*names)
            sync(device)
            phases[-1].update(moved_s=round(time.perf_counter() - start - phases[-1]["at_s"], 2),
                              resident=sorted(place.resident))

        place.use = timed_use
        reset_peak(device)
        moves = place.moves
        with ForwardTimer(editor.pipe.transformer, device) as timer:
            sync(device)
            start = time.perf_counter()
            results = editor.edit_batch(jobs)
            sync(device)
            total = time.perf_counter() - start
        forwards = timer.seconds()
        images.extend(r.image for r in results)
        return {"edits": len(results), "load_s": round(load_s, 1), "warmup_s": round(warm_s, 1),
                "memory_budget_gib": editor.memory_budget_gib, "total_s": round(total, 2),
                "edit_s_mean": round(total / len(results), 3), "phases": phases, "moves": place.moves - moves,
                "component_gib": {k: round(v / GIB, 2) for k, v in place.sizes.items()},
                "transformer_forwards": len(forwards), "transformer_total_s": round(sum(forwards), 2),
                "transformer_forward_median_s": round(statistics.median(forwards), 4) if forwards else None,
                **memory(device)}
    finally:
        del editor
        free_memory(device)


def compare_images(loop: list[Any], batch: list[Any]) -> dict[str, Any]:
    """Pixel differences (0-255) between the loop's and the batch's outputs of the same requests."""
    import numpy as np

    diffs = [np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)) for a, b in zip(loop, batch)]
    return {"pairs": len(diffs), "max_abs_diff": int(max(d.max() for d in diffs)) if diffs else None,
            "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 4) if diffs else None,
            "identical": sum(int(d.max() == 0) for d in diffs)}


def run_batched(args: argparse.Namespace, variant: str, lora: Path, image: Any, device: torch.device,
                report: Report) -> None:
    """The loop, then the batch, then the pixel comparison, each stage recorded as it ends."""
    record = report.variant(variant)
    tags = {"variant": variant, "batched": True}
    jobs = batch_jobs(args, image, lora.stem)
    loop_images: list[Any] = []
    batch_images: list[Any] = []
    if args.loop_edits:
        run_stage("loop", lambda: measure_loop(args, variant, lora, jobs, device, loop_images), record, "loop",
                  report, device, tags)
    run_stage("batch", lambda: measure_batch(args, variant, lora, jobs, device, batch_images), record, "batch",
              report, device, tags)
    run_stage("compare", lambda: compare_images(loop_images, batch_images), record, "compare", report, device, tags)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_project_importable()
    from flen_resources.models.architectures import patch_qwen2vl_processor_without_torchvision

    patch_qwen2vl_processor_without_torchvision()
    device = pick_device(args.device)
    configure_backends(device)
    skipped = {}
    if not is_cuda(device) and "nf4" in args.variants:
        args.variants = [v for v in args.variants if v != "nf4"]
        skipped["nf4"] = "nf4 (bitsandbytes) needs CUDA"
        emit({"event": "skip", "variant": "nf4", "reason": skipped["nf4"]})
    report = Report(args, device)
    report.data["skipped_variants"] = skipped
    emit({"event": "start", "command": report.data["command"], "gpu_name": report.data["gpu_name"],
          "gpu_total_gib": report.data["gpu_total_gib"], "versions": report.data["versions"],
          "disk_free_gib": disk_free_gib(args.workdir), "results": [str(p) for p in report.paths]})
    report.data["build"] = ensure_pipeline_folder(args, device)
    report.data["release_folder"] = ensure_release_folder(args)
    from flen_resources.models.registry import lora_for

    lora = ensure_lightning_lora(args.model_dir, args.lora_rank, args.lora_scale, args.seed + 2,
                                 lora_for(LIGHTNING, args.edit_model))
    report.write()
    if args.build_only:
        return 0
    image = reference_image(args.image, args.res, args.seed)
    for variant in args.variants:
        if args.batched:
            run_batched(args, variant, lora, image, device, report)
        else:
            run_variant(args, variant, lora, image, device, report)
    report.write()
    emit({"event": "summary", **report.data["summary"]})
    emit({"event": "done", "results": [str(p) for p in report.paths]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
