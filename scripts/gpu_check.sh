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
# 1B class: experiment=pints_1b at reduced steps on one GPU (FSDP2 over one rank, bf16, per-block compile and
# checkpointing, chunked loss, 2^17-token steps) on a generated corpus (no download): throughput and MFU from
# summary.json, and the plan's memory estimate (plan.md) beside the measured peak.
corpus=$(mktemp -d)
python - "$corpus" <<'PY'
import random, sys
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
for part in range(4):
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 400))) for _ in range(2500)]
    open(f"{sys.argv[1]}/part{part}.txt", "w").write("\n\n".join(docs))
PY
torchrun --standalone --nproc_per_node=1 -m archifactory train experiment=pints_1b dataset=text \
    dataset.path="$corpus" dataset.doc_separator='"\n\n"' dataset.cache_dir="$corpus/cache" model.vocab_size=32768 \
    trainer.max_steps=12 trainer.batch_tokens=131072 trainer.eval_tokens=65536 trainer.log_every=2 \
    trainer.checkpoint_every=6 trainer.checkpoint_format=dcp trainer.async_checkpoint=true \
    run_name=gpu_check_1b hydra.run.dir="$corpus/run" 2>&1 | tail -n 20 | tee "$out/train_1b.txt"
# the sharded (DCP) checkpoints: each rank's shards, and the model/ folder consolidated from them loads with
# transformers with the checkpoint's logits (bf16 tolerance on the GPU)
python scripts/gpu_check_dcp.py "$corpus/run" 2>&1 | tee "$out/dcp_1b.txt"
cp "$corpus/run/plan.md" "$out/plan_1b.md"
python -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s.get(k) for k in ('status','tokens_per_second','mfu','peak_memory_mb')})" \
    "$corpus/run/summary.json" | tee "$out/throughput_1b.txt"
rm -rf "$corpus"
