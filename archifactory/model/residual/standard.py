"""The standard pre-norm residual (He et al. 2016; pre-norm as in GPT-2 / Llama): h + F(norm(h))."""

from __future__ import annotations

from torch import Tensor

from archifactory.core.registry import register_residual
from archifactory.model.residual.base import Residual


@register_residual("standard")
class StandardResidual(Residual):
    """The residual of "Deep Residual Learning for Image Recognition" (He et al., 2016) in its pre-norm form
    (GPT-2, 2019; Llama): each sub-layer reads the hidden state [B, T, D] itself and adds its output to it,
    h ← h + F(norm(h)). No parameters, no options; the default, and what every other option is compared
    against."""

    standard_equivalent = {}  # itself

    def __init__(self, hidden_size: int, layer_idx: int, sublayer: int) -> None:
        super().__init__()

    def read(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return h, h

    def write(self, carry: Tensor, out: Tensor) -> Tensor:
        return carry + out
