"""Names to modules: factories for the mixin, FFN and positional scheme a config names (through the registry).

`StackedMixinForCausalLM.from_config` builds a whole model with them; parameter matching builds single blocks.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from archifactory.config.hybrid import layer_mixin_configs
from archifactory.config.schema import component_options
from archifactory.core.registry import get_component
from archifactory.model.positional import PositionalScheme

# A factory builds one layer's component: factory(layer_idx=i). `functools.partial(Cls, hidden_size=…)`
# is the usual one.
ModuleFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class ComponentSpec:
    """A component as a config names it: its class and its options (read from the config once; building
    it at a width is then cheap, as parameter matching does hundreds of times)."""

    cls: type[nn.Module]
    options: dict[str, Any]

    def factory(
        self, hidden_size: int, num_layers: int | None = None, max_seq_len: int | None = None
    ) -> ModuleFactory:
        """`(layer_idx=i) -> module` at this width. `num_layers` and `max_seq_len` (model settings, never
        component options) reach the constructors that declare them."""
        declared = inspect.signature(self.cls.__init__).parameters
        supplied = {
            key: value
            for key, value in (("num_layers", num_layers), ("max_seq_len", max_seq_len))
            if key in declared and value is not None
        }
        return functools.partial(self.cls, hidden_size=hidden_size, **supplied, **self.options)


def component_spec(kind: str, cfg: Any) -> ComponentSpec:
    """The mixin, FFN or other component named in `cfg` (through the registry), with its options."""
    return ComponentSpec(get_component(kind, cfg.name), component_options(cfg))


def layer_mixin_specs(cfg: Any) -> list[ComponentSpec]:
    """Each layer's mixin under the hybrid pattern (or `cfg.mixin` everywhere): see `config/hybrid.py`."""
    return [component_spec("mixin", layer_cfg) for layer_cfg in layer_mixin_configs(cfg)]


def component_factory(
    kind: str, cfg: Any, hidden_size: int, num_layers: int | None = None, max_seq_len: int | None = None
) -> ModuleFactory:
    """A factory `(layer_idx=i) -> module` for the mixin or FFN named in `cfg`."""
    return component_spec(kind, cfg).factory(hidden_size, num_layers, max_seq_len)


def layers_factory(
    specs: list[ComponentSpec],
    hidden_size: int,
    num_layers: int | None = None,
    max_seq_len: int | None = None,
) -> ModuleFactory:
    """A factory `(layer_idx=i) -> module` building layer i's component of `specs`."""
    factories = [spec.factory(hidden_size, num_layers, max_seq_len) for spec in specs]

    def build_layer(layer_idx: int) -> nn.Module:
        return factories[layer_idx](layer_idx=layer_idx)

    return build_layer


def layer_mixin_factory(
    cfg: Any, hidden_size: int, num_layers: int | None = None, max_seq_len: int | None = None
) -> ModuleFactory:
    """A factory `(layer_idx=i) -> mixin` giving each layer the mixin of the hybrid pattern."""
    return layers_factory(layer_mixin_specs(cfg), hidden_size, num_layers, max_seq_len)


def build_positional(cfg: Any, hidden_size: int, max_seq_len: int) -> PositionalScheme:
    cls = get_component("positional", cfg.name)
    return cls(hidden_size=hidden_size, max_seq_len=max_seq_len, **component_options(cfg))
