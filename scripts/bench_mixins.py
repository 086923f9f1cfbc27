"""Training-step throughput and peak memory of every registered mixin, as ratios to gqa.

Each mixin is built through its own YAML (`configs/mixin/<name>.yaml`, Hydra compose) as a full model
(embedding, rope, N × [mixin + swiglu], head; vocab 8192 by default) and timed on forward + backward of
the LM loss (no optimizer step). Every (mixin, seq_len) runs in a fresh subprocess so that its memory
figure is its own:

- tokens/s: batch × seq_len × steps / wall time of `steps` full-size steps, after one warm-up step at
  a short length (first-call costs: lazy imports, kernel selection, Triton compilation on CUDA);
- peak MB, CPU: the rise of the process's resident-set high-water mark (Linux VmHWM, reset just before
  the timed steps through /proc/self/clear_refs) over its resident size at that moment, so it counts
  activations, gradients and temporaries of the step, not the interpreter, the libraries or the weights;
  without /proc it falls back to ru_maxrss (a lifetime peak, so an over-estimate for small runs);
- peak MB, CUDA: torch.cuda.max_memory_allocated() over memory_allocated() at the same point.

Every mixin runs at `backend=auto`, the path a training run takes: on CPU that is SDPA for gqa/mla and
the plain-PyTorch chunked reference for retnet/rwkv6/mamba2 (lstm/rnn use torch's fused kernels). The
baseline is gqa at that backend; a `gqa/reference` row (explicit fp32 softmax) is added for context. On a
GPU use `--device cuda` (auto = fused kernels, bf16 autocast), or `--backend reference` to compare the
references. An entry `name/backend` in `--mixins` forces one mixin's backend. Usage:

    python scripts/bench_mixins.py                       # T=512 and T=4096, hidden 256, 4 layers, batch 8
    python scripts/bench_mixins.py --quick               # T=128, batch 2: a minute or two
    python scripts/bench_mixins.py --mixins gqa,mla --seq-lens 1024 --markdown
    python scripts/bench_mixins.py --device cuda --backend fused --steps 10
    python scripts/bench_mixins.py --mixins gqa,mamba2+mamba2+gqa   # an entry a+b+… is a hybrid layer pattern
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # a script in the repository: run it without installing the package
    sys.path.insert(0, str(REPO))

BASELINE = "gqa"
# a hybrid row: an entry `a+b+…` is `model.layer_pattern=[a,b,…]` (three Gated DeltaNet layers, then attention)
DEFAULT_HYBRID = "gated_deltanet+gated_deltanet+gated_deltanet+gqa"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", default="512,4096", help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument(
        "--steps", type=int, default=1, help="timed steps per configuration (after a warm-up)"
    )
    parser.add_argument(
        "--mixins", default=None, help="comma-separated subset (default: every registered one)"
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument(
        "--backend",
        default=None,
        help="mixin backend for every entry (default auto: what a training run uses)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per configuration")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--quick", action="store_true", help="T=128, batch 2: a fast smoke run")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.batch = "128", 2
    if args.backend is None:
        args.backend = "auto"
    return args


def select_mixins(requested: str | None) -> list[str]:
    """The baseline first (gqa at its run-time backend), then gqa's materialised-softmax reference for
    context, then every registered mixin (or the requested ones) in name order. An entry `name/backend`
    forces that mixin's backend."""
    from archifactory.core.registry import components

    registered = sorted(components("mixin"))
    names = registered if requested is None else [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in names if any(part.split("/")[0] not in registered for part in n.split("+"))]
    if unknown:
        raise SystemExit(f"unknown mixin(s) {', '.join(unknown)}; registered: {', '.join(registered)}")
    rest = [n for n in names if n != BASELINE]
    context = [f"{BASELINE}/reference"] if requested is None else []
    hybrid = [DEFAULT_HYBRID] if requested is None else []
    return [BASELINE, *context, *rest, *hybrid]


def compose(spec: dict[str, Any]) -> Any:
    """The run config of one benchmark configuration, composed from the real YAMLs."""
    from archifactory.config.compose import composer

    pattern = spec["mixin"].split("+")
    overrides = [
        f"mixin={pattern[0]}",
        *([f"model.layer_pattern=[{','.join(pattern)}]"] if len(pattern) > 1 else []),
        f"model.hidden_size={spec['hidden']}",
        f"model.num_layers={spec['layers']}",
        f"model.num_heads={spec['heads']}",
        f"model.vocab_size={spec['vocab']}",
        f"trainer.seq_len={spec['seq_len']}",
    ]
    with composer() as hydra_compose:
        cfg = hydra_compose(overrides)
        if "backend" in cfg.mixin:
            cfg = hydra_compose([*overrides, f"mixin.backend={spec['backend']}"])
    return cfg


