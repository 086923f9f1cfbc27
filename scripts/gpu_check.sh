#!/usr/bin/env bash
# The prepared run for a CUDA machine: fused-vs-reference parity tests (forward and gradients, bf16
# tolerances), then the GPU benchmarks. Each result is printed and saved under $OUT (the device tool's
# output folder) or benchmarks/gpu/. Needs: CUDA torch and `pip install -e ".[test,fla]"`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.txt"
python scripts/bench_mixins.py --device cuda --steps 10 --markdown 2>&1 | tee "$out/bench_mixins_cuda.md"
python scripts/bench_ffn.py --device cuda --dtype bf16 --markdown 2>&1 | tee "$out/bench_ffn_cuda.md"
python scripts/bench_train.py --device cuda --preset base125m --batch 16 --seq-len 1024 --vocab 32768 \
    --compile --mixins gqa,mla,retnet,mamba2,rwkv6 --markdown 2>&1 | tee "$out/bench_train_cuda.md"
python scripts/bench_eval.py --device cuda --layers 12 --hidden 768 --heads 12 --kv-heads 4 --vocab 32768 \
    --seq-len 1024 --batch 32 --questions 128 --markdown 2>&1 | tee "$out/bench_eval_cuda.md"
python scripts/bench_generate.py --device cuda --markdown 2>&1 | tee "$out/bench_generate_cuda.md"
# 1B class: experiment=pints_1b at reduced steps (throughput, MFU, DCP export, plan vs measured peak)
bash scripts/gpu_check_1b.sh
