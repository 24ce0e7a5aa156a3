"""Benchmark: the two kernels a LoRA step spends its time on outside the big matmuls, at full size,
to choose the trainers' defaults: attention forward + backward per SDPA kernel, and the optimizer
step over a FLUX LoRA's 532 tensors (rank 16) per optimizer.

Attention: one layer's joint attention, bf16, FLUX (4608 tokens) and Qwen-Image-Edit (8448 tokens:
256 text + 1024^2 target + one 1024^2 control), 24 heads of 128. q/k/v arrive as the diffusers
processors make them, (batch, seq, heads, dim); "permuted" hands SDPA the permuted views (the
default `native` path), "contiguous" copies them to (batch, heads, seq, dim) first (diffusers'
`_native_cudnn` backend). Every case runs in its own process: a kernel fault is recorded, not fatal.

    python benchmarks/kernels_gpu.py            # prints figures, writes benchmarks/results/kernels_gpu-<gpu>.json
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
SEQ = {"flux": 4608, "qwen-edit": 8448}
ATTENTION = [(model, kernel, layout) for model in SEQ for kernel, layout in
             [("flash", "permuted"), ("cudnn", "permuted"), ("cudnn", "contiguous"), ("efficient", "permuted")]]
OPTIMIZERS = ["adamw8bit", "adamw-foreach", "adamw-fused"]


def timed(fn, reps: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() on the GPU."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_case(model: str, kernel: str, layout: str) -> dict:
    """Forward and forward + backward of one attention layer with one SDPA kernel."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]
    seq, heads, dim = SEQ[model], 24, 128
    qkv = [torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    grad = torch.randn(1, seq, heads, dim, device="cuda", dtype=torch.bfloat16)

    def forward():
        q, k, v = (x.permute(0, 2, 1, 3) for x in qkv)
        if layout == "contiguous":
            q, k, v = (x.contiguous() for x in (q, k, v))
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3)

    def forward_backward():
        forward().backward(grad)

    with torch.no_grad():
        fwd = timed(forward)
    both = timed(forward_backward)
    # check the gradient against the math kernel in fp32 (a wrong kernel is worse than a slow one)
    for x in qkv:
        x.grad = None
    forward_backward()
    got = [x.grad.float() for x in qkv]
    ref_in = [x.detach().float().requires_grad_() for x in qkv]
    q, k, v = (x.permute(0, 2, 1, 3) for x in ref_in)
    with sdpa_kernel(SDPBackend.MATH):
        F.scaled_dot_product_attention(q, k, v).permute(0, 2, 1, 3).backward(grad.float())
    err = max(float((g - r.grad).abs().max() / r.grad.abs().max()) for g, r in zip(got, ref_in))
    flops = 4 * heads * dim * seq * seq
    return {"model": model, "kernel": kernel, "layout": layout, "seq": seq, "forward_ms": round(fwd * 1e3, 3),
            "forward_backward_ms": round(both * 1e3, 3), "forward_tflops": round(flops / fwd / 1e12, 1),
            "backward_tflops": round(2.5 * flops / (both - fwd) / 1e12, 1), "grad_rel_err_vs_fp32": round(err, 5)}


def lora_shapes() -> list[tuple[int, int]]:
    """FLUX.1-dev's LoRA tensors at rank 16 on the trainers' default targets."""
    double, single, dim, rank = 19, 38, 3072, 16
    return [(rank, dim), (dim, rank)] * (double * 8 + single * 3)


def optimizer_case(name: str) -> dict:
    """One optimizer step (with grad-norm clipping, as the trainers do) over fp32 LoRA tensors."""
    import torch

    params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.01) for s in lora_shapes()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    if name == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(params, lr=1e-4, weight_decay=1e-4)
    else:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, foreach=name == "adamw-foreach",
                                fused=name == "adamw-fused")
    before = torch.cuda.memory_allocated()
    opt.step()
    state_mib = (torch.cuda.memory_allocated() - before) / 2**20

    def clip_and_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    return {"optimizer": name, "tensors": len(params), "params_m": round(sum(p.numel() for p in params) / 1e6, 2),
            "state_mib": round(state_mib, 1), "step_ms": round(timed(opt.step) * 1e3, 3),
            "clip_ms": round(timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0)) * 1e3, 3),
            "clip_and_step_ms": round(timed(clip_and_step) * 1e3, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case as JSON
    args = ap.parse_args()
    if args.one:
        kind, *rest = args.one.split(":")
        result = attention_case(*rest) if kind == "attention" else optimizer_case(*rest)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    import torch

    gpu = torch.cuda.get_device_name(0)
    report = {"benchmark": "kernels", "command": " ".join([sys.executable, *sys.argv]), "gpu": gpu,
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "attention": [], "optimizer": []}
    cases = [("attention", ":".join(c)) for c in ATTENTION] + [("optimizer", o) for o in OPTIMIZERS]
    for kind, case in cases:
        proc = subprocess.run([sys.executable, __file__, "--one", f"{kind}:{case}"], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        result = json.loads(line[7:]) if line else {"case": case, "error": (proc.stderr or proc.stdout)[-800:]}
        report[kind].append(result)
        print(json.dumps(result), flush=True)
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    for folder in [args.out] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        (folder / f"kernels_gpu-{slug}.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
