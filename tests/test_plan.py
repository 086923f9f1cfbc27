"""`archifactory plan`: the table's figures against the meta-built model, hand counts and a measured CPU peak.

The hand counts below are for a tiny gqa/swiglu/rope shape: D = 64, 2 layers, 4 query heads and 2 key/value
heads of 16, SwiGLU 192 (8/3 × 64 = 170.7, rounded up to a multiple of 64), vocabulary 128, micro-batch 2 × 32
tokens, fp32 on the CPU, AdamW.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from archifactory.cli.main import main
from archifactory.model.build import build_model
from archifactory.runs import layout
from archifactory.train.activations import trace_activations
from archifactory.train.plan import build_plan, render_plan
from archifactory.train.schedule import plan_steps
from tests.helpers import compose_config
from tests.run_helpers import train_tiny_run, write_small_corpus

TINY = [
    "mixin=gqa",
    "ffn=swiglu",
    "positional=rope",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "mixin.num_kv_heads=2",
    "model.vocab_size=128",
    "trainer.seq_len=32",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=10",
    "trainer.device=cpu",
    "trainer.precision=fp32",
]
D, L, H, KV, HD, F, V, B, T = 64, 2, 4, 2, 16, 192, 128, 2, 32
N = B * T  # tokens per micro-batch
KVD = KV * HD  # key/value width
BLOCK_PARAMS = D * (D + 2 * KVD) + D * D + 3 * D * F + 2 * D  # qkv, out, gate/up/out, two norm gains = 49,280
ROOT_PARAMS = V * D + V * D + D  # embedding, untied head, final norm = 16,448
TOTAL_PARAMS = L * BLOCK_PARAMS + ROOT_PARAMS  # 115,008
PARAM_TENSORS = L * 7 + 3  # per block: qkv, out, gate, up, out, 2 norm gains; embedding, head, final norm


def test_pints_1b_parameter_count_equals_the_meta_built_model() -> None:
    cfg = compose_config(["experiment=pints_1b"])
    plan = build_plan(cfg, world_size=8)
    with torch.device("meta"):
        model = build_model(cfg, cfg.dataset.vocab_size)
    assert plan.breakdown == model.parameter_breakdown()
    assert 1.0e9 <= plan.breakdown["total"] <= 1.2e9 and model.vocab_size == 32768
    assert (cfg.model.hidden_size // cfg.model.num_heads, cfg.model.max_seq_len) == (128, 2048)
    assert plan.flops_per_token == model.flops_per_token(2048)


def test_pints_1b_is_the_recipe_its_comments_state() -> None:
    cfg = compose_config(["experiment=pints_1b"])
    trainer = cfg.trainer
    assert cfg.dataset.name == "pints" and cfg.dataset.streaming and cfg.dataset.max_tokens is None
    assert (str(trainer.precision), str(trainer.strategy), str(trainer.schedule)) == ("bf16", "fsdp", "wsd")
    assert trainer.activation_checkpointing and trainer.compile and cfg.model.loss_chunk_size > 0
    assert 2**20 <= trainer.batch_tokens <= 2 * 2**20 and trainer.total_tokens == 57_000_000_000
    assert plan_steps(cfg, world_size=8) == (57_000_000_000 // 2**20, 8) == (54_359, 8)
    assert plan_steps(cfg, world_size=1) == (54_359, 64)


def test_parameters_and_flops_equal_hand_counts() -> None:
    plan = build_plan(compose_config(TINY), world_size=1)
    assert plan.breakdown["total"] == TOTAL_PARAMS == 115_008
    assert plan.breakdown["non_embedding"] == L * BLOCK_PARAMS + D == 98_624
    # forward FLOPs per token: projections 2·D·(D + 2·KVD) + 2·D·D, causal attention 2·2·D·(T+1)/2 (q·k and
    # p·v over the mean prefix), SwiGLU 2·3·D·F; per layer, plus the head 2·D·V
    per_layer = 2 * D * (D + 2 * KVD) + 2 * D * D + 4 * D * (T + 1) / 2 + 6 * D * F  # 102,528
    assert plan.flops_per_token == L * per_layer + 2 * D * V == 221_440
    assert plan.tokens == 10 * B * T == 640  # max_steps × micro-batch × seq (accum 1, world 1)
    assert plan.total_flops == 3 * 221_440 * 640


def test_memory_equals_hand_counts() -> None:
    single = build_plan(compose_config(TINY), world_size=1).memory
    assert single.parameters == single.gradients == 4 * TOTAL_PARAMS  # fp32
    assert single.optimizer == 8 * TOTAL_PARAMS + 4 * PARAM_TENSORS  # AdamW: 2 fp32 moments + a step each
    assert single.weight_copies == 0  # fp32: no autocast copies
    assert single.loss_workspace == N * V * 4  # the fp32 logits, beside the log-probs saved (traced below)
    # What autograd saves in one block (elements; fp32 → ×4 bytes), read off the code:
    #   mixin norm: its input, rsqrt [N, 1], the normalised x          2·N·D + N
    #   qkv_proj's input (the norm's output)                              N·D
    #   SDPA as a fused kernel keeps: q and k after rotary (new tensors), v (a view of the qkv output, whose
    #   whole storage counts), its output, logsumexp [B, H, T]           N·D + N·KVD + N·(D + 2·KVD) + N·D + B·H·T
    #   (rotary's multiplications save only the cos/sin tables, counted once per forward below)
    #   out_proj's input (the heads put back together: a copy)            N·D
    #   FFN norm                                                          2·N·D + N
    #   gate/up projections' input (one tensor)                           N·D
    #   SwiGLU: gate (SiLU's input), SiLU's output, up, their product     4·N·F
    block = 9 * N * D + N * (D + 2 * KVD) + N * KVD + 2 * N + B * H * T + 4 * N * F
    # Outside the blocks: token ids (int64), the final norm (2·N·D + N) and its output (the head's input),
    # the cross-entropy's fp32 log-probabilities [N, V], its target column [N, 1] (int64) and valid mask
    # [N] (bool), the count the mean divides by (int64), and the rotary cos/sin tables [T, HD] (fp32).
    other = 8 * N + 4 * (2 * N * D + N) + 4 * N * D + 4 * N * V + 8 * N + N + 8 + 2 * 4 * T * HD
    with torch.device("meta"):
        model = build_model(compose_config(TINY), V)
    trace = trace_activations(model, B, T)
    assert trace.blocks == [4 * block] * L and trace.other == other
    assert single.activations == L * 4 * block + other
    # checkpointed: each block keeps its fp32 input, and one block's activations live again in backward
    assert single.activations_checkpointed == other + L * 4 * N * D + 4 * block
    # ddp keeps a second gradient copy in its buckets; fsdp shards everything and gathers the root (embedding,
    # head, final norm) plus two blocks' parameters and one block's gradients
    ddp = build_plan(compose_config(TINY), world_size=2).memory
    assert ddp.gradients == 2 * 4 * TOTAL_PARAMS and ddp.parameters == 4 * TOTAL_PARAMS
    fsdp = build_plan(compose_config([*TINY, "trainer.strategy=fsdp"]), world_size=2).memory
    assert fsdp.parameters == 4 * TOTAL_PARAMS // 2 + 4 * (ROOT_PARAMS + 2 * BLOCK_PARAMS)
    assert fsdp.gradients == 4 * TOTAL_PARAMS // 2 + 4 * (ROOT_PARAMS + BLOCK_PARAMS)
    assert fsdp.optimizer == single.optimizer // 2
    # bf16 autocast: a bf16 copy of every matmul weight (qkv, out, gate, up, out per block, and the head)
    bf16 = build_plan(compose_config([*TINY, "trainer.precision=bf16"]), world_size=1).memory
    assert bf16.weight_copies == 2 * (L * (D * (D + 2 * KVD) + D * D + 3 * D * F) + V * D)
    assert bf16.loss_workspace == N * V * (4 + 2)  # the bf16 logits and their fp32 cast
    # a chunked loss recomputes one chunk's fp32 logits and log-probs in the backward (outside the trace)
    chunked = build_plan(compose_config([*TINY, "model.loss_chunk_size=16"]), world_size=1).memory
    assert chunked.loss_workspace == 16 * V * (4 + 4)
    assert chunked.activations == single.activations - 4 * N * V - 8 * N - N  # no log-probs, column, mask


def test_optimizer_state_follows_the_optimizer() -> None:
    matrices = L * (D * (D + 2 * KVD) + D * D + 3 * D * F)
    muon = build_plan(compose_config([*TINY, "trainer.optimizer=muon"]), world_size=1).memory
    # Muon: one fp32 momentum per matrix element; AdamW (2 moments + step) for the head, tables and gains
    assert muon.optimizer == 4 * matrices + 8 * (TOTAL_PARAMS - matrices) + 4 * (PARAM_TENSORS - 5 * L)
    ademamix = build_plan(compose_config([*TINY, "trainer.optimizer=ademamix"]), world_size=1).memory
    assert ademamix.optimizer == 12 * TOTAL_PARAMS


def test_optimizer_bytes_equal_the_real_optimizers_state_after_a_step() -> None:
    from archifactory.train.optim import build_optimizer

    cfg = compose_config(TINY)
    model = build_model(cfg, V)
    optimizer = build_optimizer(model, cfg.trainer, "cpu", total_steps=10)
    ids = torch.randint(0, V, (B, T))
    model(ids, targets=ids, return_logits=False).loss.backward()
    optimizer.step()
    real = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert build_plan(cfg, world_size=1).memory.optimizer == real


MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from archifactory.config.compose import compose
    from archifactory.model.build import build_model
    from archifactory.train.optim import build_optimizer

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    cfg = compose(sys.argv[1:])
    torch.set_num_threads(1)
    batch, seq, vocab = cfg.trainer.micro_batch_size, cfg.trainer.seq_len, cfg.model.vocab_size
    ids = torch.randint(0, vocab, (batch, seq))
    with torch.device("meta"):  # imports every component module before the baseline
        build_model(cfg, vocab)
    base = rss()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM): imports may have peaked higher
        f.write("5")
    model = build_model(cfg, vocab)
    optimizer = build_optimizer(model, cfg.trainer, "cpu", total_steps=10)
    for _ in range(2):  # the second step also holds the optimizer state
        model(ids, targets=ids, return_logits=False).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak": hwm - base}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc settings")
def test_memory_estimate_is_within_15_percent_of_a_measured_cpu_peak() -> None:
    """The measured quantity: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs
    once the imports are done, so an earlier peak cannot count) over its resident set just before the model
    is built, across two real training steps (forward, backward, clip, AdamW). glibc's mmap
    threshold is pinned at 64 KiB, so every tensor of that size or more is its own mapping and a freed one
    leaves the resident set (with the default dynamic threshold, freed memory stays in the heap)."""
    shape = [
        "model.hidden_size=256",
        "model.num_layers=4",
        "model.num_heads=4",
        "model.vocab_size=4096",
        "trainer.seq_len=256",
        "trainer.micro_batch_size=8",
        "trainer.device=cpu",
        "trainer.precision=fp32",
    ]
    # a clean environment: nothing an earlier test in this process set (threads, allocator, debug) leaks in
    keep = ("PATH", "HOME", "PYTHONPATH", "TMPDIR", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    env = {key: os.environ[key] for key in keep if key in os.environ}
    env |= {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *shape], capture_output=True, text=True, env=env, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])["peak"]
    estimate = build_plan(compose_config(shape), world_size=1).memory.total(checkpointing=False)
    assert abs(estimate - measured) <= 0.15 * measured, (estimate, measured)


def test_plan_pints_1b_prints_the_table_in_seconds_offline(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "ARCHIFACTORY_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "archifactory", "plan", "experiment=pints_1b", "plan.world_size=8"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stderr
    assert elapsed < 30, f"plan took {elapsed:.1f}s"
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in result.stdout.splitlines()[2:]}
    assert rows["parameters: total"] == "1,146,177,536"
    assert rows["tokens to train"] == "57.00B"
    assert "wall time: 8 × H100" in rows and "wall time: 8 × RTX 4090" in rows
    assert not cache.exists() and not (tmp_path / "outputs").exists()  # no data, no run directory


def test_wall_time_is_total_flops_over_gpus_peak_and_mfu() -> None:
    plan = build_plan(compose_config(["experiment=pints_1b"]), world_size=8, mfu=0.5)
    assert plan.wall_seconds(989e12) == pytest.approx(
        3 * plan.flops_per_token * plan.tokens / (8 * 989e12 * 0.5)
    )
    assert "50% MFU of 989 TFLOP/s" in render_plan(plan) and "165 TFLOP/s" in render_plan(plan)


@pytest.mark.parametrize(
    "args, message",
    [
        (["model.hidden_sise=3"], "hidden_sise"),
        (["mixin=nope"], "unknown mixin 'nope'"),
        (["plan.mfu=2"], "plan.mfu=2.0 must be in (0, 1]"),
        (["plan.world=2"], "unknown plan option"),
        (["trainer.lr=-1"], "trainer.lr=-1.0 must be > 0"),
    ],
)
def test_a_bad_override_is_one_error_line(args: list[str], message: str, capsys) -> None:
    assert main(["plan", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_a_training_run_writes_its_plan(tmp_path: Path) -> None:
    corpus = write_small_corpus(tmp_path / "corpus")
    run_dir = tmp_path / "run"
    train_tiny_run(run_dir, corpus, tmp_path / "cache", "trainer.max_steps=2", "trainer.device=cpu")
    written = layout.plan_path(run_dir).read_text()
    cfg = compose_config(
        [
            "dataset=text",
            f"dataset.path={corpus}",
            "dataset.vocab_size=512",
            "model=tiny",
            "model.hidden_size=64",
            "model.num_layers=2",
            "trainer=smoke",
            "trainer.max_steps=2",
            "trainer.device=cpu",
        ]
    )
    vocab = int(written.split("vocab ")[1].split(" ")[0].replace(",", ""))
    assert written == render_plan(build_plan(cfg, world_size=1, vocab_size=vocab))
    assert "2 steps" in written
