"""The classic two-layer MLP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.registry import register_ffn
from archifactory.model.ffn.base import FeedForward, FFNAux, intermediate_size
from archifactory.model.roles import InitRoles


@register_ffn("mlp")
class MLP(FeedForward):
    """Position-wise feed-forward network with GELU (Vaswani et al. 2017; GELU: Hendrycks & Gimpel 2016).

    y = W_out · gelu(W_in · x). Options: `intermediate_multiplier` (4 in GPT-2), `multiple_of` (the
    intermediate size is multiplier × hidden rounded up to a multiple of it), `bias`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        intermediate_multiplier: float = 4.0,
        multiple_of: int = 64,
        bias: bool = False,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.intermediate_size = intermediate_size(hidden_size, intermediate_multiplier, multiple_of)
        self.in_proj = nn.Linear(hidden_size, self.intermediate_size, bias=bias)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=bias)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        return self.out_proj(F.gelu(self.in_proj(x))), {}

    def flops_per_token(self) -> float:
        return 2 * 2 * self.hidden_size * self.intermediate_size
