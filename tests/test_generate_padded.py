"""archifactory.generate over prompts of mixed lengths in one left-padded batch (issue 23): each row equals
the prompt generated alone (greedy), grouping by length gives the same tokens, sampling is reproducible
and does not depend on the batching."""

from __future__ import annotations

import pytest

from archifactory.core.errors import ArchiFactoryError
from archifactory.generate.sampling import generate
from tests.test_generate import prompts, tiny_model

LENGTHS = (37, 5, 20, 12)  # 4 lengths: pads up to 32 in one batch
# every registered mixin: tests/test_generate.py (a left-padded batch of 37, 70, 37, 5 == each prompt alone
# == grouped by length == the uncached oracle)


def test_padded_uncached_oracle_and_repetition_penalty_agree() -> None:
    model = tiny_model("gqa", "rwkv_cmix", "learned")
    rows = prompts(LENGTHS)
    options = {"max_new_tokens": 5, "repetition_penalty": 1.3}
    cached = [r.tokens for r in generate(model, rows, **options)]
    assert cached == [r.tokens for r in generate(model, rows, use_cache=False, **options)]
    assert cached == [generate(model, [row], **options)[0].tokens for row in rows]


def test_sampling_is_reproducible_and_independent_of_the_batching() -> None:
    model = tiny_model("swa")
    rows = prompts(LENGTHS)
    options = {"max_new_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 3}
    left = [r.tokens for r in generate(model, rows, **options)]
    assert left == [r.tokens for r in generate(model, rows, **options)]
    assert left == [r.tokens for r in generate(model, rows, padding="group", **options)]


def test_an_unknown_padding_mode_is_one_line() -> None:
    with pytest.raises(ArchiFactoryError, match="padding='right' is not one of left, group"):
        generate(tiny_model(), [[1, 2]], max_new_tokens=1, padding="right")
