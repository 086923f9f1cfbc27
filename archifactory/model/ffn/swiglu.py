"""Gated linear unit FFN with a SiLU gate."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from archifactory.core.registry import register_ffn
from archifactory.model.ffn.base import GatedFeedForward


@register_ffn("swiglu")
class SwiGLU(GatedFeedForward):
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
        super().__init__(hidden_size, layer_idx, intermediate_multiplier, multiple_of, bias)

    def activation(self, gate: Tensor) -> Tensor:
        return F.silu(gate)
