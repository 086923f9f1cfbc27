"""`num_layers` and `max_seq_len` are model settings: the config layer keeps them out of component
options, and `build_model` supplies them to every constructor that declares them."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from archifactory.config.schema import component_schema
from archifactory.model.build import build_model
from archifactory.model.components import component_factory
from archifactory.model.mixins.rwkv6 import RWKV6TimeMix, depth_ratios
from tests.helpers import compose_config


def test_rwkv6_gets_the_depth_of_the_model() -> None:
    cfg = compose_config(["mixin=rwkv6", "model.hidden_size=64", "model.num_heads=4", "model.num_layers=5"])
    model = build_model(cfg, 100)
    first, last = model.blocks[0].mixin, model.blocks[4].mixin
    # RWKV's init: the bonus scales with l / (L - 1), the first layer's is only the zigzag
    alone = [RWKV6TimeMix(64, layer, num_heads=4, num_layers=5) for layer in (0, 4)]
    torch.testing.assert_close(first.time_faaaa, alone[0].time_faaaa)
    torch.testing.assert_close(last.time_faaaa, alone[1].time_faaaa)
    assert not torch.allclose(first.time_decay, last.time_decay)
    assert depth_ratios(0, 5) == (0.0, 1.0) and depth_ratios(4, 5) == pytest.approx((1.0, 0.2))


@pytest.mark.parametrize("kind,name", [("mixin", "rwkv6"), ("mixin", "rwkv7")])
def test_model_settings_are_not_component_options(kind: str, name: str) -> None:
    from archifactory.core.registry import get_component

    fields = component_schema(kind, name, get_component(kind, name)).__dataclass_fields__
    assert "num_layers" not in fields and "max_seq_len" not in fields
    with pytest.raises(Exception, match="num_layers"):
        compose_config([f"{kind}={name}", f"{kind}.num_layers=3"])


def test_a_constructor_that_declares_them_receives_them() -> None:
    from archifactory.model.ffn.swiglu import SwiGLU

    class DepthAware(SwiGLU):
        def __init__(self, hidden_size: int, layer_idx: int, num_layers: int, max_seq_len: int) -> None:
            super().__init__(hidden_size, layer_idx)
            self.seen = (num_layers, max_seq_len)

    from archifactory.core import registry

    registry.FFNS["_depth_aware"] = DepthAware
    try:
        cfg = OmegaConf.create({"name": "_depth_aware"})
        module = component_factory("ffn", cfg, 64, num_layers=7, max_seq_len=128)(layer_idx=2)
    finally:
        del registry.FFNS["_depth_aware"]
    assert module.seen == (7, 128)
