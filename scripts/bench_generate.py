"""Decode speed and decode-state memory of every registered mixin, by context length; cached vs uncached.

Each mixin is built through its own YAML as a full `model=tiny` model (4 layers, hidden 128, 4 heads,
vocab 8192, swiglu, rope; batch 1, fp32, random weights: speed does not depend on training). For every
context C it prefills a C-token prompt through the model's explicit state, then times single-token decode
steps (after warm-up steps; the contexts' steps interleaved and the median step reported, robust to a
noisy shared machine):

- decode tok/s at C: 1 / median seconds per decode step with a context of ~C tokens;
- state MB at C: the bytes of every tensor in the decode state after the prefill (attention: its KV cache,
  which grows with C; recurrent mixins: a constant-size state);
- flat ×: the step time at the longest context over the shortest (recurrent mixins should stay near 1);
- cached vs uncached at `--uncached-context`: the step time when every new token recomputes the full
  forward over the whole sequence (what a model without a cache does), over the cached step time;
- mixed lengths: `--mixed-prompts` prompts of as many different lengths (`--mixed-min` + 4 i tokens),
  `--mixed-new` greedy tokens each through `archifactory.generate`: new tokens per second with the prompts
  in one left-padded batch (`padding=left`) and grouped by length (`padding=group`, one batch per length),
  and their ratio (batched × grouped).

Step times are CPU seconds of this process (`--clock cpu`, the default, with one torch thread) or wall
seconds (`--clock wall`). On a shared machine whose other jobs outnumber the cores, wall time mostly
measures waiting for a core; the process's own CPU time measures the work (`--clock wall` on an idle
machine or a GPU, where `--device cuda` synchronises around every step).

    python scripts/bench_generate.py --markdown                 # contexts 128, 1024, 4096; every mixin
    python scripts/bench_generate.py --mixins gqa,rwkv6 --contexts 128,1024 --steps 8
    python scripts/bench_generate.py --mixins gqa --contexts 128 --markdown   # + the mixed-length row
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a script in the repository: run it without installing the package
    sys.path.insert(0, str(REPO))

from archifactory.core.registry import components  # noqa: E402
from archifactory.generate.sampling import generate  # noqa: E402
from archifactory.model.build import build_model  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mixins", default=None, help="comma-separated subset (default: every registered one)"
    )
    parser.add_argument("--contexts", default="128,1024,4096", help="comma-separated context lengths")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    parser.add_argument("--warmup", type=int, default=3, help="untimed decode steps first")
    parser.add_argument("--uncached-context", type=int, default=1024)
    parser.add_argument("--uncached-steps", type=int, default=3, help="timed full-recompute steps")
    parser.add_argument("--mixed-prompts", type=int, default=16, help="prompts of distinct lengths (0: skip)")
    parser.add_argument("--mixed-min", type=int, default=16, help="the shortest mixed prompt")
    parser.add_argument("--mixed-new", type=int, default=32, help="new tokens per mixed prompt")
    parser.add_argument("--model", default="tiny", help="model size preset")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--clock", choices=("cpu", "wall"), default="cpu", help="CPU time of the process or wall time"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    return parser.parse_args(argv)


def build(mixin: str, preset: str, vocab: int, max_len: int, device: str) -> torch.nn.Module:
    """A full model composed from the real YAMLs (`mixin=…`, `model=…`), random weights, eval mode."""
    from archifactory.config.compose import compose

    cfg = compose([f"mixin={mixin}", f"model={preset}", f"trainer.seq_len={max_len}"])
    return build_model(cfg, vocab).to(device).eval()


def state_bytes(state: Any) -> int:
    """Bytes of every tensor reachable from a decode state (dataclasses, dicts, lists, tuples)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    if hasattr(state, "__dataclass_fields__"):
        return sum(state_bytes(getattr(state, name)) for name in state.__dataclass_fields__)
    return 0


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCK["cpu"]


@torch.inference_mode()
def time_cached(
    model, contexts: list[int], steps: int, warmup: int, vocab: int, device: str
) -> dict[int, tuple[float, int]]:
    """context -> (median seconds per decode step after a `context`-token prefill, state bytes after it).

    The contexts' decode steps are interleaved (one step at each context in turn), so a machine whose
    speed drifts during the measurement slows every context alike and the ratios between them hold.
    """
    outs, sizes, tokens, times = {}, {}, {}, {c: [] for c in contexts}
    for context in contexts:
        prompt = torch.randint(0, vocab, (1, context), device=device)
        outs[context] = model(prompt, state=model.init_state(1, device))
        sizes[context] = state_bytes(outs[context].state)
        tokens[context] = outs[context].logits[:, -1].argmax(-1, keepdim=True)
    for step in range(warmup + steps):
        for context in contexts:
            sync(device)
            start = clock()
            outs[context] = model(tokens[context], state=outs[context].state)
            tokens[context] = outs[context].logits[:, -1].argmax(-1, keepdim=True)
            sync(device)
            if step >= warmup:
                times[context].append(clock() - start)
    return {c: (statistics.median(times[c]), sizes[c]) for c in contexts}


