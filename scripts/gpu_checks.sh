#!/usr/bin/env bash
# Every GPU check and timing in one run, for the lent device (`run` tool): ~9 minutes on an
# H100/H200. Writes JSON and logs under ${OUT:-out/gpu}. Each step is time-boxed and a failure
# does not stop the next one. Test each part on the CPU first with its --tiny flag.
set -u
out=${OUT:-out/gpu}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
step() {  # step NAME SECONDS CMD...
  local name=$1 secs=$2; shift 2
  echo "== $name"
  timeout "$secs" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? ($name)"; tail -n 20 "$out/$name.log"
}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
step kernel_tests 120 python -m pytest -q tests/kernels_pallas -k "Gpu or gpu"
step quant_matmul 150 python -m sunjax.cli bench matmul --out "$out/qmm"
step decode_layers 120 python -m sunjax.cli bench decode --out "$out/decode"
step qsun_decode 180 python -m sunjax.cli bench qsun --out "$out/qsun"
# Paged decode attention at Llama-3.1-8B shapes (ctx 1k / 8k, B = 1 / 32) against the HBM floor
# (4,245 GB/s): Pallas Triton kernel (plus a config sweep), XLA gather, dense. CPU: add --tiny.
step paged_attention 150 python -m sunjax.cli bench paged --out "$out/paged" \
  --model llama8b --ctx 1024 8192 --batches 1 32 --variants dense_xla paged_xla paged_pallas \
  --sweep --calls 10 --runs 3 --capacity-trials 5
