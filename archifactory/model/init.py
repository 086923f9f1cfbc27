"""The init scheme, in one function.

- every `nn.Linear` and `nn.Embedding` weight ~ N(0, initializer_range²), biases zero (GPT-2 / Llama);
- a Linear named `out_proj` (by convention: the projection that writes back into the residual stream,
  in every mixin and FFN) gets std initializer_range / sqrt(2 · num_layers), so the residual stream's
  variance does not grow with depth (GPT-2, Radford et al. 2019);
- norms keep weight 1 (and bias 0);
- parameters that are not Linear/Embedding weights (decays, gates, A_log, dt_bias, ...) keep the init
  their component gave them in its constructor, which its docstring documents;
- a Linear or Embedding with the attribute `skip_reinit = True` keeps its constructor init (e.g. the
  zero-initialised up-projection of a low-rank adapter);
- a module holding stacked expert weights as plain parameters (MoE: [E, D, F]) defines
  `reset_experts(std, out_std)` and gets the same two stds: input-side N(0, initializer_range²),
  output-side (back into the residual stream) the depth-scaled one.
"""

from __future__ import annotations

import math

from torch import nn


def init_weights(module: nn.Module, initializer_range: float, num_layers: int) -> None:
    """Apply the scheme above to every submodule of `module`, in place."""
    residual_std = initializer_range / math.sqrt(2 * num_layers)
    for name, sub in module.named_modules():
        if getattr(sub, "skip_reinit", False):
            continue
        if isinstance(sub, nn.Linear):
            std = residual_std if name.split(".")[-1] == "out_proj" else initializer_range
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, mean=0.0, std=initializer_range)
        if hasattr(sub, "reset_experts"):
            sub.reset_experts(initializer_range, residual_std)
