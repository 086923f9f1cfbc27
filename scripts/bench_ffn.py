"""Step time and peak memory of `moe` (8 experts, top-2) against `swiglu` with the same active parameters.

One FFN layer, forward + backward of mean(y²) + the aux loss, on a [batch, seq, hidden] input. The default
`moe` config makes two experts exactly as wide as the default `swiglu`, so the rows compare equal active
FFN parameters (the MoE adds its router). Every MoE dispatch path is timed: grouped (`torch._grouped_mm`),
batched (padded bmm), loop (per-expert reference), and the compile-friendly static slot grid (`capacity`)
at capacity_factor 1.25 (`capacity@1.25`, may drop) and null (`capacity@null`: capacity = tokens, exact,
num_experts/top_k × the expert work).

Peak memory is the most bytes live during one step, parameters and gradients included: CUDA's
`max_memory_allocated`, or on CPU torch's dispatch-mode `MemTracker` (no CPU allocator statistics exist).

    python scripts/bench_ffn.py                       # CPU, hidden 256, 4 x 256 tokens
    python scripts/bench_ffn.py --device cuda --dtype bf16 --hidden 1024 --batch 8 --seq 2048
    python scripts/bench_ffn.py --markdown            # the table in docs/results.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from archifactory.model.ffn.moe import MoE
from archifactory.model.ffn.swiglu import SwiGLU

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads on CPU")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    return parser.parse_args(argv)


def step_fn(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        y, aux = module(x)
        loss = y.float().pow(2).mean() + aux.get("loss", 0.0)
        loss.backward()

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per step."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(step: Callable[[], None], module: nn.Module, x: torch.Tensor) -> float:
    """Peak MiB live during one step (parameters, gradients, activations, temporaries)."""
    if x.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(x.device)
        step()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) / 2**20
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except ImportError:  # private API; absent from some builds
        return float("nan")
    module.zero_grad(set_to_none=True)
    tracker = MemTracker()
    tracker.track_external(module, x)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[x.device]["Total"] / 2**20


def run(args: argparse.Namespace) -> list[dict[str, object]]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype)
    dense = SwiGLU(args.hidden, layer_idx=0).to(device, dtype)
    rows: list[tuple[str, str, nn.Module]] = [("swiglu", "-", dense)]
    for dispatch, factor in (
        ("grouped", None),
        ("batched", None),
        ("loop", None),
        ("capacity", 1.25),
        ("capacity", None),
    ):
        moe = MoE(
            args.hidden, layer_idx=0, num_experts=args.num_experts, top_k=args.top_k, dispatch=dispatch,
            capacity_factor=factor,
        )  # fmt: skip
        if len(rows) > 1:  # every dispatch path runs the same weights, hence the same routing
            moe.load_state_dict(rows[1][2].state_dict())
        label = f"{dispatch}@{'null' if factor is None else factor}" if dispatch == "capacity" else dispatch
        rows.append(("moe", label, moe.to(device, dtype)))
    results = []
    for name, dispatch, module in rows:
        step = step_fn(module, x)
        seconds = time_step(step, device, args.steps, args.warmup)
        results.append(
            {
                "ffn": name,
                "dispatch": dispatch,
                "active_params": module.active_parameters(),
                "total_params": sum(p.numel() for p in module.parameters()),
                "step_ms": 1000 * seconds,
                "peak_mb": peak_memory_mb(step, module, x),
            }
        )
    base = results[0]
    for row in results:
        row["time_ratio"] = row["step_ms"] / base["step_ms"]
        row["memory_ratio"] = row["peak_mb"] / base["peak_mb"]
    return results


def render(results: list[dict[str, object]], markdown: bool) -> str:
    header = ["ffn", "dispatch", "active params", "total params", "step ms", "× swiglu"]
    header += ["peak MiB", "× swiglu"]
    lines = []
    for r in results:
        lines.append(
            [
                str(r["ffn"]),
                str(r["dispatch"]),
                f"{r['active_params']:,}",
                f"{r['total_params']:,}",
                f"{r['step_ms']:.2f}",
                f"{r['time_ratio']:.2f}",
                f"{r['peak_mb']:.1f}",
                f"{r['memory_ratio']:.2f}",
            ]
        )
    if markdown:
        rows = [header, ["---"] * len(header), *lines]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)
    widths = [max(len(row[i]) for row in [header, *lines]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *lines])


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    args = parse_args(argv)
    results = run(args)
    print(
        f"device={args.device} dtype={args.dtype} hidden={args.hidden} tokens={args.batch}x{args.seq} "
        f"experts={args.num_experts} top_k={args.top_k} torch={torch.__version__}"
    )
    print(render(results, args.markdown))
    return results


if __name__ == "__main__":
    main()
