"""The mixin contract (docs/architecture.md, "The component contract").

A mixin maps hidden states [B, T, D] -> [B, T, D]. It never touches the residual or the norm (the Block
does). It is causal and batch-independent. Decoding goes through an explicit state: a dict of tensors
made by `init_state` and returned, updated, by `forward`; the layer keeps nothing between calls.
`forward(x, ctx)` with no state is the training path; `forward(x, ctx, state)` consumes and returns the
state, so a full forward equals a prefill followed by token-by-token decoding.

Every component declares its init roles (`init_roles`, `model/roles.py`): which projections write into
the residual stream (depth-scaled init) and which parameters it initialises itself.

Constructors take `hidden_size`, `layer_idx` and their own typed keyword options only, so an unknown
option fails loudly. Options whose name is `backend` choose between the plain-PyTorch reference path and
a fused kernel: `auto` (fused when available on CUDA), `reference`, `fused`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles
from archifactory.model.value_residual import ValueGate, ValueResidual

MixinState = dict[str, Tensor]
BACKENDS = ("auto", "reference", "fused")
log = logging.getLogger(__name__)


class Mixin(nn.Module, ABC):
    """Base class of every token mixer."""

    registry_name: str = "?"
    # The mixin's own expansion: an integer constructor option that widens it without changing the
    # residual width (mamba2 `d_state`, lstm/rnn `inner_size`, mla `kv_lora_rank`); parameter matching
    # (`model/match.py`) may re-solve it when the hidden-size grid is too coarse. None: no such option.
    match_option: str | None = None
    # A per-head size option (mamba2 `head_dim`) that matching may move to the nearest value the
    # hidden size divides, as attention's head size follows the hidden size. None: no such option.
    match_head_option: str | None = None

    def __init__(self, hidden_size: int, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.layer_idx = layer_idx
        # model.value_residual=true: attached by the model to the layers whose `value_gate` is not None
        self.value_residual: ValueResidual | None = None

    @abstractmethod
    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        """The empty decode state for `batch_size` sequences."""

    @abstractmethod
    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        """x [B, T, D] -> (y [B, T, D], the updated state, or None when no state was given)."""

    @abstractmethod
    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token (multiply-add = 2) averaged over a causal sequence of `seq_len`."""

    @abstractmethod
    def state_size(self, seq_len: int) -> int:
        """Number of elements of one sequence's decode state after `seq_len` tokens."""

    @abstractmethod
    def init_roles(self) -> InitRoles:
        """What the model's init scheme must know: the projections that write into the residual stream
        (depth-scaled), plain stacked matrices, and what this component initialises itself (`keep`).
        See `model/roles.py`."""

    def value_gate(self) -> ValueGate | None:
        """What this mixin can mix with the first layer's values under `model.value_residual=true`
        (`model/value_residual.py`): the width of the values it passes to `mix_first_values`, and a gate
        rank. None (the default): the mixin has no value projection."""
        return None

    def mix_first_values(self, v: Tensor, ctx: PositionContext, x: Tensor | None = None) -> Tensor:
        """v [B, T, W] with the first layer's values mixed in (model.value_residual), else v itself."""
        return v if self.value_residual is None else self.value_residual(v, ctx, x)

    def after_optimizer_step(self) -> None:
        """Called by the training loop (through the model) once per optimizer step; a no-op unless the
        mixin keeps non-gradient training state."""

    def backend_name(self) -> str:
        """The compute path this layer uses; the run log prints it once per layer."""
        return "reference"


def check_backend(requested: str, name: str, choices: tuple[str, ...] = BACKENDS) -> str:
    """`requested` when it is one of `choices`, else one line naming them: every mixin's constructor
    validates its `backend` option through this; `resolve_backend` then picks the path per call."""
    if requested not in choices:
        raise ArchiFactoryError(f"{name}: backend={requested!r} is not one of {', '.join(choices)}")
    return requested


def resolve_backend(requested: str, fused_available: bool, name: str) -> str:
    """Turn `auto|reference|fused` into the path actually taken, refusing an unavailable fused path."""
    check_backend(requested, name)
    if requested == "fused" and not fused_available:
        raise ArchiFactoryError(
            f"{name}: backend=fused needs CUDA and its kernel library (pip install 'archifactory[fla]'); "
            "use mixin.backend=reference on CPU"
        )
    if requested == "auto":
        return "fused" if fused_available else "reference"
    return requested


def projection_flops(module: nn.Module) -> int:
    """Forward FLOPs per token of every `nn.Linear` inside `module` (multiply-add = 2)."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
