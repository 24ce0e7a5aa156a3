"""Benchmark: one FLUX.1-dev LoRA training step at full size (random weights), the project's trainer
against the naive diffusers + peft loop of shared/reference/full_size/gpu_probe.py, side by side.

Inputs are what the trainer's cache holds (1024x1024 latents, 512 T5 tokens, pooled CLIP), drawn
at random: compute and memory are the real model's. Every variant runs in its own process (a crash
or OOM is recorded, the rest go on) on the same saved nf4-quantizable transformer.

    python benchmarks/train_gpu.py                       # build, then every variant
    python benchmarks/train_gpu.py --variants naive,ours # a subset

Variants:
  naive          gpu_probe: nf4 transformer, peft LoRA r16 on attention, gradient checkpointing, torch AdamW
  ours           FluxLoraTrainer's transformer + loss (fp32 LoRA weights, logit-normal timesteps), 8-bit AdamW
  ours-compile   + torch.compile of every transformer block
  ours-compile-cudnn + cuDNN SDPA (fastest attention on Hopper; its backward crashes on FLUX at 1024 with
                 torch 2.11: every other variant turns it off)
MFU = model FLOPs of a step (forward + input-gradient backward of every Linear, attention forward x3;
recomputation not counted) / step time / the card's measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["naive", "ours", "ours-compile"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def importable() -> None:
    """Import flen_resources from this checkout when the project is not pip-installed (GPU machine)."""
    try:
        import flen_resources  # noqa: F401
    except ImportError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("flen_resources", REPO / "resources" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "resources")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["flen_resources"] = module
        spec.loader.exec_module(module)


def build(workdir: Path) -> dict:
    """Save a full-size random FLUX transformer (bf16) with save_pretrained, once."""
    import torch

    importable()
    from flen_resources.models.architectures import FLUX_TRANSFORMER
    from diffusers import FluxTransformer2DModel

    marker = workdir / "transformer" / "config.json"
    if marker.is_file():
        return {"event": "reuse", "path": str(workdir)}
    started = time.time()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = FluxTransformer2DModel(**FLUX_TRANSFORMER["full"])
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(workdir / "transformer"), max_shard_size="5GB")
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    return {"event": "built", "params_b": round(params / 1e9, 2), "seconds": round(time.time() - started, 1)}


def matmul_peak_tflops() -> float:
    """Measured bf16 matmul throughput of this card (8192^3, median of 10)."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def model_flops(model, image_tokens: int, text_tokens: int) -> float:
    """FLOPs of one training step, recomputation excluded (see module docstring)."""
    import torch

    linear = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            tokens = text_tokens if any(k in name for k in ("add_", "to_add_out", "ff_context", "norm1_context",
                                                            "context_embedder")) else image_tokens
            if name.startswith("single_transformer_blocks"):
                tokens = image_tokens + text_tokens
            if any(k in name for k in ("time_text_embed", "norm", "x_embedder")) and "norm1" not in name:
                tokens = image_tokens if "x_embedder" in name else 1
            linear += 2 * tokens * module.in_features * module.out_features
    cfg = model.config
    heads, dim = cfg.num_attention_heads, cfg.attention_head_dim
    t = image_tokens + text_tokens
    attention = 4 * heads * dim * t * t * (cfg.num_layers + cfg.num_single_layers)
    return 2 * linear + 3 * attention


