"""Parameter matching (`model.target_params`): a representative of each family x {swiglu, moe} lands within
±2% at three scales (every mixin at 1.5M: test_match_ffn.py), the shape really built has the count the
solver reports, and an unreachable target is one clear error."""

from __future__ import annotations

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.model.build import build_model
from archifactory.model.match import Counter, Shape, apply_match, parse_count
from tests.helpers import compose_config

BASE = ["model=tiny"]  # matching counts the blocks: no dataset option changes them


def matched(overrides: list[str]):
    return apply_match(compose_config([*BASE, *overrides]))


@pytest.mark.parametrize(
    ("text", "count"),
    [("30M", 30_000_000), ("3e7", 30_000_000), ("1.5B", 1_500_000_000), ("250k", 250_000), ("12345", 12345),
     ("30000000.0", 30_000_000), (4_000_000, 4_000_000)],
)  # fmt: skip
def test_parse_count(text: str | int, count: int) -> None:
    assert parse_count(text) == count


@pytest.mark.parametrize("text", ["30X", "lots", "-5M", "0", ""])
def test_parse_count_refuses_nonsense(text: str) -> None:
    with pytest.raises(ArchiFactoryError, match="model.target_params"):
        parse_count(text)


SCALES = (20_000_000, 60_000_000, 150_000_000)
# every mixin x FFN is matched at 1.5M in test_match_ffn.py; here each family's representative (attention,
# latent attention, SSM, RWKV, delta rule, RNN) and every mixin whose head size the solver may change
# (`match_head_option`) at three larger scales
ACROSS_SCALES = sorted(
    {"gqa", "mla", "mamba2", "rwkv6", "gated_deltanet", "lstm"}
    | {name for name, cls in components("mixin").items() if cls.match_head_option}
)
CASES = [(mixin, ffn, target) for mixin in ACROSS_SCALES for ffn in ("swiglu", "moe") for target in SCALES]


@pytest.mark.parametrize(("mixin", "ffn", "target"), CASES)
def test_every_mixin_lands_within_two_percent(mixin: str, ffn: str, target: int) -> None:
    # MoE: 8 experts whose width rounds up to `multiple_of`; at 32 one rounding step of 8 experts is worth
    # ~5% at these sizes (a target inside such a jump is refused, see test_unreachable_target_is_one_line)
    rounding = ["ffn.multiple_of=8"] if ffn == "moe" else []
    cfg, result = matched([f"mixin={mixin}", f"ffn={ffn}", f"model.target_params={target}", *rounding])
    assert abs(result.achieved / target - 1) <= 0.02, (target, result.shape)
    assert result.error == pytest.approx(result.achieved / target - 1)
    # the solved shape is written into the config the run saves
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (
        result.shape.hidden_size,
        result.shape.num_layers,
    )
    assert cfg.model.num_layers == 4  # width matching keeps the depth
    for key, value in result.shape.mixin_options.items():
        assert cfg.mixin[key] == value


@pytest.mark.parametrize(("mixin", "ffn"), [("gqa", "swiglu"), ("mamba2", "moe"), ("rwkv6", "swiglu")])
def test_built_model_has_the_reported_count(mixin: str, ffn: str) -> None:
    cfg, result = matched([f"mixin={mixin}", f"ffn={ffn}", "model.target_params=20M", "ffn.multiple_of=8"])
    with torch.device("meta"):
        model = build_model(cfg, 1000)
    assert model.parameter_breakdown()["non_embedding"] == result.achieved
    assert abs(result.error) <= 0.02


@pytest.mark.parametrize(
    "extra",
    [
        ["residual=hyper"],
        ["residual=mhc"],
        ["model.value_residual=true"],
        ["mixin=rwkv7", "model.value_residual=true"],
        ["model.weights=hyper"],
        ["mixin=rwkv7", "model.weights=hyper", "model.value_residual=true"],
    ],
)
def test_residual_and_value_residual_weights_are_counted(extra: list[str]) -> None:
    """Hyper-connections' / mHC's weights, the value-residual gates and model.weights=hyper's hypernetwork
    (with its base counted once) are part of the matched count."""
    cfg, result = matched(["mixin=gqa", "model.target_params=5M", *extra])
    with torch.device("meta"):
        model = build_model(cfg, 1000)
    assert model.parameter_breakdown()["non_embedding"] == result.achieved
    assert abs(result.error) <= 0.01


