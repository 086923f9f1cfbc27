"""Training throughput: our gqa + swiglu + rope model vs transformers' LlamaForCausalLM of identical shape.

Both models get the same hidden size, layers, heads, KV heads, intermediate size, vocab, sequence length
and batch, untied embeddings, SDPA attention, fp32 on CPU (bf16 autocast on CUDA), and the same AdamW
step. Each measurement times full training steps (forward + backward + optimizer) after warmup steps. The
models alternate within every round (the order reversed every other round), so machine noise and drift hit
both alike; each round gives one ours ÷ Llama ratio per mode (eager, compiled), and the table reports the
median ratio over the rounds (>= 5 by default) with its spread (min–max).

    python scripts/bench_train.py                      # CPU, eager, 5 rounds
    python scripts/bench_train.py --compile            # adds the compiled pair (slow to compile on CPU)
    python scripts/bench_train.py --threads 1 --clock cpu   # CPU seconds of one thread: a shared machine
    python scripts/bench_train.py --compile --mixins gqa,mla,retnet,mamba2,rwkv6   # + compiled/eager per mixin
    python scripts/bench_train.py --device cuda --preset base125m --batch 16 --seq-len 1024 --compile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from archifactory.model.ffn.swiglu import SwiGLU
from archifactory.model.mixins.attention import GroupedQueryAttention
from archifactory.model.positional import RotaryPositional
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.train.runtime import peak_flops

PRESETS = {"tiny": (4, 128, 4), "small": (6, 384, 6), "base125m": (12, 768, 12)}


class LlamaAdapter(nn.Module):
    """Gives transformers' Llama our (input_ids, targets) -> loss calling convention."""

    def __init__(self, llama: nn.Module) -> None:
        super().__init__()
        self.llama = llama

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.llama(input_ids=input_ids).logits
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class OursAdapter(nn.Module):
    def __init__(self, model: StackedMixinForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, targets=targets, return_logits=False).loss


def build_pair(
    layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, seq_len: int
) -> tuple[nn.Module, nn.Module]:
    from transformers import LlamaConfig, LlamaForCausalLM

    ours = StackedMixinForCausalLM(
        num_layers=layers,
        hidden_size=hidden,
        vocab_size=vocab,
        mixin_module=functools.partial(
            GroupedQueryAttention, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads
        ),
        ffn_module=functools.partial(SwiGLU, hidden_size=hidden),
        positional_module=RotaryPositional(hidden, seq_len, theta=10000.0),
    )
    intermediate = ours.blocks[0].ffn.intermediate_size
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        attn_implementation="sdpa",
    )
    llama = LlamaForCausalLM(config)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_llama = sum(p.numel() for p in llama.parameters())
    assert n_ours == n_llama, f"shapes differ: ours {n_ours:,} vs llama {n_llama:,} parameters"
    return OursAdapter(ours), LlamaAdapter(llama)


def build_mixin_model(
    mixin: str, layers: int, hidden: int, heads: int, vocab: int, seq_len: int
) -> OursAdapter:
    """The model `archifactory train mixin=<mixin> ffn=swiglu positional=rope` builds at this shape."""
    from archifactory.config.compose import compose
    from archifactory.model.build import build_model

    overrides = [
        f"mixin={mixin}",
        "ffn=swiglu",
        "positional=rope",
        f"model.num_layers={layers}",
        f"model.hidden_size={hidden}",
        f"model.num_heads={heads}",
        f"model.max_seq_len={seq_len}",
        f"model.vocab_size={vocab}",
    ]
    cfg = compose(overrides)
    return OursAdapter(build_model(cfg, vocab))


def compile_blocks(model: OursAdapter) -> OursAdapter:
    """What `trainer.compile=true` does: torch.compile per block (the stack stays eager), on a copy."""
    compiled = copy.deepcopy(model)
    for block in compiled.model.blocks:
        block.compile()
    return compiled


def make_step(model: nn.Module, device: torch.device, use_bf16: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    )

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        with autocast():
            loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["wall"]


def time_steps(step, inputs, targets, device, steps: int) -> float:
    sync(device)
    start = clock()
    for _ in range(steps):
        step(inputs, targets)
    sync(device)
    return (clock() - start) / steps


