"""The init scheme, in one function, driven by the roles each component declares (`model/roles.py`).

- every `nn.Linear` and `nn.Embedding` weight ~ N(0, initializer_range²), biases zero (GPT-2 / Llama);
- what a component declares `residual` (the projections that write back into the residual stream, and
  stacked expert output weights) gets std initializer_range / sqrt(2 · num_layers), so the residual
  stream's variance does not grow with depth (GPT-2, Radford et al. 2019);
- what it declares `matrices` (plain stacked weights, e.g. MoE expert inputs) gets N(0, initializer_range²);
- what it declares `keep` keeps its constructor init, which the component's docstring documents
  (decays, gates, LoRA factors, convolutions, torch RNNs, zero-initialised adapter outputs);
- norms keep weight 1 (and bias 0);
- residual connections (`model/residual/`) keep their constructor init (HC's identity-like static
  matrices, zero-initialised dynamic projections): their `init_roles` keep everything.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from archifactory.model.ffn.base import FeedForward
from archifactory.model.mixins.base import Mixin
from archifactory.model.residual.base import Residual
from archifactory.model.roles import parameter_ids


@torch.no_grad()
def init_weights(module: nn.Module, initializer_range: float, num_layers: int) -> None:
    """Apply the scheme above to every submodule of `module`, in place."""
    residual_std = initializer_range / math.sqrt(2 * num_layers)
    keep: set[int] = set()
    residual: set[int] = set()
    matrices: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, (Mixin, FeedForward, Residual)):
            roles = sub.init_roles()
            keep |= parameter_ids(roles.keep)
            residual |= parameter_ids(roles.residual)
            matrices |= parameter_ids(roles.matrices)
    layer_params: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            layer_params |= parameter_ids([sub])
            if id(sub.weight) in keep:
                continue
            std = residual_std if id(sub.weight) in residual else initializer_range
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if isinstance(sub, nn.Linear) and sub.bias is not None and id(sub.bias) not in keep:
                nn.init.zeros_(sub.bias)
    for param in module.parameters():
        if id(param) in keep or id(param) in layer_params:
            continue
        if id(param) in residual:
            nn.init.normal_(param, mean=0.0, std=residual_std)
        elif id(param) in matrices:
            nn.init.normal_(param, mean=0.0, std=initializer_range)
