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
# The most wanted first: the FLUX step (fp8 and nf4 with their `auto` settings, interleaved with the naive loop),
# the FLUX chain (the generator now fp8 by `auto`, grids phase by phase), then the Qwen chain (the adapter, its
# peak with expandable segments, its step with TF32 LoRA matmuls), the slow GPU tests last.
step build_flux 200 $B/rehearsal_gpu.py --phase build_flux $COMMON
step train_flux 420 $B/train_gpu.py --model flux --workdir /tmp/flen-rehearsal/flux --out $R --tag fp8 \
  --variants naive,ours-compile-fp8,ours-compile,naive,ours-compile-fp8,ours-compile
step pytest_fp8 60 $PT /tmp/gputests/test_fp8_linear.py /tmp/gputests/test_flux.py
# flux_lora's two slices compile from cold caches (~6 min together): the generation slices get a call of their own
step flux_lora 400 $B/iteration_gpu.py --only flux_lora --out $R
step flux_gen 360 $B/iteration_gpu.py --only lora_eval,synthetic_batch --out $R
[ -f /tmp/plan/flux_gen ] && rm -rf /tmp/flen-rehearsal/flux  # 64 GiB of disk: one chain's models at a time
step build_qwen 200 $B/rehearsal_gpu.py --phase build_qwen $COMMON
step adapter 360 $B/iteration_gpu.py --only qwen_adapter --out $R
# the adapter's card peak (16.43 GiB, goal 16) with the allocator's expandable segments: is the gap to allocated slack?
step adapter_expandable 360 env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
  $B/rehearsal_gpu.py --phase qwen_adapter $COMMON --adapter-steps 30
step train_qwen 420 $B/train_gpu.py --model qwen-edit --workdir /tmp/flen-rehearsal/qwen --out $R --tag tf32 \
  --variants naive,ours-compile,naive,ours-compile
step enriched 240 $B/iteration_gpu.py --only enriched_images --out $R
step pytest_trainers 150 $PT /tmp/gputests/test_trainers_gpu.py
say "plan done"; finish
