"""The recipes in configs/experiment/ say what their docs say: shapes, budgets, matching, published figures."""

from __future__ import annotations

import torch

from archifactory.model.build import build_model
from archifactory.model.match import apply_match
from archifactory.train.schedule import plan_steps
from tests.helpers import compose_config


def test_seed_tinystories_is_the_seed_setup() -> None:
    cfg = compose_config(["experiment=seed_tinystories"])
    with torch.device("meta"):
        model = build_model(cfg, 32768)
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.trainer.seq_len) == (512, 8, 256)
    assert model.blocks[0].ffn.intermediate_size == 2048
    assert cfg.dataset.name == "tinystories" and cfg.dataset.tokenizer == "mistralai/Mistral-7B-v0.3"
    steps, accum = plan_steps(cfg, world_size=1)
    assert cfg.trainer.batch_tokens == 98304 and accum * cfg.trainer.micro_batch_size * 256 == 98304
    assert steps == 1_000_000_000 // 98304
    assert dict(cfg.published.val_loss) == {
        "gqa": 1.0096,
        "mamba2": 1.0486,
        "retnet": 1.0622,
        "rwkv6": 1.0644,
    }


def test_tinystories_1m_is_a_matched_30m_model() -> None:
    cfg, match = apply_match(compose_config(["experiment=tinystories_1m"]))
    assert cfg.dataset.max_documents == 1_000_000
    with torch.device("meta"):
        total = build_model(cfg, cfg.dataset.vocab_size).parameter_breakdown()["total"]
    assert abs(match.error) <= 0.02 and 25e6 < total < 32e6


def test_cpu_ablation_sweeps_four_matched_mixins_over_two_seeds() -> None:
    from hydra import compose, initialize_config_dir

    from archifactory.config.compose import config_dir

    compose_config()  # registers the schemas
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("config", ["experiment=cpu_ablation", "dataset.path=unused"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params.mixin.split(",") == ["gqa", "retnet", "mamba2", "rwkv6"] and params.seed == "0,1"
    for mixin in params.mixin.split(","):
        _, match = apply_match(
            compose_config(["experiment=cpu_ablation", "dataset.path=unused", f"mixin={mixin}"])
        )
        assert abs(match.error) <= 0.02 and match.shape.num_layers == 4
