#!/usr/bin/env bash
# Every GPU check and timing, for the lent device (`run` tool). Writes JSON and logs under
# ${OUT:-out/gpu}. Each step is time-boxed and a failure does not stop the next one. The limits
# add up to ~24 minutes, over one device command's 10: run it as two commands,
#   ONLY=kernel_tests,quant_matmul,decode_layers,qsun_decode scripts/gpu_checks.sh
#   ONLY=paged_attention,paged_decode,steps_8b scripts/gpu_checks.sh
# SMOKE=1 runs every step on the CPU at toy sizes (--tiny): a check of the script, not numbers.
set -u
smoke=${SMOKE:-0}
py=${PYTHON:-python}
big() { [ "$smoke" = 1 ] && echo "--tiny" || echo "$@"; }  # GPU-size args, or --tiny in smoke
out=${OUT:-out/gpu}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
step() {  # step NAME SECONDS CMD...  (ONLY=name1,name2 runs a subset)
  local name=$1 secs=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  echo "== $name"
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? ($name)"; tail -n 20 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
step kernel_tests 120 "$py" -m pytest -q tests/kernels_pallas -k "Gpu or gpu"
step quant_matmul 150 "$py" -m sunjax.cli bench matmul --out "$out/qmm" $(big)
step decode_layers 120 "$py" -m sunjax.cli bench decode --out "$out/decode" $(big)
step qsun_decode 180 "$py" -m sunjax.cli bench qsun --out "$out/qsun" $(big)
# Paged decode attention at Llama-3.1-8B shapes (ctx 1k / 8k, B = 1 / 32) against the HBM floor
# (4,245 GB/s): Pallas Triton kernel (plus a config sweep), XLA gather, dense. CPU: add --tiny.
step paged_attention 150 "$py" -m sunjax.cli bench paged --out "$out/paged" $(big \
  --model llama8b --ctx 1024 8192 --batches 1 32 --variants dense_xla paged_xla paged_pallas \
  --sweep --calls 10 --runs 3 --capacity-trials 5)
# The paged decode step of the engine (Engine.generate: all layers, sampling) against the dense
# one at Llama-3.1-8B shapes, ctx 1k / 8k, B = 1 / 32, and the HBM floor of each.
step paged_decode 300 "$py" -m sunjax.cli bench paged_engine --out "$out/paged_engine" $(big \
  --model configs/models/llama-3.1-8b.yaml --dtype bfloat16 --ctx 1024 8192 --batches 1 32 \
  --skip-capacity --steps 8 --runs 3)
# the simulator's step-time table at Llama-3.1-8B shapes (CPU smoke: `sunjax bench steps --out DIR`)
step steps_8b 420 "$py" -m sunjax.cli bench steps --out "$out/steps" $([ "$smoke" = 1 ] || echo \
  --model configs/models/llama-3.1-8b.yaml --dtype bfloat16 --workers 1 --slots 64 \
  --max-len 2048 --min-bucket 128 --batches 1 8 16 32 64 --ctxs 128 512 1024 2000 \
  --trees sun qsun --host-requests 0 --steps 16 --tasks 1)
