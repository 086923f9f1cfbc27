"""Tiny CPU-pretrained + SFT runs for GRPO tests and the benchmark: arithmetic questions in the chat
template, a few seconds each."""

from __future__ import annotations

import json
from pathlib import Path

from archifactory.data.rl.synthetic import arith_problems
from archifactory.sft.run import with_pretrained_architecture
from archifactory.train.loop import train
from tests.helpers import compose_config
from tests.run_helpers import train_tiny_run, write_small_corpus


def write_arith_chat(path: Path, count: int = 200, seed: int = 7) -> Path:
    """SFT conversations: "What is a+b?" answered with the number (the format GRPO's answer reward reads)."""
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in arith_problems(count, 2, 9, "+-", seed)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pretrain_and_sft(root: Path, mixin: str, sft_steps: int = 10) -> Path:
    """outputs/pre_<mixin> (a text-pretrained tiny model) and outputs/sft_<mixin> (its SFT on arithmetic)."""
    pretrained = root / "outputs" / f"pre_{mixin}"
    corpus = root / "corpus"
    if not corpus.is_dir():
        write_small_corpus(corpus)
    train_tiny_run(pretrained, corpus, root / "cache", f"mixin={mixin}", "trainer.max_steps=10")
    chat = write_arith_chat(root / "arith_chat.jsonl")
    sft_dir = root / "outputs" / f"sft_{mixin}"
    cfg = compose_config([
        f"init_from={pretrained}", "dataset=chat_jsonl", f"dataset.path={chat}", f"dataset.cache_dir={root / 'cache'}",
        "trainer=sft", "trainer.seq_len=32", "trainer.micro_batch_size=8", f"trainer.max_steps={sft_steps}",
        "trainer.lr=3e-3", f"trainer.eval_every={sft_steps}", f"trainer.checkpoint_every={sft_steps}",
        "trainer.warmup_steps=2", f"run_name=sft_{mixin}",
    ])  # fmt: skip
    train(with_pretrained_architecture(cfg, pretrained), sft_dir)
    return sft_dir
