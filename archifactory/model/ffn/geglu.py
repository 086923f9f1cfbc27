"""Gated linear unit FFN with a GELU gate."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_ffn
from archifactory.model.ffn.base import GatedFeedForward


@register_ffn("geglu")
class GeGLU(GatedFeedForward):
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
        if approximate not in ("none", "tanh"):
            raise ArchiFactoryError(f"ffn.approximate={approximate!r}; choose none or tanh")
        super().__init__(hidden_size, layer_idx, intermediate_multiplier, multiple_of, bias)
        self.approximate = approximate

    def activation(self, gate: Tensor) -> Tensor:
        return F.gelu(gate, approximate=self.approximate)
