"""archifactory.generate.sampling: cached decoding equals recomputation for every mixin; sampling and stopping."""

from __future__ import annotations

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.generate.sampling import Generation, generate, process_logits
from archifactory.model.build import build_model
from archifactory.model.stack import StackedMixinForCausalLM
from tests.helpers import compose_config

VOCAB = 101
# 37 and 70 are multiples of no chunk size (8, 32, 64); 70 crosses a 64-token chunk boundary
PROMPT_LENGTHS = (37, 70, 37, 5)
CASES = [(mixin, "swiglu") for mixin in sorted(components("mixin"))] + [("gqa", "rwkv_cmix")]


def tiny_model(mixin: str = "gqa", ffn: str = "swiglu", positional: str = "rope") -> StackedMixinForCausalLM:
    """2 layers, hidden 64, weights moved off their init so cached and uncached paths cannot agree by accident."""
    cfg = compose_config(
        [
            f"mixin={mixin}",
            f"ffn={ffn}",
            f"positional={positional}",
            "model.hidden_size=64",
            "model.num_heads=4",
            "model.num_layers=2",
            "trainer.seq_len=128",
        ]
    )
    model = build_model(cfg, VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.head_weight.mul_(20.0)  # sharper next-token distributions: no near-ties in greedy argmax
    return model.eval()


def prompts(lengths=PROMPT_LENGTHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("mixin,ffn", CASES)
def test_cached_greedy_equals_recomputing_the_full_forward(mixin: str, ffn: str) -> None:
    model = tiny_model(mixin, ffn)
    batch = prompts()
    cached = generate(model, batch, max_new_tokens=10)
    uncached = generate(model, batch, max_new_tokens=10, use_cache=False)
    assert [g.tokens for g in cached] == [g.tokens for g in uncached]
    assert all(len(g.tokens) == 10 and g.stop_reason == "length" for g in cached)
    # the left-padded batch of different lengths equals each prompt alone, and grouping by length
    for prompt, together in zip(batch, cached):
        assert generate(model, [prompt], max_new_tokens=10)[0].tokens == together.tokens
    grouped = generate(model, batch, max_new_tokens=10, padding="group")
    assert [g.tokens for g in grouped] == [g.tokens for g in cached]
    assert len({tuple(g.tokens) for g in cached}) > 1  # not one degenerate continuation for every prompt


@pytest.mark.parametrize("mixin,ffn", CASES)
def test_per_step_logits_match_the_full_forward(mixin: str, ffn: str) -> None:
    """Prefill + decode logits == the full forward's, for a batch of two 37-token prompts (one state of
    batch 2, as generate() runs an equal-length group) and for a 70-token prompt alone. In float64: the two
    paths sum in different orders, and in float32 their rounding alone reaches 1e-4 on logits of ~30 (cyfa,
    on some CPUs), while a wrong state moves them by far more than 1e-9."""
    model = tiny_model(mixin, ffn).double()
    for group in (prompts((37, 37)), prompts((70,), seed=2)):
        outs = generate(model, group, max_new_tokens=8)
        ids = torch.tensor([p + g.tokens for p, g in zip(group, outs)])
        length = len(group[0])
        with torch.no_grad():
            full = model(ids).logits[:, length - 1 :]  # the logits that chose each new token, and one more
            out = model(ids[:, :length], state=model.init_state(len(group)))
            stepped = [out.logits[:, -1]]
            for t in range(length, ids.shape[1]):
                out = model(ids[:, t : t + 1], state=out.state)
                stepped.append(out.logits[:, -1])
        torch.testing.assert_close(torch.stack(stepped, dim=1), full, rtol=1e-9, atol=1e-9)
        assert full[:, :-1].argmax(-1).tolist() == [g.tokens for g in outs]


def test_sampling_with_a_seed_is_reproducible() -> None:
    model = tiny_model()
    batch = prompts((9, 9, 14))
    options = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, seed=123)
    first = [g.tokens for g in generate(model, batch, **options)]
    assert [g.tokens for g in generate(model, batch, **options)] == first
    assert [g.tokens for g in generate(model, batch, **{**options, "seed": 124})] != first
    greedy = [g.tokens for g in generate(model, batch, max_new_tokens=16)]
    assert first != greedy  # hot sampling does leave the greedy path


def test_top_k_one_equals_greedy() -> None:
    model = tiny_model("rwkv6")
    batch = prompts((11, 4))
    greedy = [g.tokens for g in generate(model, batch, max_new_tokens=12)]
    for seed in range(3):
        sampled = generate(model, batch, max_new_tokens=12, temperature=2.0, top_k=1, seed=seed)
        assert [g.tokens for g in sampled] == greedy


class Letters:
    """A decoder for tests: token i is the letter chr(ord('a') + i % 26)."""

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(ord("a") + i % 26) for i in ids)


