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
  tests/resources/generators/test_flux.py tests/resources/models/test_block_swap.py /tmp/gputests/
# The most wanted first (STEPS picks; each session sends what its device minutes allow). Session 19 measured the
# adapter on an fp8 base with blocks swapped (train_qwen_swap: 2.66x the naive loop at 14.42 GiB with 32 of 60;
# adapter_fp8 with 15 and 32 swapped) and made it the trainer's `auto` (32 at the 20 GiB budget), with pinned
# buffers now registered at their exact size (cudaHostRegister; their GPU test and the tiny trainer's auto test
# passed). Next: `adapter`, the asset's own `auto` end to end with registered buffers (its peak and step should match
# session 19's forced 32: 15.78 GiB, 1.170 s), then `adapter_nf4` for the record.
step pytest_gpu 170 $PT /tmp/gputests/test_fp8_linear.py /tmp/gputests/test_flux.py /tmp/gputests/test_trainers_gpu.py \
  /tmp/gputests/test_block_swap.py
# 64 GiB of disk: one chain's models at a time
step build_qwen 150 bash -c "rm -rf /tmp/flen-rehearsal/flux && $B/rehearsal_gpu.py --phase build_qwen $COMMON"
step train_qwen_swap 450 $B/train_gpu.py --model qwen-edit --workdir /tmp/flen-rehearsal/qwen --out $R --tag fp8-swap \
  --variants naive,ours-compile-fp8-swap28,ours-compile-fp8-swap32,ours-compile-fp8,ours-compile,naive
# the memory the adapter may use is the naive loop's (15.27 GiB; ours 14.05)
step train_qwen 450 $B/train_gpu.py --model qwen-edit --workdir /tmp/flen-rehearsal/qwen --out $R --tag adamw-keep \
  --variants naive,ours-compile,ours-compile-torchadamw,ours-compile-torchadamw-keep4,ours-compile-torchadamw-keep8,naive
step adapter 300 $B/iteration_gpu.py --only qwen_adapter --out $R
step adapter_nf4 220 $B/iteration_gpu.py --only qwen_adapter --adapter-quantization nf4 --out $R
step build_flux 100 bash -c "rm -rf /tmp/flen-rehearsal/qwen && $B/rehearsal_gpu.py --phase build_flux $COMMON"
step train_flux 240 $B/train_gpu.py --model flux --workdir /tmp/flen-rehearsal/flux --out $R --tag fp8mm \
  --variants naive,ours-compile,ours-compile-fp8mm
step flux_lora 270 $B/iteration_gpu.py --only flux_lora --out $R
# a later iteration: the compile caches filled by an untimed 2-step slice first (iteration_gpu-warm-*.json)
step flux_lora_warm 400 $B/iteration_gpu.py --only flux_lora --caches warm --out $R
step gen_compare 220 $B/generate_gpu.py --workdir /tmp/flen-rehearsal --out $R --variants eager,compiled
step flux_eval 140 $B/iteration_gpu.py --only lora_eval --out $R
step synthetic 130 $B/iteration_gpu.py --only synthetic_batch --out $R
step enriched 240 $B/iteration_gpu.py --only enriched_images --out $R
say "plan done"; finish