def interleaved(
    steps: dict[str, Callable[[torch.Tensor, torch.Tensor], None]],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    device: torch.device,
    steps_per_round: int,
    rounds: int,
) -> dict[str, list[float]]:
    """Seconds per step of every variant in every round; the variants alternate within a round, in reverse
    order every other round, so a drift in machine load does not favour whichever runs first."""
    seconds: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else reversed(names):
            seconds[name].append(time_steps(steps[name], inputs, targets, device, steps_per_round))
    return seconds


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--kv-heads", type=int, default=None, help="default: the preset's heads (MHA)")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (the ratio's sample)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--mixins",
        default="",
        help="comma list: with --compile, a compiled/eager row per mixin (per-block compile, as trainer.compile)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall seconds, or the process's CPU seconds (CPU only: on a machine shared with other jobs, "
        "wall time mostly measures waiting for a core)",
    )
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    global clock
    clock = CLOCKS["wall" if device.type == "cuda" else args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    use_bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    layers, hidden, heads = PRESETS[args.preset]
    torch.manual_seed(0)
    ours, llama = (
        m.to(device)
        for m in build_pair(layers, hidden, heads, args.kv_heads or heads, args.vocab, args.seq_len)
    )
    flops_per_token = 3 * ours.model.flops_per_token(args.seq_len)
    variants = {"ours eager": ours, "llama eager": llama}
    if args.compile:
        variants |= {"ours compiled": torch.compile(ours), "llama compiled": torch.compile(llama)}
    inputs = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=device)
    targets = torch.roll(inputs, -1, dims=1)
    steps = {name: make_step(model, device, use_bf16) for name, model in variants.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step(inputs, targets)
    seconds = interleaved(steps, inputs, targets, device, args.steps, args.rounds)
    tokens = args.batch * args.seq_len
    peak = peak_flops(device)
    rows = []
    for mode in ("eager", "compiled") if args.compile else ("eager",):
        ours_s, llama_s = seconds[f"ours {mode}"], seconds[f"llama {mode}"]
        ratios = [llama / ours for ours, llama in zip(ours_s, llama_s)]  # > 1: ours is faster
        ours_tps = tokens / statistics.median(ours_s)
        rows.append(
            {
                "model": mode,
                "ours_tokens_per_second": ours_tps,
                "llama_tokens_per_second": tokens / statistics.median(llama_s),
                "ratio_median": statistics.median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "rounds": len(ratios),
                "mfu": (ours_tps * flops_per_token / peak) if peak else None,
            }
        )
    if args.compile and args.mixins:
        rows += mixin_rows(args, device, use_bf16, layers, hidden, heads, inputs, targets)
    print(
        f"device={device} preset={args.preset} batch={args.batch} seq_len={args.seq_len} vocab={args.vocab} "
        f"params={sum(p.numel() for p in ours.parameters()):,} (identical in both) clock={clock.__name__} "
        f"threads={torch.get_num_threads()}"
    )
    if args.markdown:
        if any("mixin" in r for r in rows):
            print("| mixin | eager tok/s | compiled tok/s | compiled / eager |\n|---|---:|---:|---:|")
        for r in (r for r in rows if "mixin" in r):
            print(
                f"| {r['mixin']} | {r['eager']:,.0f} | {r['compiled']:,.0f} | {r['compiled'] / r['eager']:.2f}× |"
            )
        print(
            "| mode | ours tok/s | Llama tok/s | ours ÷ Llama (median) | min–max | rounds | ours MFU |\n"
            "|---|---:|---:|---:|---:|---:|---:|"
        )
        for r in (r for r in rows if "model" in r):
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
            print(
                f"| {r['model']} | {r['ours_tokens_per_second']:,.0f} | {r['llama_tokens_per_second']:,.0f} | "
                f"{r['ratio_median']:.2f}× | {r['ratio_min']:.2f}–{r['ratio_max']:.2f} | {r['rounds']} | {mfu} |"
            )
    else:
        for r in (r for r in rows if "mixin" in r):
            print(
                f"{r['mixin']:<16} eager {r['eager']:>10,.0f}  compiled {r['compiled']:>10,.0f} tok/s  "
                f"{r['compiled'] / r['eager']:.2f}x"
            )
        for r in (r for r in rows if "model" in r):
            mfu = f"  mfu {r['mfu']:.1%}" if r["mfu"] is not None else ""
            print(
                f"{r['model']:<9} ours {r['ours_tokens_per_second']:>10,.0f}  llama "
                f"{r['llama_tokens_per_second']:>10,.0f} tok/s  ours/llama {r['ratio_median']:.2f}x median "
                f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f} over {r['rounds']} rounds){mfu}"
            )
    return rows


def mixin_rows(args, device, use_bf16, layers, hidden, heads, inputs, targets) -> list[dict]:
    """Per mixin: eager vs per-block compiled tokens/s of the same model, alternating in rounds."""
    rows = []
    tokens = args.batch * args.seq_len
    for mixin in args.mixins.split(","):
        torch.manual_seed(0)
        eager = build_mixin_model(mixin, layers, hidden, heads, args.vocab, args.seq_len).to(device)
        pair = {
            "eager": make_step(eager, device, use_bf16),
            "compiled": make_step(compile_blocks(eager), device, use_bf16),
        }
        start = time.perf_counter()
        for step in pair.values():
            for _ in range(args.warmup):
                step(inputs, targets)
        warmup_seconds = time.perf_counter() - start
        seconds = interleaved(pair, inputs, targets, device, args.steps, args.rounds)
        row = {name: tokens / statistics.median(times) for name, times in seconds.items()}
        rows.append({"mixin": mixin, **row, "warmup_seconds": warmup_seconds})
        print(
            f"{mixin}: eager {row['eager']:,.0f} tok/s, compiled {row['compiled']:,.0f} tok/s "
            f"({row['compiled'] / row['eager']:.2f}x; warmup incl. compile {warmup_seconds:.0f} s)",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
