"""An unknown key names the nearest valid one and never Hydra's `+key` advice; `+key` cannot smuggle a typo
past the schemas (issue #30, item 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from archifactory.config.validation import unknown_key_message, unknown_keys
from tests.cli_helpers import run_cli
from tests.helpers import compose_config


@pytest.mark.parametrize(
    "override,message",
    [
        ("trainer.max_step=10", "unknown key trainer.max_step; did you mean trainer.max_steps?"),
        ("+trainer.max_step=10", "unknown key trainer.max_step; did you mean trainer.max_steps?"),
        ("++trainer.max_step=10", "unknown key trainer.max_step; did you mean trainer.max_steps?"),
        ("mixin.num_headz=2", "unknown key mixin.num_headz; did you mean mixin.num_heads?"),
        ("+mixin.num_headz=2", "unknown key mixin.num_headz; did you mean mixin.num_heads?"),
        ("+sed=1", "unknown key sed; did you mean seed?"),
    ],
)
def test_unknown_key_suggests_the_nearest_and_is_refused_with_plus(
    override: str, message: str, tmp_path: Path
) -> None:
    # a dataset path that does not exist: the key must be refused before the data is even looked at
    result = run_cli("train", "dataset=text", f"dataset.path={tmp_path / 'none'}", override, cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {message}"], result.stderr
    assert "+" not in lines[0] and "append" not in lines[0]
    outputs = tmp_path / "outputs"
    assert not outputs.exists() or not any(outputs.rglob("*.*")), "nothing written"


def test_unknown_appended_key_stops_a_sweep(tmp_path: Path) -> None:
    result = run_cli(
        "train", "-m", "+trainer.max_step=1,2", "dataset=text", "dataset.path=/no/such", cwd=tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: unknown key trainer.max_step; did you mean trainer.max_steps?"
    )
    assert not any(tmp_path.rglob("summary.json")), "no failed-job record for a typo"


def test_free_form_nodes_take_appended_keys_and_typed_ones_do_not() -> None:
    assert unknown_keys(compose_config(["+published.val_loss.gqa=1.0"])) == []
    assert unknown_keys(compose_config(["+model.layer_pattern=[gqa,{name: gqa, num_heads: 2}]"])) == []
    assert unknown_keys(compose_config(["+wandb.tags=1", "+dataset.pth=x"])) == [
        "unknown key dataset.pth; did you mean dataset.path?",
        "unknown key wandb.tags; wandb has: enabled, project, entity, mode, name",
    ]


def test_every_shipped_option_composes_without_unknown_keys() -> None:
    for override in ("dataset=mqar", "experiment=mad", "experiment=cpu_ablation", "dataset=chat_jsonl"):
        assert unknown_keys(compose_config([override])) == [], override


def test_message_without_a_close_key_lists_the_node() -> None:
    assert (
        unknown_key_message("trainer.zz", ["lr", "seed"]) == "unknown key trainer.zz; trainer has: lr, seed"
    )
