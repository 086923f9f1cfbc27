"""Gated linear unit FFN with a GELU gate."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_ffn
from archifactory.model.ffn.base import FeedForward, FFNAux, intermediate_size
from archifactory.model.roles import InitRoles


@register_ffn("geglu")
class GeGLU(FeedForward):
    """GeGLU (Shazeer, "GLU Variants Improve Transformer", 2020; used by T5 v1.1 and Gemma).

    y = W_out · (gelu(W_gate · x) ⊙ W_up · x). Options: `intermediate_multiplier` (default 8/3: the same
    parameters as a 4× MLP), `multiple_of` (the intermediate size is multiplier × hidden rounded *up* to a
    multiple of it), `approximate` (`none` = exact erf GELU, `tanh` = the tanh approximation Gemma uses),
    `bias`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        intermediate_multiplier: float = 8 / 3,
        multiple_of: int = 64,
        approximate: str = "none",
        bias: bool = False,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        if approximate not in ("none", "tanh"):
            raise ArchiFactoryError(f"ffn.approximate={approximate!r}; choose none or tanh")
        self.approximate = approximate
        self.intermediate_size = intermediate_size(hidden_size, intermediate_multiplier, multiple_of)
        self.gate_proj = nn.Linear(hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, self.intermediate_size, bias=bias)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=bias)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        gate = F.gelu(self.gate_proj(x), approximate=self.approximate)
        return self.out_proj(gate * self.up_proj(x)), {}

    def flops_per_token(self) -> float:
        return 2 * 3 * self.hidden_size * self.intermediate_size
