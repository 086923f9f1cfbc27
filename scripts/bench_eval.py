"""lm-eval loglikelihood throughput: our adapter vs lm-eval's HFLM over transformers' LlamaForCausalLM.

Both models have the same shape (our gqa + swiglu + rope stack and a Llama with identical hidden size,
layers, heads, KV heads, intermediate size, vocab and context; equal parameter counts, asserted), the same
tokenizer (a byte-level BPE trained on the corpus; HFLM gets it as a PreTrainedTokenizerFast) and the very
same `Instance` requests, built from passages of the corpus:

- `mc`: MMLU-like — a passage as the question, four one-token answers " A".." D" (lm-eval's
  group-by-context trick applies to both sides);
- `cont`: HellaSwag-like — a passage and four different multi-token continuations.

Our weights are copied into the Llama (same function), so the benchmark also checks that both sides
score every request alike (`max |Δ logprob|` in the output; the requests are cut at word boundaries, where
lm-eval's split of context and continuation tokens and ours coincide).

Each round runs every workload through both models (alternating, so machine noise hits both alike); the
table reports the median requests/s and ours ÷ HFLM. Weights are random (not trained), fp32 on CPU, bf16 on
CUDA (HFLM's model cast to bf16, ours under bf16 autocast).

    python scripts/bench_eval.py ../shared/data/shakespeare --markdown
    python scripts/bench_eval.py --device cuda --layers 12 --hidden 768 --heads 12 --vocab 32768 --seq-len 1024
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance

from archifactory.data.tokenizer import train_bpe, transformers_tokenizer
from archifactory.eval.adapter import ArchiFactoryLM
from archifactory.model.ffn.swiglu import SwiGLU
from archifactory.model.mixins.attention import GroupedQueryAttention
from archifactory.model.positional import RotaryPositional
from archifactory.model.stack import StackedMixinForCausalLM


def build_models(layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, seq_len: int):
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
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ours.blocks[0].ffn.intermediate_size,
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
    llama.load_state_dict(llama_state_dict(ours))
    n_ours = sum(p.numel() for p in ours.parameters())
    n_llama = sum(p.numel() for p in llama.parameters())
    assert n_ours == n_llama, f"shapes differ: ours {n_ours:,} vs llama {n_llama:,} parameters"
    return ours.eval(), llama.eval(), n_ours


def llama_state_dict(ours: StackedMixinForCausalLM) -> dict[str, torch.Tensor]:
    """Our gqa + swiglu + rope weights under Llama's names (the fused qkv projection split in three): with
    them both models compute the same function, so lm-eval's HFLM and our adapter must agree."""
    state = {"model.embed_tokens.weight": ours.embedding.weight, "model.norm.weight": ours.final_norm.weight,
             "lm_head.weight": ours.lm_head.weight}  # fmt: skip
    for i, block in enumerate(ours.blocks):
        mixin, prefix = block.mixin, f"model.layers.{i}."
        q, k, v = mixin.qkv_proj.weight.split([mixin.hidden_size, mixin.kv_size, mixin.kv_size])
        state |= {
            prefix + "self_attn.q_proj.weight": q,
            prefix + "self_attn.k_proj.weight": k,
            prefix + "self_attn.v_proj.weight": v,
            prefix + "self_attn.o_proj.weight": mixin.out_proj.weight,
            prefix + "mlp.gate_proj.weight": block.ffn.gate_proj.weight,
            prefix + "mlp.up_proj.weight": block.ffn.up_proj.weight,
            prefix + "mlp.down_proj.weight": block.ffn.out_proj.weight,
            prefix + "input_layernorm.weight": block.mixin_norm.weight,
            prefix + "post_attention_layernorm.weight": block.ffn_norm.weight,
        }
    return {name: tensor.detach().clone() for name, tensor in state.items()}


def read_corpus(path: str, max_chars: int) -> str:
    """Up to `max_chars` of text from a file or a folder's .txt/.md/.py files (sorted)."""
    root = Path(path).expanduser()
    files = (
        [root]
        if root.is_file()
        else sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".txt", ".md", ".py"))
    )
    if not files:
        raise SystemExit(f"no .txt/.md/.py files under {path}")
    text = ""
    for file in files:
        text += file.read_text(errors="replace") + "\n"
        if len(text) >= max_chars:
            break
    return text[:max_chars]


