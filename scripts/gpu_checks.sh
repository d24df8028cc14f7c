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
step quant_matmul 150 python -m kernels_pallas.quant_matmul.bench --out "$out/qmm"
step decode_layers 120 python -m serve.bench_decode --out "$out/decode"
step qsun_decode 180 python -m serve.bench_qsun --out "$out/qsun"
# the simulator's step-time table at Llama-3.1-8B shapes (CPU smoke: `sunjax bench steps --out DIR`)
step steps_8b 420 python -m sunjax.cli bench steps --out "$out/steps" \
  --model configs/models/llama-3.1-8b.yaml --dtype bfloat16 --workers 1 --slots 64 \
  --max-len 2048 --min-bucket 128 --batches 1 8 16 32 64 --ctxs 128 512 1024 2000 \
  --trees sun qsun --host-requests 0 --steps 16
