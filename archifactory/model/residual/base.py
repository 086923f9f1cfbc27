"""The residual interface: what the Block (`model/block.py`) calls around each sub-layer.

A residual option owns the hidden state between sub-layers. The standard residual keeps it as [B, T, D];
a multi-stream option (hyper-connections) widens it to `expansion` parallel streams [B, T, n, D]. Around
each sub-layer F (a mixin or an FFN, with its pre-norm) the Block does

    x, carry = residual.read(h)        # the sub-layer's input [B, T, D] (before its norm)
    h = residual.write(carry, F(x))    # the new hidden state

and the model widens the embedding once (`widen`) and narrows the last hidden state once (`narrow`)
before the final norm. Everything is per token (no mixing along T), so decoding needs no extra state.

One connection is built per sub-layer: `cls(hidden_size=…, layer_idx=i, sublayer=0 | 1, **options)`,
`sublayer` 0 for the mixin, 1 for the FFN; `2 · layer_idx + sublayer` is the sub-layer's index k in the
stack (hyper-connections read stream k mod n at init).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch import Tensor, nn

from archifactory.model.roles import InitRoles


class Residual(nn.Module, ABC):
    """One sub-layer's residual connection (see the module docstring). Subclasses register themselves
    with `@register_residual` and initialise their own parameters in the constructor (`init_roles` keeps
    them all: none is a projection the model's init scheme should redraw)."""

    registry_name: str
    # The options under which this connection is the standard residual bit for bit at init (hyper-
    # connections with one static stream), or None when no setting is; the contract suite checks the
    # claim for every option that makes it (tests/model/test_residual.py).
    standard_equivalent: dict[str, Any] | None = None

    def widen(self, x: Tensor) -> Tensor:
        """The embedding [B, T, D] as the hidden state this option carries between sub-layers."""
        return x

    def narrow(self, h: Tensor) -> Tensor:
        """The last hidden state as [B, T, D], what the final norm reads."""
        return h

    @abstractmethod
    def read(self, h: Tensor) -> tuple[Tensor, Any]:
        """The sub-layer's input [B, T, D] from the hidden state, and what `write` needs back."""

    @abstractmethod
    def write(self, carry: Any, out: Tensor) -> Tensor:
        """The new hidden state from `read`'s carry and the sub-layer's output `out` [B, T, D]."""

    def flops_per_token(self) -> float:
        """Forward FLOPs per token of the connection itself (the additions of a plain residual: 0)."""
        return 0.0

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(), keep=(self,))


class StreamResidual(Residual):
    """A residual over `expansion` parallel streams [B, T, n, D]: the embedding is copied into every stream
    and the streams are summed before the final norm (Zhu et al. 2025, §2 and Fig. 2)."""

    def __init__(self, hidden_size: int, expansion: int) -> None:
        super().__init__()
        if expansion < 1:
            raise ValueError(f"residual.expansion={expansion} must be >= 1 (the number of streams)")
        self.hidden_size = hidden_size
        self.expansion = expansion

    def widen(self, x: Tensor) -> Tensor:
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.expansion, x.shape[-1])  # [B, T, n, D]

    def narrow(self, h: Tensor) -> Tensor:
        return h.sum(dim=-2)
