"""The lm-eval adapter against hand computations: loglikelihood, is_greedy, rolling windows, truncation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from archifactory.eval.adapter import ArchiFactoryLM
from archifactory.eval.scoring import score_continuations
from archifactory.model.build import build_model
from tests.eval.conftest import tiny_model
from tests.helpers import compose_config


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def hand_logprob(model, context: list[int], continuation: list[int]) -> float:
    """Sum of log-softmax at the continuation tokens, from the model's full logits."""
    ids = torch.tensor([context + continuation[:-1]])
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids).logits[0].double(), dim=-1)
    start = len(context) - 1
    return sum(float(logprobs[start + i, tok]) for i, tok in enumerate(continuation))


def greedy_tokens(model, context: list[int], count: int) -> list[int]:
    ids = list(context)
    with torch.no_grad():
        for _ in range(count):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(context) :]


@pytest.fixture
def lm(tokenizer) -> ArchiFactoryLM:
    return ArchiFactoryLM(tiny_model(tokenizer.vocab_size), tokenizer, max_length=64, batch_size=3,
                          show_progress=False)  # fmt: skip


def test_loglikelihood_equals_hand_sum_of_log_softmax(lm: ArchiFactoryLM, tokenizer) -> None:
    enc = tokenizer.encode
    cases = [
        ("the cat sat on", " the mat.", enc("the cat sat on"), enc(" the mat.")),
        # trailing space moves to the continuation (lm-eval's convention)
        ("the dog ran ", "over", enc("the dog ran"), enc(" over")),
        # the boundary inside a BPE merge: "the ma" + "t" is tokenized as "the" + " mat", so the token
        # " mat" is what gets scored, conditioned on "the"
        ("the ma", "t", enc("the"), enc(" mat")),
        # empty context: conditioned on EOS
        ("", "the king", [tokenizer.eos_id], enc("the king")),
    ]
    assert enc("the ma") != enc("the") + enc(" m") and enc(" mat") == [tokenizer.backend.token_to_id("Ġmat")]
    results = lm.loglikelihood(requests("loglikelihood", [(c, x) for c, x, _, _ in cases]))
    for (context, continuation, ctx_ids, cont_ids), (logprob, _) in zip(cases, results):
        expected = hand_logprob(lm.model, ctx_ids, cont_ids)
        assert logprob == pytest.approx(expected, abs=1e-4), (context, continuation)
        assert logprob < 0


def test_is_greedy(lm: ArchiFactoryLM, tokenizer) -> None:
    context = tokenizer.encode("the queen said to")
    greedy = greedy_tokens(lm.model, context, 3)
    other = [t for t in range(5, 50) if t != greedy[1]][0]
    not_greedy = [greedy[0], other, greedy[2]]
    scored = score_continuations(lm.model, [(context, greedy), (context, not_greedy)], 64, batch_size=2)
    assert scored[0][1] is True and scored[1][1] is False
    assert scored[0][0] == pytest.approx(hand_logprob(lm.model, context, greedy), abs=1e-4)
    assert scored[1][0] == pytest.approx(hand_logprob(lm.model, context, not_greedy), abs=1e-4)


