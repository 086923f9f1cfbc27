"""The study recipes say what docs/study.md says: the sweep, matching within ±1%, the stages' settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from archifactory.model.match import apply_match
from archifactory.study.run import parse_study_args
from tests.helpers import compose_config

REPO = Path(__file__).resolve().parents[2]


def sweeper_params(overrides: list[str]) -> dict[str, str]:
    from hydra import compose, initialize_config_dir

    from archifactory.config.compose import config_dir

    compose_config()  # registers the schemas
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return dict(compose("config", overrides, return_hydra_config=True).hydra.sweeper.params)


def test_seed_protocol_cpu_is_four_matched_mixins_two_seeds_sft_and_perplexity() -> None:
    base = ["experiment=seed_protocol_cpu", "dataset.path=unused"]
    params = sweeper_params(base)
    assert params["mixin"].split(",") == ["gqa", "retnet", "mamba2", "rwkv6"] and params["seed"] == "0,1"
    for mixin in params["mixin"].split(","):
        _, match = apply_match(compose_config([*base, f"mixin={mixin}"]))
        assert abs(match.error) <= 0.01 and match.target == 500_000
    spec = parse_study_args([*base, "study.dir=out", "study.sft_args=dataset.path=chat.jsonl"])
    assert spec.evals == ["perplexity", "shakespeare_word_order", "mqar"] and spec.train_args == base
    (folder,) = [a.partition("=")[2] for a in spec.eval_args if a.startswith("eval.include_path=")]
    task = (REPO / folder / "shakespeare_word_order.yaml").read_text()  # shipped, read from the repo root
    data = REPO / task.split("test: ")[1].splitlines()[0]
    assert len(data.read_text().splitlines()) == 200
    (stage, dataset, extra) = spec.post[0]
    assert (stage.name, dataset) == ("sft", "chat_jsonl")
    shipped = REPO / extra[0].partition("=")[2]  # the recipe's chat file, read from the repo root
    assert extra[0].startswith("dataset.path=examples/chat/") and len(shipped.read_text().splitlines()) == 400
    assert extra[-1] == "dataset.path=chat.jsonl"  # the command line's come last, so they win


def test_seed_protocol_is_tinystories_limo_mmlu_humaneval() -> None:
    cfg = compose_config(["experiment=seed_protocol"])
    assert cfg.dataset.name == "tinystories" and cfg.dataset.max_documents == 1_000_000
    spec = parse_study_args(["experiment=seed_protocol", "study.dir=out", "study.eval=mmlu"])
    assert spec.evals == ["mmlu"]  # the command line wins over the recipe
    assert parse_study_args(["experiment=seed_protocol", "study.dir=out"]).evals == ["mmlu", "humaneval"]
    assert [(s.name, d) for s, d, _ in spec.post] == [("sft", "limo")]
    assert sweeper_params(["experiment=seed_protocol"])["seed"] == "0,1,2"


def test_from_a_trained_sweep_refuses_training_overrides() -> None:
    from archifactory.core.errors import ArchiFactoryError

    with pytest.raises(ArchiFactoryError, match="drop the training overrides"):
        parse_study_args(["study.from=multirun/x", "study.dir=out", "mixin=gqa"])