def test_stop_strings_and_stop_tokens_end_generation() -> None:
    model = tiny_model("mamba2")
    prompt = prompts((13,))[0]
    full = generate(model, [prompt], max_new_tokens=12, tokenizer=Letters())[0]
    assert full.stop_reason == "length" and full.text == Letters().decode(full.tokens)
    stop = full.text[5:7]  # two letters the greedy path produces at tokens 5-6
    ended = generate(model, [prompt], max_new_tokens=12, stop_strings=[stop], tokenizer=Letters())[0]
    cut = full.text.find(stop)
    assert ended.stop_reason == "stop_string"
    assert ended.tokens == full.tokens[: cut + 2]  # through the token that completed the stop string
    assert ended.text == full.text[:cut]  # the text is cut before it
    token = full.tokens[4]
    at = full.tokens.index(token)
    ended = generate(model, [prompt], max_new_tokens=12, stop_token_ids=[token])[0]
    assert ended.stop_reason == "stop_token" and ended.tokens == full.tokens[:at]


def test_a_finished_row_does_not_end_the_others() -> None:
    model = tiny_model("retnet")
    batch = prompts((8, 8))
    alone = [generate(model, [p], max_new_tokens=10)[0].tokens for p in batch]
    stop = alone[0][2]
    assert stop not in alone[1]
    out = generate(model, batch, max_new_tokens=10, stop_token_ids=[stop])
    assert out[0].tokens == alone[0][: alone[0].index(stop)] and out[0].stop_reason == "stop_token"
    assert out[1].tokens == alone[1] and out[1].stop_reason == "length"


def test_streaming_callback_sees_every_token_in_order() -> None:
    model = tiny_model("lstm")
    batch = prompts((6, 3, 6))
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    out = generate(model, batch, max_new_tokens=5, on_token=lambda row, tok: seen[row].append(tok))
    assert [seen[i] for i in range(3)] == [g.tokens for g in out]


def test_tensor_prompts_and_zero_new_tokens() -> None:
    model = tiny_model()
    ids = torch.tensor(prompts((7, 7)))
    assert [g.tokens for g in generate(model, ids, max_new_tokens=4)] == [
        g.tokens for g in generate(model, ids.tolist(), max_new_tokens=4)
    ]
    assert generate(model, ids[0], max_new_tokens=0) == [Generation([], None, "length", ids[0].tolist())]
    assert not model.training


def test_logit_processors_by_hand() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    seen = torch.tensor([[True, False, False, True]])
    # repetition penalty 2: seen positive logits halve, seen negative ones double
    assert process_logits(logits, seen, 0.0, None, None, 2.0).tolist() == [[1.0, 1.0, 0.0, -2.0]]
    top2 = process_logits(logits, None, 1.0, 2, None, 1.0)
    assert top2[0, :2].tolist() == [2.0, 1.0] and torch.isinf(top2[0, 2:]).all()
    p = logits.softmax(-1)[0]  # ≈ [0.644, 0.237, 0.087, 0.032]
    nucleus = process_logits(logits, None, 1.0, None, float(p[0] + p[1]) - 1e-3, 1.0)
    assert torch.isfinite(nucleus[0]).tolist() == [True, True, False, False]
    assert torch.isfinite(process_logits(logits, None, 1.0, None, 0.01, 1.0)[0]).tolist() == [
        True, False, False, False,
    ]  # fmt: skip
    assert process_logits(logits, None, 0.5, None, None, 1.0).tolist() == [[4.0, 2.0, 0.0, -2.0]]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"stop_strings": ["x"]}, "tokenizer"),
    ],
)
def test_bad_options_are_one_line(options: dict, message: str) -> None:
    model = tiny_model()
    with pytest.raises(ArchiFactoryError, match=message) as error:
        generate(model, [[1, 2]], **{"max_new_tokens": 3, **options})
    assert "\n" not in str(error.value)
    with pytest.raises(ArchiFactoryError, match="at least one token"):
        generate(model, [[]], max_new_tokens=3)


@pytest.mark.gpu
@pytest.mark.parametrize("mixin,ffn", CASES)
def test_cached_greedy_equals_the_full_forward_on_cuda(mixin: str, ffn: str) -> None:
    """On CUDA every mixin takes its fused path (backend=auto): decoding through the state still gives the
    tokens of recomputing the full forward, for prompts of different lengths."""
    model = tiny_model(mixin, ffn).cuda()
    batch = prompts()
    cached = generate(model, batch, max_new_tokens=10)
    assert [g.tokens for g in cached] == [g.tokens for g in generate(model, batch, 10, use_cache=False)]
