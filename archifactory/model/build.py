"""Build a StackedMixinForCausalLM from a composed config: the one place that turns names into modules."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn

from archifactory.config import component_options
from archifactory.errors import ArchiFactoryError
from archifactory.model.hybrid import cfg_variant_label, layer_mixin_configs
from archifactory.model.positional import PositionalScheme
from archifactory.model.stack import ModuleFactory, StackedMixinForCausalLM
from archifactory.registry import get_component


def component_factory(
    kind: str, cfg: Any, hidden_size: int, num_layers: int | None = None, max_seq_len: int | None = None
) -> ModuleFactory:
    """A factory `(layer_idx=i) -> module` for the mixin or FFN named in `cfg`. `num_layers` and
    `max_seq_len` (model settings, never component options) reach the constructors that declare them."""
    cls = get_component(kind, cfg.name)
    declared = inspect.signature(cls.__init__).parameters
    supplied = {
        key: value
        for key, value in (("num_layers", num_layers), ("max_seq_len", max_seq_len))
        if key in declared and value is not None
    }
    return functools.partial(cls, hidden_size=hidden_size, **supplied, **component_options(cfg))


def layer_mixin_factory(
    cfg: Any, hidden_size: int, num_layers: int | None = None, max_seq_len: int | None = None
) -> ModuleFactory:
    """A factory `(layer_idx=i) -> mixin` giving each layer the mixin of the hybrid pattern (or `cfg.mixin`
    everywhere): see `model/hybrid.py`."""
    factories = [
        component_factory("mixin", layer_cfg, hidden_size, num_layers, max_seq_len)
        for layer_cfg in layer_mixin_configs(cfg)
    ]

    def build_layer(layer_idx: int) -> nn.Module:
        return factories[layer_idx](layer_idx=layer_idx)

    return build_layer


def build_positional(cfg: Any, hidden_size: int, max_seq_len: int) -> PositionalScheme:
    cls = get_component("positional", cfg.name)
    return cls(hidden_size=hidden_size, max_seq_len=max_seq_len, **component_options(cfg))


def build_model(cfg: Any, vocab_size: int) -> StackedMixinForCausalLM:
    """cfg: the root config (uses cfg.model, cfg.mixin, cfg.ffn, cfg.positional)."""
    model_cfg = cfg.model
    vocab_size = model_cfg.vocab_size or vocab_size
    if model_cfg.hidden_size % model_cfg.num_heads:
        raise ArchiFactoryError(
            f"model.hidden_size={model_cfg.hidden_size} is not divisible by model.num_heads={model_cfg.num_heads}; "
            "choose a hidden size that is a multiple of the head count"
        )
    shape = (model_cfg.hidden_size, model_cfg.num_layers, model_cfg.max_seq_len)
    try:
        model = StackedMixinForCausalLM(
            num_layers=model_cfg.num_layers,
            hidden_size=model_cfg.hidden_size,
            vocab_size=vocab_size,
            mixin_module=layer_mixin_factory(cfg, *shape),
            ffn_module=component_factory("ffn", cfg.ffn, *shape),
            positional_module=build_positional(cfg.positional, model_cfg.hidden_size, model_cfg.max_seq_len),
            tie_embeddings=model_cfg.tie_embeddings,
            initializer_range=model_cfg.initializer_range,
            norm=model_cfg.norm,
            norm_eps=model_cfg.norm_eps,
            loss_chunk_size=model_cfg.loss_chunk_size,
        )
    except (TypeError, ValueError, ZeroDivisionError, AssertionError) as error:
        # a constructor refused an option (or a combination `archifactory.validation` cannot see): one line
        raise ArchiFactoryError(
            f"cannot build {cfg_variant_label(cfg)}/{cfg.ffn.name}: {type(error).__name__}: {error}"
        ) from error
    return model


def describe_backends(model: nn.Module) -> list[str]:
    """One line per distinct (component, backend) pair, for the run log."""
    lines: dict[str, list[int]] = {}
    for i, block in enumerate(model.blocks):
        key = f"mixin={block.mixin.registry_name} backend={block.mixin.backend_name()}"
        lines.setdefault(key, []).append(i)
    return [f"{key} layers={layers}" for key, layers in lines.items()]
