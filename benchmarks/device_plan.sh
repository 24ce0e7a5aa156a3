#!/bin/bash
# Issue 15's GPU measurements in device calls of at most 10 minutes (the device tool's `run`), on one H200:
#   run: bash benchmarks/device_plan.sh       carry: [".mgpu-run"]   (the wheels, see benchmarks/README.md)
# Steps run in order, each once per machine (markers in /tmp/plan) and only when the time left in this call
# (LIMIT seconds) covers what it needs; send the same command again to go on. STEPS=a,b runs only those.
# Logs and results come back in $OUT/results.tgz; copy the JSON into benchmarks/results/.
T0=$(date +%s); LIMIT=${LIMIT:-580}
R=/tmp/flen-results; L=/tmp/plan-logs; mkdir -p /tmp/plan $R $L "$OUT"
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
say() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .mgpu-run/whl-slim/*.whl .mgpu-run/whl-test/*.whl || exit 1
fi
mkdir -p /tmp/shim && ln -sfn "$PWD/resources" /tmp/shim/flen_resources
export PYTHONPATH=/tmp/site:/tmp/shim PYTHONUNBUFFERED=1
for f in benchmarks/results/iteration_gpu-nvidia-h200.json; do [ -f "$f" ] && [ ! -f "$R/${f##*/}" ] && cp "$f" "$R/"; done
step() {  # name, seconds it needs at least, command...
  local name=$1 need=$2; shift 2
  [ -f /tmp/plan/$name ] && return 0
  [ -n "$STEPS" ] && [[ ",$STEPS," != *",$name,"* ]] && return 0
  if [ "$(left)" -lt "$need" ]; then say "stop before $name: $(left) s left, it needs $need"; finish; exit 0; fi
  say "start $name"; timeout $(( $(left) - 8 )) "$@" >$L/$name.log 2>&1; local rc=$?
  echo $rc >/tmp/plan/$name; say "end $name rc=$rc"; tail -c 1500 $L/$name.log; echo
}
finish() { nvidia-smi --query-gpu=name,memory.used --format=csv,noheader; df -h /tmp | tail -1
  tar czf "$OUT/results.tgz" -C /tmp flen-results plan-logs plan; say "packed"; }
B="python3 benchmarks"
COMMON="--scale full --device cuda --res 1024 --workdir /tmp/flen-rehearsal"
PT="python3 -m pytest -c /dev/null -p no:cacheprovider -m gpu -v"
mkdir -p /tmp/gputests && cp tests/resources/models/test_fp8_linear.py tests/resources/trainers/test_trainers_gpu.py \
  tests/resources/generators/test_flux.py /tmp/gputests/
# The most wanted first (STEPS picks; each session sends what its device minutes allow):
# - FLUX: lora_eval's grid through the fp8 generator (flux_eval; the LoRA it loads is a 2-step rehearsal run), the
#   step with fp8 `auto` (the LoRA's matmuls in bf16) interleaved with the naive loop, the nf4 path and the LoRA in
#   fp32 (-lora32) when there is time, the whole FLUX LoRA asset (flux_lora);
# - Qwen: its step with expandable segments (the card peak of the adapter: is reserved-over-allocated slack?), the
#   adapter asset, the enrichment. The GPU tests (tiny pack) before the Qwen build.
step build_flux 100 $B/rehearsal_gpu.py --phase build_flux $COMMON
step flux_eval 300 $B/iteration_gpu.py --only lora_eval --out $R
step train_flux 280 $B/train_gpu.py --model flux --workdir /tmp/flen-rehearsal/flux --out $R --tag bf16-lora \
  --variants naive,ours-compile-fp8,naive,ours-compile-fp8
# trials for the fp8 step's 2.0x (0.420 s against 0.761 in session 12): no whole-block checkpoints, torch's activation
# memory budget choosing what the compiled blocks recompute (attention and matmul outputs saved first)
step flux_trials 420 $B/train_gpu.py --model flux --workdir /tmp/flen-rehearsal/flux --out $R --tag memory-budget \
  --variants naive,ours-compile-fp8,ours-compile-fp8-keep57-mbudget0.2,ours-compile-fp8-keep57-mbudget0.35,naive,ours-compile-fp8
step train_flux_more 300 $B/train_gpu.py --model flux --workdir /tmp/flen-rehearsal/flux --out $R --tag bf16-lora-more \
  --variants naive,ours-compile,ours-compile-fp8-lora32
step flux_lora 400 $B/iteration_gpu.py --only flux_lora --out $R
step synthetic 300 $B/iteration_gpu.py --only synthetic_batch --out $R
step pytest_gpu 200 $PT /tmp/gputests/test_fp8_linear.py /tmp/gputests/test_flux.py /tmp/gputests/test_trainers_gpu.py
# 64 GiB of disk: one chain's models at a time
step build_qwen 150 bash -c "rm -rf /tmp/flen-rehearsal/flux && $B/rehearsal_gpu.py --phase build_qwen $COMMON"
step train_qwen 150 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $B/train_gpu.py --model qwen-edit \
  --workdir /tmp/flen-rehearsal/qwen --out $R --tag bf16-lora-expandable --variants naive,ours-compile
# a trial for the adapter's 16 GiB: nf4 with double quantization (its absmax in 8 bits), and the step's profile
step qwen_trials 260 $B/train_gpu.py --model qwen-edit --workdir /tmp/flen-rehearsal/qwen --out $R --tag dq \
  --variants naive,ours-compile-dq,ours-compile-prof
step adapter 360 $B/iteration_gpu.py --only qwen_adapter --out $R
step enriched 240 $B/iteration_gpu.py --only enriched_images --out $R
say "plan done"; finish
