#!/usr/bin/env bash
# The device check, run on a CUDA machine from the repository root (writes into $OUT, default ./gpu_out).
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"
python3 benchmarks/gpu_equivalence.py > "$OUT/gpu_equivalence.json"; cat "$OUT/gpu_equivalence.json"
for dt in float32 bfloat16; do
  python3 -m dtop bench segvit_vit_b16 --size 512 512 --batch 8 --device cuda --dtype $dt --warmup 5 --repeats 20 \
    --exit-fractions 0.3 0.39 0.47 0.56 0.64 0.73 0.81 0.9 --json > "$OUT/bench_b16_$dt.json"; cat "$OUT/bench_b16_$dt.json"
done
python3 -m dtop bench segvit_vit_b16 --size 512 512 --batch 32 --device cuda --dtype bfloat16 --warmup 5 --repeats 10 \
  --exit-fractions 0.3 0.39 0.47 0.56 0.64 0.73 0.81 0.9 --layouts packed padded --json > "$OUT/bench_b16_bf16_b32.json"; cat "$OUT/bench_b16_bf16_b32.json"
python3 -m dtop bench segvit_vit_b16 --size 512 512 --batch 8 --device cuda --dtype bfloat16 --warmup 5 --repeats 20 \
  --exit-fractions 0 --layouts packed padded --json > "$OUT/bench_b16_bf16_noexit.json"; cat "$OUT/bench_b16_bf16_noexit.json"
python3 -m dtop bench segvit_vit_b16 --size 512 512 --device cuda --count-ops --count-batches 1 8 32 --json \
  > "$OUT/opcount_b16.json"; cat "$OUT/opcount_b16.json"
# compiled (dynamic shapes), bf16: realised against the compiled dense model
python3 -m dtop bench segvit_vit_b16 --size 512 512 --batch 8 --device cuda --dtype bfloat16 --warmup 5 --repeats 20 \
  --exit-fractions 0.3 0.39 0.47 0.56 0.64 0.73 0.81 0.9 --layouts packed --compile --json > "$OUT/bench_b16_bf16_compiled.json"; cat "$OUT/bench_b16_bf16_compiled.json"
# budget exits (fixed shapes): eager, compiled, and CUDA graphs (reduce-overhead)
for mode in none default reduce-overhead; do
  extra=$([ "$mode" = none ] && echo "" || echo "--compile-mode $mode")
  python3 -m dtop bench segvit_vit_b16 --size 512 512 --batch 8 --device cuda --dtype bfloat16 --warmup 5 --repeats 20 \
    --exit-ratio 0.6 0.05 --layouts padded $extra --json > "$OUT/bench_b16_bf16_budget_$mode.json"; cat "$OUT/bench_b16_bf16_budget_$mode.json"
done