def resident_mb() -> float | None:
    """Current resident set size (Linux /proc), in MB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one model, warm up, time `steps` forward+backward steps, measure the step's peak memory."""
    import torch

    from archifactory.model.build import build_model

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    model = build_model(compose(spec), vocab_size=spec["vocab"]).to(device)
    batch, seq_len = spec["batch"], spec["seq_len"]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    def step(length: int) -> None:
        ids = torch.randint(0, spec["vocab"], (batch, length), device=device)
        with autocast:
            loss = model(ids, targets=ids, return_logits=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)

    step(min(seq_len, 128))
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        exact = reset_peak_rss()
        base = resident_mb() if exact else 0.0
    start = time.perf_counter()
    for _ in range(spec["steps"]):
        step(seq_len)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if cuda else peak_rss_mb() - (base or 0.0)
    params = sum(p.numel() for b in model.blocks for p in b.mixin.parameters())
    return {
        "tokens_per_s": batch * seq_len * spec["steps"] / seconds,
        "peak_mb": peak,
        "mixin_params": params,
        "backend": "/".join(dict.fromkeys(b.mixin.backend_name() for b in model.blocks)),
    }


def measure(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; {"error": ...} when it fails or times out."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        return {"error": "killed (out of memory?)" if done.returncode in (-9, 137) else tail}
    return json.loads(lines[-1])


def format_table(results: dict[str, dict[int, dict[str, Any]]], seq_lens: list[int], markdown: bool) -> str:
    header = ["mixin", "backend", "mixin params"]
    for t in seq_lens:
        header += [f"T={t} tok/s", f"×{BASELINE}", f"T={t} peak MB", f"×{BASELINE}"]
    rows = []
    for name, by_len in results.items():
        first = next((r for r in by_len.values() if "error" not in r), {})
        row = [name, first.get("backend", "-"), f"{first['mixin_params'] / 1e6:.2f}M" if first else "-"]
        for t in seq_lens:
            r, base = by_len[t], results[BASELINE][t]
            if "error" in r:
                row += ["failed", "-", "-", "-"]
                continue
            row.append(f"{r['tokens_per_s']:,.0f}")
            row.append(_ratio(r["tokens_per_s"], base.get("tokens_per_s")))
            row.append(f"{r['peak_mb']:,.0f}")
            row.append(_ratio(r["peak_mb"], base.get("peak_mb")))
        rows.append(row)
    if markdown:
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---:" if i > 1 else "---" for i in range(len(header))) + "|",
        ]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    fmt = lambda row: "  ".join(
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
    )
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}" if base and math.isfinite(base) and base > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_worker(json.loads(args.worker))))
        return 0
    seq_lens = [int(t) for t in args.seq_lens.split(",")]
    mixins = select_mixins(args.mixins)
    common = {
        "batch": args.batch,
        "hidden": args.hidden,
        "layers": args.layers,
        "heads": args.heads,
        "vocab": args.vocab,
        "steps": args.steps,
        "device": args.device,
        "backend": args.backend,
        "threads": args.threads,
    }
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for name in mixins:
        results[name] = {}
        for seq_len in seq_lens:
            start = time.perf_counter()
            mixin, _, forced = name.partition("/")
            result = measure(
                {**common, "mixin": mixin, "seq_len": seq_len, "backend": forced or args.backend},
                args.timeout,
            )
            results[name][seq_len] = result
            outcome = (
                result.get("error") or f"{result['tokens_per_s']:,.0f} tok/s, {result['peak_mb']:,.0f} MB"
            )
            print(f"  {name} T={seq_len}: {outcome} ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    print(
        f"device={args.device} backend={args.backend} hidden={args.hidden} layers={args.layers} "
        f"heads={args.heads} batch={args.batch} vocab={args.vocab} steps={args.steps} (forward+backward; "
        "peak MB = the step's rise in peak memory)"
    )
    print(format_table(results, seq_lens, args.markdown))
    failures = [(n, t, r["error"]) for n, by in results.items() for t, r in by.items() if "error" in r]
    for name, seq_len, error in failures:
        print(f"{name} T={seq_len} failed: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