@torch.inference_mode()
def time_uncached(model, context: int, steps: int, vocab: int, device: str) -> float:
    """Median seconds per new token when each one recomputes the full forward over the whole sequence."""
    ids = torch.randint(0, vocab, (1, context), device=device)
    times = []
    for step in range(steps + 1):  # the first is a warm-up
        sync(device)
        start = clock()
        token = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        ids = torch.cat([ids, token], dim=1)
        if step:
            times.append(clock() - start)
    return statistics.median(times)


@torch.inference_mode()
def time_mixed(model, args: argparse.Namespace) -> tuple[float, float]:
    """New tokens per second for `--mixed-prompts` prompts of distinct lengths: one left-padded batch,
    and one batch per length (greedy, no stop tokens, so every row makes `--mixed-new` tokens)."""
    lengths = [args.mixed_min + 4 * i for i in range(args.mixed_prompts)]
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (n,), generator=generator).tolist() for n in lengths]
    speeds = []
    for padding in ("left", "group"):
        generate(model, prompts[:2], 2, padding=padding)  # warm-up
        sync(args.device)
        start = clock()
        generate(model, prompts, args.mixed_new, padding=padding)
        sync(args.device)
        speeds.append(len(prompts) * args.mixed_new / (clock() - start))
    return speeds[0], speeds[1]


def measure(mixin: str, args: argparse.Namespace, contexts: list[int]) -> dict[str, Any]:
    mixed_len = args.mixed_min + 4 * args.mixed_prompts + args.mixed_new
    max_len = (
        max(contexts + [args.uncached_context, mixed_len])
        + args.warmup
        + args.steps
        + args.uncached_steps
        + 8
    )
    torch.manual_seed(0)
    model = build(mixin, args.model, args.vocab, max_len, args.device)
    row: dict[str, Any] = {"mixin": mixin, "backend": model.blocks[0].mixin.backend_name()}
    timed = time_cached(model, contexts, args.steps, args.warmup, args.vocab, args.device)
    for context, (seconds, size) in timed.items():
        row[f"tok_s_{context}"] = 1.0 / seconds
        row[f"state_mb_{context}"] = size / 2**20
        row[f"step_s_{context}"] = seconds
    row["flat"] = row[f"step_s_{contexts[-1]}"] / row[f"step_s_{contexts[0]}"]
    cached = timed[args.uncached_context][0] if args.uncached_context in timed else None
    if cached is None:
        cached = time_cached(model, [args.uncached_context], args.steps, args.warmup, args.vocab, args.device)
        cached = cached[args.uncached_context][0]
    uncached = time_uncached(model, args.uncached_context, args.uncached_steps, args.vocab, args.device)
    row["uncached_speedup"] = uncached / cached
    if args.mixed_prompts:
        row["mixed_batched_tok_s"], row["mixed_grouped_tok_s"] = time_mixed(model, args)
        row["mixed_ratio"] = row["mixed_batched_tok_s"] / row["mixed_grouped_tok_s"]
    return row


def markdown(rows: list[dict[str, Any]], contexts: list[int], uncached_context: int) -> str:
    head = ["mixin", "backend"]
    head += [f"decode tok/s @{c}" for c in contexts] + [f"state MB @{c}" for c in contexts]
    head += [f"flat × ({contexts[-1]}/{contexts[0]})", f"cached vs uncached @{uncached_context}"]
    mixed = "mixed_ratio" in rows[0]
    if mixed:
        head += ["mixed tok/s batched", "mixed tok/s grouped", "batched × grouped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for row in rows:
        cells = [row["mixin"], row["backend"]]
        cells += [f"{row[f'tok_s_{c}']:,.0f}" for c in contexts]
        cells += [f"{row[f'state_mb_{c}']:.3f}" for c in contexts]
        cells += [f"{row['flat']:.2f}", f"{row['uncached_speedup']:.1f}×"]
        if mixed:
            cells += [f"{row['mixed_batched_tok_s']:,.0f}", f"{row['mixed_grouped_tok_s']:,.0f}"]
            cells += [f"{row['mixed_ratio']:.1f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global clock
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = CLOCK["wall" if args.device.startswith("cuda") else args.clock]
    contexts = sorted(int(c) for c in args.contexts.split(","))
    mixins = args.mixins.split(",") if args.mixins else sorted(components("mixin"))
    rows = []
    for mixin in mixins:
        row = measure(mixin, args, contexts)
        rows.append(row)
        if not args.markdown:
            figures = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
            print(f"{mixin} ({row['backend']}): {figures}", flush=True)
    if args.markdown:
        print(markdown(rows, contexts, args.uncached_context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
