"""Forward + backward time of the sub-chunked per-channel scores against the plain pairwise decay.

Each case is the set of decayed score matrices one chunked layer builds per chunk (GLA/HGRN2: q·k; KDA: k·k
strict and q·k; RWKV-7: a·b and a·k with exclusive rows, q·b and q·k), on L chunks of C tokens with K
channels. The baseline materialises the pairwise [C, C, K] decay once per case and lets autograd
differentiate `decayed_scores` (the reference form of `reference/delta_rule.py`); ours is
`per_channel_scores` (sub-chunks, hand-written backward). Both run in the same process, interleaved, for
`--rounds` rounds; the table gives the median milliseconds, the ratio, and the largest difference of the
score values (the two are the same function).

    python scripts/bench_per_channel.py                  # L=4096 chunks of 16, K=64 (B=4, T=4096, H=4)
    python scripts/bench_per_channel.py --chunk-size 32 --markdown
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a script in the repository: run it without installing the package
    sys.path.insert(0, str(REPO))

from archifactory.model.mixins.reference.delta_rule import decayed_scores, pair_decay  # noqa: E402
from archifactory.model.mixins.reference.per_channel import (  # noqa: E402
    per_channel_scores,
    sub_chunk_length,
)

# case -> [(x names, y names, exclusive rows)], one entry per per_channel_scores call of that layer
CASES: dict[str, list[tuple[tuple[str, ...], tuple[str, ...], bool]]] = {
    "gla / hgrn2": [(("q",), ("k",), False)],
    "kda": [(("k", "q"), ("k",), False)],
    "rwkv7": [(("a",), ("b", "k"), True), (("q",), ("b", "k"), False)],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=4096, help="L: batch x heads x chunks")
    parser.add_argument("--chunk-size", type=int, default=16)
    parser.add_argument("--sub-chunk-size", type=int, default=None, help="default: about sqrt(chunk)")
    parser.add_argument("--width", type=int, default=64, help="K: key channels per head")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = parser.parse_args(argv)
    if min(args.chunks, args.chunk_size, args.width, args.rounds) < 1:
        parser.error("--chunks, --chunk-size, --width and --rounds must be >= 1")
    return args


def make_inputs(args: argparse.Namespace) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (args.chunks, args.chunk_size, args.width)
    named = {name: torch.randn(*shape, generator=generator) for name in "qkab"}
    named["g"] = -torch.rand(*shape, generator=generator) * 0.5
    return {name: t.requires_grad_() for name, t in named.items()}


def pairwise_case(inputs: dict[str, Tensor], calls: list) -> list[Tensor]:
    """Every score matrix of the case through the materialised [C, C, K] decay (shared per row kind)."""
    cum = inputs["g"].cumsum(-2)
    out = []
    for xs, ys, exclusive in calls:
        decay = pair_decay(cum - inputs["g"] if exclusive else cum, cum, strict=exclusive)
        out += [decayed_scores(inputs[x], inputs[y], decay) for x in xs for y in ys]
    return out


def sub_chunked_case(inputs: dict[str, Tensor], calls: list, sub: int) -> list[Tensor]:
    cum = inputs["g"].cumsum(-2)
    out = []
    for xs, ys, exclusive in calls:
        rows = cum - inputs["g"] if exclusive else cum
        scores = per_channel_scores(
            [inputs[x] for x in xs], [inputs[y] for y in ys], rows, cum, sub, exclusive
        )
        out += list(scores.flatten(0, 1).unbind(0))
    return out


def time_step(build: Callable[[], list[Tensor]], weights: list[Tensor]) -> float:
    """Seconds for one forward + backward of Σ w · scores."""
    start = time.perf_counter()
    loss = sum((w * s).sum() for w, s in zip(weights, build(), strict=True))
    loss.backward()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> list[dict[str, float | str]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    sub = sub_chunk_length(args.chunk_size, args.sub_chunk_size)
    if args.chunk_size % sub:
        raise SystemExit(f"error: --chunk-size {args.chunk_size} is not a multiple of the sub-chunk {sub}")
    inputs = make_inputs(args)
    rows = []
    for case, calls in CASES.items():
        with torch.no_grad():
            reference = pairwise_case(inputs, calls)
            ours = sub_chunked_case(inputs, calls, sub)
        difference = max((a - b).abs().max().item() for a, b in zip(reference, ours, strict=True))
        weights = [torch.randn_like(s) for s in reference]
        paths = {
            "pairwise": lambda calls=calls: pairwise_case(inputs, calls),
            "sub-chunked": lambda calls=calls: sub_chunked_case(inputs, calls, sub),
        }
        times: dict[str, list[float]] = {name: [] for name in paths}
        for build in paths.values():  # warm-up: first-call allocations
            time_step(build, weights)
        for _ in range(args.rounds):
            for name, build in paths.items():
                times[name].append(time_step(build, weights))
        pairwise_ms = statistics.median(times["pairwise"]) * 1e3
        ours_ms = statistics.median(times["sub-chunked"]) * 1e3
        rows.append(
            {
                "case": case,
                "pairwise ms": pairwise_ms,
                "sub-chunked ms": ours_ms,
                "speed-up": pairwise_ms / ours_ms,
                "max abs diff": difference,
            }
        )
    return rows


def render(rows: list[dict[str, float | str]], args: argparse.Namespace, markdown: bool) -> str:
    sub = sub_chunk_length(args.chunk_size, args.sub_chunk_size)
    header = (
        f"L={args.chunks} chunks of {args.chunk_size} (sub-chunks of {sub}), K={args.width}, "
        f"threads={torch.get_num_threads()}, median of {args.rounds} interleaved rounds (forward + backward)"
    )
    columns = list(rows[0])
    cells = [
        [row["case"], f"{row['pairwise ms']:.1f}", f"{row['sub-chunked ms']:.1f}", f"{row['speed-up']:.2f}x",
         f"{row['max abs diff']:.1e}"]
        for row in rows
    ]  # fmt: skip
    if markdown:
        lines = ["| " + " | ".join(columns) + " |", "|---|---:|---:|---:|---:|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
    else:
        widths = [max(len(columns[i]), *(len(c[i]) for c in cells)) for i in range(len(columns))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) for c in cells]
    return "\n".join([header, *lines])


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    args = parse_args(argv)
    rows = run(args)
    print(render(rows, args, args.markdown))
    return rows


if __name__ == "__main__":
    main()
