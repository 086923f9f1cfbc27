"""`list --params`: a pair with no shape ends in a hint naming what fixes it (issue #30, item 8)."""

from __future__ import annotations

import pytest

from archifactory.model.params_list import list_params, no_shape_hint

# ±0.1%: the FFN width in steps of 16 (down to 4) cannot land gqa/swiglu at 1M, steps of 4 (down to 1) can
STRICT = ["model.target_params=1M", "mixin=gqa", "ffn=swiglu", "model.match_tolerance=0.001"]


def test_no_shape_names_the_match_step_and_the_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    list_params(STRICT)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "no shape of gqa/swiglu" in lines[-2]
    hint = lines[-1]
    assert hint.startswith("hint: 1 pair(s) have no shape")
    assert (
        "model.match_multiple_of=4" in hint and "model.match_tolerance=0.05" in hint and "model.match" in hint
    )


def test_the_named_fix_matches_the_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert list_params([*STRICT, "model.match_multiple_of=4"]) == 0
    assert "hint:" not in capsys.readouterr().out, (
        "model.match_multiple_of=4 is what fixes gqa/swiglu at ±0.1%"
    )


def test_no_hint_without_an_unmatched_pair() -> None:
    assert no_shape_hint([], []) is None
    assert no_shape_hint([{"mixin": "gqa", "ffn": "swiglu", "error": "something else"}], []) is None
    already = no_shape_hint(
        [{"mixin": "gqa", "ffn": "moe", "error": "no shape of gqa/moe"}], ["model.match_multiple_of=4"]
    )
    assert already is not None and "multiple_of" not in already