def test_rolling_loglikelihood_equals_summed_loss(lm: ArchiFactoryLM, tokenizer) -> None:
    text = "the big dog sat on the red mat. then the bird sang."
    ids = tokenizer.encode(text)
    inputs = torch.tensor([[tokenizer.eos_id, *ids[:-1]]])
    with torch.no_grad():
        out = lm.model(inputs, targets=torch.tensor([ids]))
    expected = -float(out.lm_loss) * len(ids)  # the model's summed loss over the text, after EOS
    (result,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert result == pytest.approx(expected, rel=1e-5)


def test_rolling_windows_each_token_once_with_full_context(tokenizer) -> None:
    """A document longer than max_length: lm-eval's disjoint rolling windows (context_len=1). Window 1 is
    EOS + t0..t6 predicting t0..t7; window 2 is t7..t14 predicting t8..t15; the last window keeps a full
    8-token input (t11..t18) and scores only t16..t19."""
    model = tiny_model(tokenizer.vocab_size)
    lm = ArchiFactoryLM(model, tokenizer, max_length=8, batch_size=2, show_progress=False)
    ids = tokenizer.encode(" ".join(["the cat sat on the mat."] * 3))[:20]
    text = tokenizer.decode(ids)
    assert tokenizer.encode(text) == ids
    expected = hand_logprob(model, [tokenizer.eos_id], ids[:8])
    expected += hand_logprob(model, ids[7:8], ids[8:16])
    expected += hand_logprob(model, ids[11:16], ids[16:20])
    (result,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert result == pytest.approx(expected, abs=1e-4)
    assert lm.truncated == {"loglikelihood_rolling": 0}


def test_left_truncation_is_counted_and_keeps_the_last_tokens(tokenizer) -> None:
    model = tiny_model(tokenizer.vocab_size)
    lm = ArchiFactoryLM(model, tokenizer, max_length=8, batch_size=4, show_progress=False)
    context = "the cat sat on the mat. the dog ran over the tree."
    ctx_ids, cont_ids = tokenizer.encode(context), tokenizer.encode(" then")
    assert len(ctx_ids) + len(cont_ids) > 9
    (result,) = lm.loglikelihood(requests("loglikelihood", [(context, " then")]))
    kept = (ctx_ids + cont_ids)[-9:]
    assert result[0] == pytest.approx(hand_logprob(model, kept[: -len(cont_ids)], cont_ids), abs=1e-4)
    short = lm.loglikelihood(requests("loglikelihood", [("the cat", " sat")]))
    assert short[0][0] < 0
    assert lm.truncated == {"loglikelihood": 1}


def test_choices_share_one_forward_and_batches_do_not_change_scores(tokenizer) -> None:
    """Four one-token answers after one question are one forward row; batch size and padding change
    nothing (right padding cannot reach earlier positions of a causal model)."""
    model = tiny_model(tokenizer.vocab_size)
    question = "the king said to the queen: A. cat B. dog C. bird D. tree Answer:"
    args = [(question, f" {c}") for c in "ABCD"] + [("the red", " bird sang."), ("the bird", " sang on")]
    one = ArchiFactoryLM(model, tokenizer, max_length=64, batch_size=1, show_progress=False)
    many = ArchiFactoryLM(model, tokenizer, max_length=64, batch_size=8, show_progress=False)
    a = one.loglikelihood(requests("loglikelihood", args))
    b = many.loglikelihood(requests("loglikelihood", args))
    assert one.stats["loglikelihood"].rows == 3
    for (x, gx), (y, gy) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5) and gx == gy
    assert len({round(x, 6) for x, _ in a[:4]}) == 4  # the four answers really differ


@pytest.mark.parametrize("mixin", ["rwkv6", "mamba2", "lstm"])
def test_padding_invariance_for_recurrent_mixins(tokenizer, mixin: str) -> None:
    cfg = compose_config([f"mixin={mixin}", "model=tiny", "model.hidden_size=64", "model.num_layers=2",
                          "model.num_heads=2", "trainer.seq_len=32"])  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer.vocab_size).eval()
    args = [("the cat sat on the mat. the dog", " ran."), ("the", " king")]
    pairs = [(tokenizer.encode(c), tokenizer.encode(x)) for c, x in args]
    batched = score_continuations(model, pairs, 32, batch_size=2)
    alone = [score_continuations(model, [p], 32, batch_size=1)[0] for p in pairs]
    for (x, _), (y, _), (ctx, cont) in zip(batched, alone, pairs):
        assert x == pytest.approx(y, abs=1e-4)
        assert x == pytest.approx(hand_logprob(model, ctx, cont), abs=1e-4)


def test_continuation_longer_than_the_model_is_refused(tokenizer) -> None:
    from archifactory.core.errors import ArchiFactoryError

    model = tiny_model(tokenizer.vocab_size)
    with pytest.raises(ArchiFactoryError, match="max_seq_len"):
        score_continuations(model, [([0], list(range(1, 20)))], 8, batch_size=1)
