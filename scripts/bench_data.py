"""Data pipeline throughput on a local corpus, each rate next to the yardstick it must beat, in one run.

    python scripts/bench_data.py ../shared/data/shakespeare [--markdown] [--repeats 3]

- tokenization: ArchiFactory's preparation (read files, encode on all cores, EOS, write uint16 shards)
  vs the `tokenizers` library's own `encode_batch_fast` on the same documents already in memory
  (target: within 2x);
- loader: tokens/s delivered as ready (inputs, targets) batches of the `trainer=cpu` shape vs the
  training throughput (forward + backward + AdamW step) of `model=tiny` on the same batches
  (target: >= 50x, so the loader is never the bottleneck).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "true"  # both cores for the Rust encoder

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from archifactory.data import load_data  # noqa: E402
from archifactory.data.dataset import as_dataset_config  # noqa: E402
from archifactory.data.prepare import get_tokenizer, tokenize_to_shards  # noqa: E402
from archifactory.data.sources import make_source  # noqa: E402
from archifactory.model.build import build_model  # noqa: E402
from tests.helpers import compose_config  # noqa: E402


def best_and_median(times: list[float]) -> tuple[float, float]:
    return min(times), statistics.median(times)


def bench_tokenization(cfg, repeats: int) -> dict[str, float]:
    source = make_source(cfg)
    start = time.perf_counter()
    tok = get_tokenizer(cfg, source, Path(cfg.cache_dir))
    train_seconds = time.perf_counter() - start
    texts = list(source.documents("train"))
    raw_times, raw_tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        encoded = tok.backend.encode_batch_fast(texts, add_special_tokens=False)
        raw_times.append(time.perf_counter() - start)
        raw_tokens = sum(len(e.ids) for e in encoded)
    ours_times, ours_tokens = [], 0
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            splits = tokenize_to_shards(Path(folder), cfg, source, tok)
            ours_times.append(time.perf_counter() - start)
        ours_tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    return {
        "bpe_train_s": train_seconds,
        "raw_tok_s": raw_tokens / min(raw_times),
        "ours_tok_s": ours_tokens / min(ours_times),
        "raw_tokens": raw_tokens,
        "ours_tokens": ours_tokens,
    }


def bench_loader(data, batch: int, seconds: float = 2.0) -> float:
    loader = data.train_loader(batch)
    next(loader)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            inputs, targets = next(loader)
        count += 100
    return count * inputs.numel() / (time.perf_counter() - start)


def bench_training(root, data, steps: int) -> tuple[float, int]:
    trainer = root.trainer
    model = build_model(root, data.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=trainer.lr, betas=(trainer.beta1, trainer.beta2))
    loader = data.train_loader(trainer.micro_batch_size)

    def step() -> None:
        inputs, targets = next(loader)
        loss = model(inputs, targets=targets, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: allocator, AdamW state
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    return steps * trainer.micro_batch_size * trainer.seq_len / elapsed, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", default="../shared/data/shakespeare")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as cache:
        root = compose_config(
            [
                "dataset=text",
                f"dataset.path={args.path}",
                f"dataset.cache_dir={cache}",
                "model=tiny",
                "trainer=cpu",
            ]
        )
        cfg = as_dataset_config(root.dataset)
        tokenization = bench_tokenization(cfg, args.repeats)
        start = time.perf_counter()
        load_data(root.dataset, seq_len=root.trainer.seq_len, seed=0)  # first use: prepares the cache
        prepare_s = time.perf_counter() - start
        start = time.perf_counter()
        data = load_data(root.dataset, seq_len=root.trainer.seq_len, seed=0)
        reuse_s = time.perf_counter() - start
        assert data.reused_cache
        batch = root.trainer.micro_batch_size
        loader_tok_s = bench_loader(data, batch)
        train_tok_s, params = bench_training(root, data, args.train_steps)

    shape = f"{batch} x {root.trainer.seq_len}"
    tok_ratio = tokenization["raw_tok_s"] / tokenization["ours_tok_s"]
    raw, ours = f"{tokenization['raw_tok_s']:,.0f}", f"{tokenization['ours_tok_s']:,.0f}"
    rows = [
        ("tokenize: `tokenizers` encode_batch_fast (in memory)", raw, "yardstick"),
        ("tokenize: ArchiFactory prepare (files → uint16 shards)", ours,
         f"{tok_ratio:.2f}x slower (target ≤ 2x)"),
        (f"train: model=tiny fwd+bwd+AdamW, batch {shape}", f"{train_tok_s:,.0f}",
         f"{params / 1e6:.1f}M params"),
        (f"loader: ready batches {shape}", f"{loader_tok_s:,.0f}",
         f"{loader_tok_s / train_tok_s:,.0f}x training (target ≥ 50x)"),
    ]  # fmt: skip
    threads = torch.get_num_threads()
    notes = [
        f"corpus {args.path}: {tokenization['ours_tokens']:,} tokens (BPE 8192, trained in "
        f"{tokenization['bpe_train_s']:.1f}s); first `load_data` {prepare_s:.1f}s, reuse {reuse_s:.2f}s",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({threads} threads), best of {args.repeats}",
    ]
    if args.markdown:
        print(f"`python scripts/bench_data.py {args.path} --markdown`\n")
        print("| measurement | tokens/s | vs yardstick |\n|---|---:|---|")
        for row in rows:
            print(f"| {' | '.join(row)} |")
        print()
        print("\n".join(f"- {note}" for note in notes))
    else:
        width = max(len(r[0]) for r in rows)
        for name, rate, note in rows:
            print(f"{name:<{width}}  {rate:>14} tok/s  {note}")
        print("\n".join(notes))


if __name__ == "__main__":
    main()