def run_variant(variant: str, workdir: Path, reps: int, warmup: int) -> dict:
    """One variant in this process: load, add LoRA, time `reps` optimizer steps, peak memory."""
    import torch

    importable()
    if variant.endswith("cudnn"):
        torch.backends.cuda.enable_cudnn_sdp(True)
        torch.backends.cuda.enable_flash_sdp(False)
        torch.backends.cuda.enable_mem_efficient_sdp(False)
    else:  # cuDNN SDPA's backward hits "illegal memory access" on FLUX at 1024 (seen here, torch 2.11)
        torch.backends.cuda.enable_cudnn_sdp(False)
    device, dtype = torch.device("cuda"), torch.bfloat16
    image_tokens, text_tokens = (1024 // 16) ** 2, 512
    started = time.time()
    torch.cuda.reset_peak_memory_stats()
    if variant == "naive":
        from diffusers import BitsAndBytesConfig, FluxTransformer2DModel
        from peft import LoraConfig

        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = FluxTransformer2DModel.from_pretrained(str(workdir / "transformer"), quantization_config=q,
                                                       torch_dtype=dtype, device_map="cuda")
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        model.enable_gradient_checkpointing()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        kw = dict(hidden_states=torch.randn(1, image_tokens, 64, device=device, dtype=dtype),
                  encoder_hidden_states=torch.randn(1, text_tokens, 4096, device=device, dtype=dtype),
                  pooled_projections=torch.randn(1, 768, device=device, dtype=dtype),
                  timestep=torch.tensor([0.5], device=device, dtype=dtype),
                  img_ids=torch.zeros(image_tokens, 3, device=device), txt_ids=torch.zeros(text_tokens, 3, device=device),
                  guidance=torch.tensor([3.5], device=device, dtype=dtype), return_dict=False)
        target = torch.randn(1, image_tokens, 64, device=device, dtype=dtype)

        def step(i: int) -> None:
            pred = model(**kw)[0]
            loss = torch.nn.functional.mse_loss(pred.float(), target.float())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        from flen_resources.models.sources import ResolvedModel
        from flen_resources.trainers.common import LoraTrainConfig, make_optimizer, step_generator
        from flen_resources.trainers.flux_lora import FluxLoraTrainer

        config = LoraTrainConfig(rank=16, alpha=16, quantization="nf4", optimizer="adamw8bit", resolution=1024,
                                 compile=variant.startswith("ours-compile"), device="cuda")
        resolved = ResolvedModel("flux.1-dev", str(workdir), "folder", workdir, "random-full", "0")
        trainer = FluxLoraTrainer(model=str(workdir), work_dir=workdir / "run", log=lambda m: None)
        model = trainer._transformer(resolved, config, device, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = make_optimizer(params, config, device)
        g = torch.Generator().manual_seed(0)
        example = {"latents": torch.randn(16, 128, 128, generator=g), "prompt_embeds": torch.randn(512, 4096, generator=g),
                   "pooled": torch.randn(768, generator=g), "bucket": (1024, 1024)}

        def step(i: int) -> None:
            loss = trainer._loss(model, [example], step_generator(0, i), config, device, dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    load_s = time.time() - started
    weights_gib = torch.cuda.memory_allocated() / 2**30
    warm_started = time.time()
    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    warmup_s = time.time() - warm_started
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step(warmup + i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"variant": variant, "step_s": round(statistics.median(times), 4), "step_times_s": [round(x, 4) for x in times],
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3),
            "weights_gib": round(weights_gib, 3), "load_s": round(load_s, 1), "warmup_s": round(warmup_s, 1),
            "lora_params_m": round(sum(p.numel() for p in params) / 1e6, 2),
            "model_flops": model_flops(model, image_tokens, text_tokens)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/flen-flux-full"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(run_variant(args.one, args.workdir, args.reps, args.warmup)), flush=True)
        return 0
    import torch

    gpu = torch.cuda.get_device_name(0)
    report = {"benchmark": "flux_lora_train_step", "command": " ".join([sys.executable, *sys.argv]), "gpu": gpu,
              "torch": torch.__version__, "setup": "1024x1024 (4096 image + 512 text tokens), batch 1, LoRA r16 on "
              "attention projections, nf4 base, gradient checkpointing", "results": []}
    print(json.dumps(build(args.workdir)), flush=True)
    report["matmul_peak_tflops"] = round(matmul_peak_tflops(), 1)
    print(json.dumps({"matmul_peak_tflops": report["matmul_peak_tflops"]}), flush=True)
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    out_files = [args.out / f"train_gpu-{slug}.json"] + ([Path(os.environ["OUT"]) / f"train_gpu-{slug}.json"]
                                                       if os.environ.get("OUT") else [])
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", variant, "--workdir", str(args.workdir),
                               "--reps", str(args.reps), "--warmup", str(args.warmup)],
                              capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"variant": variant, "error": (proc.stderr or proc.stdout)[-1500:]}
        if "step_s" in result:
            result["tflops"] = round(result["model_flops"] / result["step_s"] / 1e12, 1)
            result["mfu"] = round(result["tflops"] / report["matmul_peak_tflops"], 3)
        report["results"].append(result)
        base = next((r for r in report["results"] if r["variant"] == "naive" and "step_s" in r), None)
        if base and "step_s" in result:
            result["speedup_vs_naive"] = round(base["step_s"] / result["step_s"], 3)
            result["peak_vs_naive_gib"] = round(result["peak_allocated_gib"] - base["peak_allocated_gib"], 3)
        print(json.dumps(result), flush=True)
        for path in out_files:
            path.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
