"""Build a StackedMixinForCausalLM from a composed config (`StackedMixinForCausalLM.from_config`), and describe
which compute path each layer took."""

from __future__ import annotations

import logging
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.stack import StackedMixinForCausalLM

log = logging.getLogger(__name__)


def build_model(cfg: Any, vocab_size: int, **parts: Any) -> StackedMixinForCausalLM:
    """cfg: the root config (uses cfg.model, cfg.mixin, cfg.ffn, cfg.positional); `parts`: pretrained
    embedding / head / final-norm modules for the constructor (`model.pretrained_from`)."""
    return StackedMixinForCausalLM.from_config(cfg, vocab_size, **parts)


def check_buildable(cfg: DictConfig) -> None:
    """Build the model on the meta device so each component refuses a bad option now, in one line.

    The vocabulary is not known before the tokenizer exists; any size serves for the constructors'
    checks. An exception that is not a user error (an operation the meta device lacks) is left for the
    real build to meet.
    """
    try:
        with torch.device("meta"):
            build_model(cfg, cfg.model.vocab_size or 512)
    except ArchiFactoryError:
        raise
    except Exception as error:  # not the user's: the real build will tell
        log.debug("dry build on the meta device skipped: %r", error)


def describe_backends(model: nn.Module) -> list[str]:
    """One line per distinct (component, backend) pair, for the run log. Under model.weights=hyper every
    layer runs layer 0's mixin (its own holds no weights to place it), so layer 0 answers for all."""
    lines: dict[str, list[int]] = {}
    shared = getattr(model, "hyper", None) is not None
    for i, block in enumerate(model.blocks):
        mixin = model.blocks[0].mixin if shared else block.mixin
        key = f"mixin={mixin.registry_name} backend={mixin.backend_name()}"
        lines.setdefault(key, []).append(i)
    return [f"{key} layers={layers}" for key, layers in lines.items()]
