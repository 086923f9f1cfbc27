"""Hybrid layer patterns: resolution, labels, one-line errors, and a mixed stack's model-level contract."""

from __future__ import annotations

import pytest
import torch

from archifactory.config.hybrid import cfg_variant_label, layer_mixin_configs, variant_label
from archifactory.core.errors import ArchiFactoryError
from archifactory.model.build import build_model
from tests.helpers import compose_config

VOCAB = 61


def hybrid_config(*overrides: str):
    return compose_config(["trainer.seq_len=64", "model.hidden_size=32", "model.num_heads=4", *overrides])


def test_attention_every_places_attention_on_every_kth_layer() -> None:
    cfg = hybrid_config("mixin=gated_deltanet", "model.num_layers=8", "model.attention_every=4")
    names = [c.name for c in layer_mixin_configs(cfg)]
    assert names == ["gated_deltanet"] * 3 + ["gqa"] + ["gated_deltanet"] * 3 + ["gqa"]
    assert cfg_variant_label(cfg) == "gated_deltanet3+gqa"
    assert cfg.run_name.startswith("gated_deltanet3+gqa_swiglu_rope_")


def test_pattern_repeats_to_depth_with_per_entry_options() -> None:
    cfg = hybrid_config(
        "mixin=retnet",
        "mixin.chunk_size=8",
        "model.num_layers=5",
        "model.layer_pattern=[retnet,{name:gqa,num_kv_heads:1}]",
    )
    configs = layer_mixin_configs(cfg)
    assert [c.name for c in configs] == ["retnet", "gqa", "retnet", "gqa", "retnet"]
    assert configs[0].chunk_size == 8  # the selected mixin's overrides reach its entries
    assert configs[1].num_kv_heads == 1 and configs[1].num_heads == 4  # YAML defaults, interpolated
    model = build_model(cfg, VOCAB)
    assert [b.mixin.registry_name for b in model.blocks] == ["retnet", "gqa", "retnet", "gqa", "retnet"]
    assert model.blocks[1].mixin.num_kv_heads == 1
    breakdown = model.parameter_breakdown()
    assert breakdown["mixin.retnet"] + breakdown["mixin.gqa"] == breakdown["mixin"]


def test_uniform_stack_is_unchanged() -> None:
    cfg = hybrid_config("mixin=rwkv6")
    assert [c.name for c in layer_mixin_configs(cfg)] == ["rwkv6"] * cfg.model.num_layers
    assert cfg_variant_label(cfg) == "rwkv6" and cfg.run_name.startswith("rwkv6_swiglu")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.layer_pattern=[gqa,nope]"], "unknown mixin 'nope'"),
        (["model.layer_pattern=[{name:gqa,bogus:1}]"], "Key 'bogus' not in"),
        (["model.layer_pattern=[{name:gqa,num_kv_heads:many}]"], "could not be converted to Integer"),
        (["model.layer_pattern=[gqa]", "model.attention_every=2"], "both set"),
        (["model.layer_pattern=[{num_kv_heads:1}]"], "neither a mixin name nor a mapping"),
    ],
)
def test_bad_patterns_are_one_line_errors(overrides: list[str], message: str) -> None:
    with pytest.raises(ArchiFactoryError, match=message) as caught:
        build_model(hybrid_config(*overrides), VOCAB)
    assert "\n" not in str(caught.value)


def test_label_run_length_encodes() -> None:
    assert variant_label("gqa", ["mamba2", "mamba2", "gqa", "mamba2"], 0, "gqa") == "mamba22+gqa+mamba2"
    assert variant_label("kda", None, 3, "mla") == "kda2+mla"
    assert variant_label("kda", None, 0, "gqa") == "kda"


def _perturbed_model(cfg) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    "pattern", ["[gated_deltanet,gqa]", "[rwkv7,mamba2,fox,{name:gla,chunk_size:4}]", "[lstm,mla,retnet]"]
)
def test_mixed_stack_decodes_exactly_like_its_full_forward(pattern: str) -> None:
    """Prefill ending mid-chunk, then token by token across mixed layers == one full forward (fp64)."""
    cfg = hybrid_config(f"model.layer_pattern={pattern}", "model.num_layers=4", "positional=rope")
    model = _perturbed_model(cfg)
    ids = torch.randint(0, VOCAB, (2, 19))
    full = model(ids).logits
    state = model.init_state(2)
    out = model(ids[:, :7], state=state)
    pieces, state = [out.logits], out.state
    for t in range(7, 19):
        out = model(ids[:, t : t + 1], state=state)
        pieces.append(out.logits)
        state = out.state
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-7, atol=1e-9)


def test_mixed_stack_is_causal() -> None:
    model = _perturbed_model(hybrid_config("model.layer_pattern=[kda,gqa,hgrn2]", "model.num_layers=3"))
    ids = torch.randint(0, VOCAB, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, VOCAB, (2, 6))
    before, after = model(ids).logits, model(changed).logits
    torch.testing.assert_close(after[:, :10], before[:, :10], rtol=1e-9, atol=1e-10)
    assert not torch.allclose(after[:, 10:], before[:, 10:])


def test_a_config_saved_before_hybrids_existed_builds_a_uniform_stack() -> None:
    from omegaconf import OmegaConf, open_dict

    cfg = hybrid_config("mixin=retnet")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # as a run's saved config loads
    with open_dict(cfg):
        for key in ("layer_pattern", "attention_every", "attention_mixin"):
            del cfg.model[key]
    assert [c.name for c in layer_mixin_configs(cfg)] == ["retnet"] * cfg.model.num_layers
    assert cfg_variant_label(cfg) == "retnet" and len(build_model(cfg, VOCAB).blocks) == cfg.model.num_layers
