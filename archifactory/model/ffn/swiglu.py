"""Gated linear unit FFN with a SiLU gate."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.registry import register_ffn
from archifactory.model.ffn.base import FeedForward, FFNAux, intermediate_size
from archifactory.model.roles import InitRoles


@register_ffn("swiglu")
class SwiGLU(FeedForward):
    """SwiGLU (Shazeer, "GLU Variants Improve Transformer", 2020), the Llama FFN.

    y = W_out · (silu(W_gate · x) ⊙ W_up · x). Options: `intermediate_multiplier` (default 8/3, which gives
    the same parameter count as a 4× MLP), `multiple_of` (round the intermediate size up to it), `bias`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        intermediate_multiplier: float = 8 / 3,
        multiple_of: int = 64,
        bias: bool = False,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.intermediate_size = intermediate_size(hidden_size, intermediate_multiplier, multiple_of)
        self.gate_proj = nn.Linear(hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, self.intermediate_size, bias=bias)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=bias)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        return self.out_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)), {}

    def flops_per_token(self) -> float:
        return 2 * 3 * self.hidden_size * self.intermediate_size
