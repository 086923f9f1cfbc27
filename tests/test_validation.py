"""The one config check: typed choices fail at compose time, ranges and relations before anything runs."""

from __future__ import annotations

import pickle

import pytest
from hydra.errors import ConfigCompositionException

from archifactory.config.compose import GROUPS, group_options
from archifactory.config.schema import Optimizer, Schedule, _choice_enum, component_options
from archifactory.config.validation import config_problems, validate_config
from archifactory.core.errors import ArchiFactoryError
from archifactory.train.optim import OPTIMIZERS
from archifactory.train.schedule import SCHEDULES
from tests.helpers import compose_config


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.optimizer=adamx", "trainer.optimizer"),
        ("trainer.schedule=linear", "trainer.schedule"),
        ("trainer.precision=fp16", "trainer.precision"),
        ("trainer.strategy=deepspeed", "trainer.strategy"),
        ("model.norm=batchnorm", "model.norm"),
        ("dataset.decode_errors=ignore", "dataset.decode_errors"),
        ("wandb.mode=sometimes", "wandb.mode"),
    ],
)
def test_a_choice_outside_its_enum_fails_at_compose_time(override: str, key: str) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    assert key in str(info.value.__cause__) and "expected one of" in str(info.value.__cause__)


def test_choices_read_as_plain_strings() -> None:
    cfg = compose_config(["trainer.optimizer=muon"])
    value = cfg.trainer.optimizer
    assert value == "muon" and str(value) == "muon" and f"{value}" == "muon" and hash(value) == hash("muon")
    assert pickle.loads(pickle.dumps(value)) is Optimizer.muon  # submitit pickles the config
    assert [c.value for c in Optimizer] == list(OPTIMIZERS)  # one list of names, two places
    assert [c.value for c in Schedule] == list(SCHEDULES)


def test_literal_component_options_become_enums() -> None:
    choice = _choice_enum(("auto", "sdpa", "reference"))
    assert choice["sdpa"] == "sdpa" and pickle.loads(pickle.dumps(choice.sdpa)) is choice.sdpa
    assert component_options({"name": "x", "backend": choice.sdpa}) == {"backend": "sdpa"}
    assert type(component_options({"name": "x", "backend": choice.sdpa})["backend"]) is str


@pytest.mark.parametrize("group", GROUPS)
def test_every_shipped_option_is_valid(group: str) -> None:
    for option in group_options(group):
        overrides = [f"{group}={option}"] + (["dataset=mqar"] if group == "mqar_cell" else [])
        assert config_problems(compose_config(overrides)) == [], overrides


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["trainer.lr=-0.001"], "trainer.lr=-0.001 must be > 0"),
        (["trainer.lr=0"], "trainer.lr=0.0 must be > 0"),
        (["trainer.eval_every=0"], "trainer.eval_every=0 must be >= 1"),
        (["trainer.log_every=0"], "trainer.log_every=0 must be >= 1"),
        (["trainer.checkpoint_every=0"], "trainer.checkpoint_every=0 must be >= 1"),
        (["trainer.max_steps=-5"], "trainer.max_steps=-5 must be >= 1"),
        (["trainer.beta2=1.0"], "trainer.beta2=1.0 must be in [0, 1)"),
        (["trainer.min_lr_ratio=2"], "trainer.min_lr_ratio=2.0 must be in [0, 1]"),
        (["trainer.device=gpu"], "trainer.device='gpu'"),
        (["trainer.eval_tokens=10"], "trainer.eval_tokens=10 is less than one window"),
        (["model.num_heads=0"], "model.num_heads=0 must be >= 1"),
        (
            ["model.hidden_size=100", "model.num_heads=3"],
            "model.hidden_size=100 is not divisible by model.num_heads=3",
        ),
        (
            ["positional=learned", "model.max_seq_len=16"],
            "model.max_seq_len=16 is shorter than trainer.seq_len=256",
        ),
        (["mixin.num_kv_heads=3"], "mixin.num_heads=4 is not divisible by mixin.num_kv_heads=3"),
        (["mixin.num_heads=3"], "model.hidden_size=128 is not divisible by mixin.num_heads=3"),
        (["ffn=moe", "ffn.top_k=9"], "ffn.top_k=9 is more than ffn.num_experts=8"),
        (["ffn=moe", "ffn.num_experts=0"], "ffn.num_experts=0 must be >= 1"),
        (["mixin=mamba2", "mixin.dt_min=0.5"], "mixin.dt_min=0.5 is larger than mixin.dt_max=0.1"),
        (["positional=rope", "positional.theta=-1"], "positional.theta=-1.0 must be > 0"),
        (["dataset.val_fraction=0.9"], "dataset.val_fraction=0.9 must be in (0, 0.5]"),
        (["dataset.vocab_size=100"], "dataset.vocab_size=100 is too small for byte-level BPE"),
        (["dataset.encoding=klingon"], "dataset.encoding='klingon' is not a known text encoding"),
    ],
)
def test_out_of_range_values_are_named(overrides: list[str], message: str) -> None:
    problems = config_problems(compose_config(overrides))
    assert any(message in problem for problem in problems), problems


def test_every_problem_is_reported_in_one_line() -> None:
    with pytest.raises(ArchiFactoryError) as info:
        validate_config(compose_config(["trainer.lr=-1", "model.num_heads=0", "trainer.log_every=0"]))
    line = str(info.value)
    assert "\n" not in line
    assert "trainer.lr" in line and "model.num_heads" in line and "trainer.log_every" in line


def test_documented_zero_values_are_allowed() -> None:
    cfg = compose_config(["trainer.grad_clip=0", "trainer.keep_checkpoints=0", "model.loss_chunk_size=0"])
    assert config_problems(cfg) == []
