"""`list --params`: a pair with no shape ends in a hint naming what fixes it (issue #30, item 8)."""

from __future__ import annotations

import pytest

from archifactory.model.params_list import list_params, no_shape_hint


def test_no_shape_names_ffn_multiple_of_and_the_tolerance(capsys: pytest.CaptureFixture[str]) -> None:
    list_params(["model.target_params=1M", "mixin=rwkv7", "ffn=swiglu"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert "no shape of rwkv7/swiglu" in lines[-2]
    hint = lines[-1]
    assert hint.startswith("hint: 1 pair(s) have no shape")
    assert "ffn.multiple_of=8" in hint and "model.match_tolerance=0.05" in hint and "model.match" in hint


def test_the_named_fix_matches_the_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert list_params(["model.target_params=1M", "mixin=rwkv7", "ffn=swiglu", "ffn.multiple_of=8"]) == 0
    assert "hint:" not in capsys.readouterr().out, "ffn.multiple_of=8 is what fixes rwkv7/swiglu at 1M"


def test_no_hint_without_an_unmatched_pair() -> None:
    assert no_shape_hint([], []) is None
    assert no_shape_hint([{"mixin": "gqa", "ffn": "swiglu", "error": "something else"}], []) is None
    already = no_shape_hint(
        [{"mixin": "gqa", "ffn": "moe", "error": "no shape of gqa/moe"}], ["ffn.multiple_of=8"]
    )
    assert already is not None and "multiple_of" not in already
