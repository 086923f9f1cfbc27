"""The FFN contract (docs/architecture.md, "The component contract").

An FFN maps [B, T, D] -> [B, T, D] position-wise, never touching the residual or the norm. `forward`
returns `(y, aux)`: `aux` is a dict of tensors; the key `"loss"` (a scalar, already weighted) is added to
the training loss by the model — auxiliary losses are returned, never stashed — and every other key is a
detached metric for logging (expert load, dropped tokens, ...). Dense FFNs return an empty dict.

Every component declares its init roles (`init_roles`, `model/roles.py`): which projections write into
the residual stream (depth-scaled init) and which parameters it initialises itself.

Most FFNs are position-wise and keep no decode state. One that reads earlier tokens (RWKV's token-shifted
channel-mix) overrides `init_state` to return its state and `forward_with_state` to consume and return it,
so a full forward still equals prefill + token-by-token decoding.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from archifactory.model.roles import InitRoles

FFNAux = dict[str, Tensor]
FFNState = dict[str, Tensor]


class FeedForward(nn.Module, ABC):
    """Base class of every FFN."""

    registry_name: str = "?"

    def __init__(self, hidden_size: int, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx

    @abstractmethod
    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        """x [B, T, D] -> (y [B, T, D], aux)."""

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> FFNState:
        """The empty decode state; position-wise FFNs have none (an empty dict)."""
        return {}

    def forward_with_state(self, x: Tensor, state: FFNState) -> tuple[Tensor, FFNAux, FFNState]:
        """Decoding: like `forward`, consuming and returning the state (position-wise: unchanged)."""
        y, aux = self(x)
        return y, aux, state

    def state_size(self) -> int:
        """Elements of one sequence's decode state (0 for position-wise FFNs)."""
        return 0

    @abstractmethod
    def flops_per_token(self) -> float:
        """Forward FLOPs per token (multiply-add = 2), counting only the experts a token uses."""

    @abstractmethod
    def init_roles(self) -> InitRoles:
        """What the model's init scheme must know: the projections that write into the residual stream
        (depth-scaled), plain stacked matrices, and what this component initialises itself (`keep`).
        See `model/roles.py`."""

    def after_optimizer_step(self) -> None:
        """Called by the training loop (through the model) once per optimizer step; a no-op unless the FFN
        keeps non-gradient training state (MoE's aux-loss-free routing bias)."""

    def active_parameters(self) -> int:
        """Parameters one token touches; equals all parameters for a dense FFN."""
        return sum(p.numel() for p in self.parameters())


def intermediate_size(hidden_size: int, multiplier: float, multiple_of: int) -> int:
    """The documented rounding rule: multiplier × hidden, rounded *up* to a multiple of `multiple_of`."""
    return multiple_of * math.ceil(multiplier * hidden_size / multiple_of)


class GatedFeedForward(FeedForward):
    """The GLU family (Shazeer, "GLU Variants Improve Transformer", 2020): y = W_out · (act(W_gate · x) ⊙
    W_up · x), intermediate width = multiplier × hidden rounded up to `multiple_of`. Subclasses (swiglu,
    geglu) choose `activation` and declare their own typed options; not registered itself."""

    def __init__(
        self, hidden_size: int, layer_idx: int, intermediate_multiplier: float, multiple_of: int, bias: bool
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.intermediate_size = intermediate_size(hidden_size, intermediate_multiplier, multiple_of)
        self.gate_proj = nn.Linear(hidden_size, self.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, self.intermediate_size, bias=bias)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=bias)

    @abstractmethod
    def activation(self, gate: Tensor) -> Tensor:
        """The gate's non-linearity."""

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,))

    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        return self.out_proj(self.activation(self.gate_proj(x)) * self.up_proj(x)), {}

    def flops_per_token(self) -> float:
        return 2 * 3 * self.hidden_size * self.intermediate_size