def make_requests(text: str, questions: int, context_chars: int, seed: int) -> dict[str, list[Instance]]:
    """The two workloads: 4 requests per question, contexts and continuations cut from the corpus."""
    rng = random.Random(seed)
    workloads: dict[str, list[Instance]] = {"mc": [], "cont": []}
    for q in range(questions):
        start = rng.randrange(0, len(text) - context_chars - 400)
        context = text[start : start + rng.randint(context_chars // 2, context_chars)].strip() + "\nAnswer:"
        for letter in "ABCD":
            workloads["mc"].append(Instance("loglikelihood", {}, (context, f" {letter}"), idx=q))
        for _ in range(4):
            at = rng.randrange(0, len(text) - 200)
            workloads["cont"].append(
                Instance("loglikelihood", {}, (context, " " + text[at : at + 80].strip()), idx=q)
            )
    return workloads


def timed(fn, requests, device: torch.device) -> float:
    """Requests per second of one full pass."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn(requests)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(requests) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "corpus",
        nargs="?",
        default=str(Path(__file__).resolve().parents[1]),
        help="a text file, folder or glob (default: this repository's Python sources)",
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--questions", type=int, default=64)
    parser.add_argument("--context-chars", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    from lm_eval.models.huggingface import HFLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    text = read_corpus(args.corpus, 2_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_bpe([text], args.vocab, Path(tmp) / "bpe")
    ours, llama, params = build_models(args.layers, args.hidden, args.heads, args.kv_heads,
                                       tokenizer.vocab_size, args.seq_len)  # fmt: skip
    bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    ours_lm = ArchiFactoryLM(
        ours.to(device), tokenizer, args.seq_len, args.batch, autocast, show_progress=False
    )
    llama = llama.to(device, dtype=torch.bfloat16 if bf16 else torch.float32)
    hf_lm = HFLM(pretrained=llama, tokenizer=transformers_tokenizer(tokenizer), batch_size=args.batch,
                 max_length=args.seq_len, device=str(device))  # fmt: skip
    workloads = make_requests(text, args.questions, args.context_chars, seed=0)

    def hf_loglikelihood(requests):
        return hf_lm.loglikelihood(requests, disable_tqdm=True)

    rows = []
    for name, requests in workloads.items():
        speeds: dict[str, list[float]] = {"ours": [], "hflm": []}
        ours_scores = ours_lm.loglikelihood(requests)  # also the warm-up
        hf_scores = hf_loglikelihood(requests)
        delta = max(abs(a[0] - b[0]) for a, b in zip(ours_scores, hf_scores))
        greedy_agree = sum(a[1] == b[1] for a, b in zip(ours_scores, hf_scores)) / len(requests)
        for _ in range(args.rounds):
            speeds["ours"].append(timed(ours_lm.loglikelihood, requests, device))
            speeds["hflm"].append(timed(hf_loglikelihood, requests, device))
        ours_rps, hf_rps = statistics.median(speeds["ours"]), statistics.median(speeds["hflm"])
        rows.append({"workload": name, "requests": len(requests), "ours": ours_rps, "hflm": hf_rps,
                     "ratio": ours_rps / hf_rps, "max_delta": delta, "greedy_agree": greedy_agree})  # fmt: skip
    cut = sum(ours_lm.truncated.values())
    if cut:  # the two models are compared on whole requests only
        sys.exit(f"error: {cut} requests are longer than --seq-len {args.seq_len} tokens; raise --seq-len or lower "
                 "--context-chars")  # fmt: skip
    header = (
        f"{params:,} parameters each, {args.layers} layers x {args.hidden}, vocab {tokenizer.vocab_size}, "
    )
    header += f"seq {args.seq_len}, batch {args.batch}, {device}"
    if args.markdown:
        print(header + "\n")
        print("| workload | requests | ours req/s | HFLM (Llama) req/s | ours ÷ HFLM | max \\|Δ logprob\\| |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['workload']} | {r['requests']} | {r['ours']:,.1f} | {r['hflm']:,.1f} | {r['ratio']:.2f}× "
                  f"| {r['max_delta']:.1e} |")  # fmt: skip
    else:
        print(header)
        for r in rows:
            print(f"{r['workload']:<5} {r['requests']:>5} requests  ours {r['ours']:8.1f}/s  "
                  f"hflm {r['hflm']:8.1f}/s  ratio {r['ratio']:.2f}x  max|dlogprob| {r['max_delta']:.1e}  "
                  f"greedy agree {r['greedy_agree']:.0%}")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
