"""tests/helpers.py's compose_config (group choices composed once, value overrides applied afterwards by
Hydra's override step) == a plain Hydra compose of the same overrides: configs, and the refusals."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from archifactory.config.compose import compose
from tests import helpers
from tests.helpers import compose_config

SAME = [
    ["mixin=moba", "positional=rope", "model.hidden_size=32", "model.num_heads=4", "mixin.block_size=4"],
    ["mixin=mla", "mixin.norm_eps=1e-6", "mixin.q_lora_rank=24", "positional.theta=500.0"],  # a float as 1e-6
    ["mixin=wall_attn", "mixin.window_size=6", "mixin.qk_norm=true", "mixin.num_kv_heads=null"],
    ["mixin.chunk_size=4", "mixin=gla", "model.num_layers=3"],  # a value before its group: applied after
    ["mixin=path_attn", "model.num_layers=3", "model.layer_pattern=[path_attn,{name:swa,window:8},mla]"],
    # config.yaml's own choices named and groups in another order: the composition of `mixin=rwkv6` alone
    ["positional=rope", "model.hidden_size=32", "ffn=swiglu", "mixin=rwkv6", "model=tiny"],
    # an experiment choosing trainer=cpu: the named trainer=default (config.yaml's choice) still wins over it
    ["experiment=cpu_ablation", "trainer=default", "mixin=gqa"],
    # top-level values (no config group of that name): applied to the composition of `mixin=rwkv6` alone
    ["mixin=rwkv6", "seed=3", "run_name=my_run", "init_from=/runs/pretrained", "experiment_name=abl"],
    # a mixin beside other choices: the mixin's node put into the composition of the others
    [
        "mixin=kda",
        "dataset=text",
        "model=tiny",
        "trainer=smoke",
        "model.hidden_size=64",
        "mixin.expand_v=2.0",
    ],
    [
        "ffn=moe",
        "mixin=path_attn",
        "model.num_layers=3",
        "model.layer_pattern=[path_attn,{name:swa,window:8}]",
    ],
    ["mixin=rwkv7", "positional=none", "residual=mhc", "mixin.num_heads=${model.num_heads}"],
]


@pytest.mark.parametrize("overrides", SAME, ids=lambda o: o[0])
def test_equals_a_plain_compose(overrides: list[str]) -> None:
    mine, plain = compose_config(overrides), compose(overrides)
    assert OmegaConf.to_container(mine) == OmegaConf.to_container(plain)
    assert OmegaConf.is_struct(mine)  # an unknown key still fails on the returned config


@pytest.mark.parametrize(
    "overrides",
    [
        ["trainer.strategy=deepspeed"],
        ["mixin=gqa", "mixin.no_such_option=1"],
        ["mixin=rwkv6", "positional=none", "mixin.no_such_option=1"],  # the mixin's schema on its node put in
        ["mixin=gla", "ffn=moe", "mixin.chunk_size=wide"],
        ["model.hidden_size=32,64"],
        ["mixin=gqa", "no_such_key=1"],
        ["seed=three"],
    ],
    ids=[
        "enum",
        "unknown key",
        "unknown key of a mixin put in",
        "type of a mixin put in",
        "sweep",
        "unknown top-level key",
        "top-level type",
    ],
)
def test_refuses_as_a_plain_compose(overrides: list[str]) -> None:
    with pytest.raises(ConfigCompositionException) as plain:
        compose(overrides)
    with pytest.raises(ConfigCompositionException) as mine:
        compose_config(overrides)
    assert str(mine.value) == str(plain.value) and str(mine.value.__cause__) == str(plain.value.__cause__)


def test_workers_share_each_composition_through_the_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helpers, "_shared", [])
    helpers.share_compositions(tmp_path)
    compose_once = helpers._composed_choices.__wrapped__  # without this process's own cache
    choices = ("positional=alibi", "residual=mhc")
    written = compose_once(choices)  # composed here and written for the other workers
    (path,) = tmp_path.glob("*.pickle")
    assert pickle.loads(written).residual.name == "mhc" and path.read_bytes() == written
    path.write_bytes(pickle.dumps(compose(["mixin=gqa"])))  # as if another worker had written it
    assert pickle.loads(compose_once(choices)).mixin.name == "gqa"  # read back, not composed again
