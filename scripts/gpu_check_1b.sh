#!/usr/bin/env bash
# The 1B-class measurement of gpu_check.sh, runnable alone: experiment=pints_1b at reduced steps on one GPU
# (FSDP2 over one rank, bf16, per-block compile and checkpointing, chunked loss, 2^17-token steps, sharded
# async checkpoints) on a generated corpus (no download). Saved under $OUT (or benchmarks/gpu/): the run's
# last log lines, the DCP check (each rank's shards; the model/ folder consolidated from them loads with
# transformers with the checkpoint's logits), the plan.md the run wrote (its memory estimate), and
# throughput, MFU and measured peak from summary.json.
# Extra arguments are appended to the train command; a CPU rehearsal of this very script scales it down:
#   GPU_CHECK_DOCS=100 bash scripts/gpu_check_1b.sh trainer.device=cpu trainer.compile=false \
#       model.hidden_size=128 model.num_layers=2 model.num_heads=2 trainer.seq_len=128 trainer.micro_batch_size=2 \
#       trainer.batch_tokens=512 trainer.max_steps=4 trainer.checkpoint_every=2 trainer.eval_tokens=1024
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu}
mkdir -p "$out"
corpus=$(mktemp -d)
trap 'rm -rf "$corpus"' EXIT
python - "$corpus" "${GPU_CHECK_DOCS:-2500}" <<'PY'
import random, sys
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
for part in range(4):
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 400))) for _ in range(int(sys.argv[2]))]
    open(f"{sys.argv[1]}/part{part}.txt", "w").write("\n\n".join(docs))
PY
torchrun --standalone --nproc_per_node=1 -m archifactory train experiment=pints_1b dataset=text \
    dataset.path="$corpus" dataset.doc_separator='"\n\n"' dataset.cache_dir="$corpus/cache" model.vocab_size=32768 \
    trainer.max_steps=12 trainer.batch_tokens=131072 trainer.eval_tokens=65536 trainer.log_every=2 \
    trainer.checkpoint_every=6 trainer.checkpoint_format=dcp trainer.async_checkpoint=true \
    run_name=gpu_check_1b hydra.run.dir="$corpus/run" "$@" 2>&1 | tail -n 20 | tee "$out/train_1b.txt"
python scripts/gpu_check_dcp.py "$corpus/run" 2>&1 | tee "$out/dcp_1b.txt"
cp "$corpus/run/plan.md" "$out/plan_1b.md"
python -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s.get(k) for k in ('status','tokens_per_second','mfu','peak_memory_mb')})" \
    "$corpus/run/summary.json" | tee "$out/throughput_1b.txt"