def test_counts_shared_by_the_matches_of_a_process_keep_each_setting_apart() -> None:
    """A process shares its parameter counts across configs (`_MIXIN_COUNTS`, `_FFN_COUNTS` in model/match.py):
    at one shape, the plain stack counted first, each setting that changes a layer's count is still counted
    as built, not read back from the plain stack's counts."""
    shape = ["mixin=gqa", "model.hidden_size=96", "model.num_layers=3"]
    for extra in ([], ["model.value_residual=true"], ["model.weights=hyper"], ["ffn=moe"]):
        cfg = compose_config([*shape, *extra])
        count = Counter(cfg).count(Shape(cfg.model.hidden_size, cfg.model.num_layers))
        with torch.device("meta"):
            model = build_model(cfg, 1000)
        assert count == model.parameter_breakdown()["non_embedding"], extra


def test_layers_mode_solves_the_depth_at_the_configured_width() -> None:
    cfg, result = matched(
        ["mixin=gqa", "model.hidden_size=256", "model.target_params=12M", "model.match=layers"]
    )
    assert result.match == "layers" and cfg.model.hidden_size == 256
    assert abs(result.error) <= 0.02
    assert cfg.model.num_layers == round(12e6 / (result.achieved / cfg.model.num_layers))


def test_no_target_leaves_the_config_alone() -> None:
    cfg = compose_config(BASE)
    assert apply_match(cfg) == (cfg, None)


def test_unreachable_target_is_one_line() -> None:
    with pytest.raises(ArchiFactoryError) as error:
        matched(["mixin=gqa", "model.target_params=10"])
    assert "\n" not in str(error.value) and "model.target_params=10" in str(error.value)


def test_summary_records_target_and_achieved() -> None:
    _, result = matched(["mixin=rnn", "model.target_params=5M"])
    summary = result.summary()
    assert summary["target_params"] == 5_000_000
    assert summary["params_match"]["achieved"] == result.achieved
    assert summary["params_match"]["hidden_size"] == result.shape.hidden_size


@pytest.mark.parametrize("match", ["width", "layers"])
def test_hybrid_stack_is_counted_layer_by_layer(match: str) -> None:
    overrides = ["mixin=rwkv6", "model.attention_every=2", "model.target_params=12M", f"model.match={match}"]
    cfg, result = matched(overrides)
    with torch.device("meta"):
        model = build_model(cfg, 1000)
    assert model.parameter_breakdown()["non_embedding"] == result.achieved
    assert abs(result.error) <= 0.02
    assert {type(b.mixin).__name__ for b in model.blocks} == {"RWKV6TimeMix", "GroupedQueryAttention"}


def test_list_params_rows_match_the_target_without_training(capsys: pytest.CaptureFixture) -> None:
    from archifactory.cli.main import main
    from archifactory.model.params_list import params_rows

    rows = params_rows(
        ["model.target_params=20M", "mixin=gqa,mamba2", "ffn=swiglu", "dataset=text", "dataset.path=x"]
    )
    assert [(r["mixin"], r["ffn"]) for r in rows] == [("gqa", "swiglu"), ("mamba2", "swiglu")]
    for row in rows:
        assert abs(row["non_embedding"] / 20e6 - 1) <= 0.02 and row["vs_target"] == pytest.approx(
            row["non_embedding"] / 20e6 - 1
        )
        assert row["params"] > row["non_embedding"] and row["flops_per_token"] > 2 * row["non_embedding"]
    assert main(["list", "--params", "model.target_params=10", "mixin=gqa", "ffn=swiglu"]) == 1
    assert "gqa/swiglu: model.target_params=10" in capsys.readouterr().out
