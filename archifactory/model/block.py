"""The one place with residual + norm wiring: around the mixin, then the FFN, the block's residual
connections (`model/residual/`) read the sub-layer's input from the hidden state and write its output back.
The default, `residual=standard`, is x + mixin(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from archifactory.model.documents import DocumentLayout
from archifactory.model.ffn.base import FeedForward, FFNAux, FFNState
from archifactory.model.mixins.base import Mixin, MixinState
from archifactory.model.mixins.kit import zero_pads
from archifactory.model.norms import build_norm
from archifactory.model.positional import PositionContext
from archifactory.model.residual.base import Residual
from archifactory.model.residual.standard import StandardResidual


@dataclass
class LayerState:
    """One block's decode state: the mixin's and the FFN's (empty for position-wise FFNs). The residual
    streams are per token, so a residual option adds none."""

    mixin: MixinState
    ffn: FFNState


class Block(nn.Module):
    """A pre-norm block: norm → mixin → residual connection, norm → FFN → residual connection.

    `mixin_residual` / `ffn_residual`: the connections around each sub-layer (default: the standard
    residual, h + F(norm(h))); the hidden state `h` the block maps is what they carry ([B, T, D], or
    [B, T, n, D] for a multi-stream option).
    """

    def __init__(
        self,
        mixin: Mixin,
        ffn: FeedForward,
        hidden_size: int,
        norm: str,
        norm_eps: float,
        mixin_residual: Residual | None = None,
        ffn_residual: Residual | None = None,
    ) -> None:
        super().__init__()
        self.mixin_residual = mixin_residual or StandardResidual(hidden_size, mixin.layer_idx, 0)
        self.mixin_norm = build_norm(norm, hidden_size, norm_eps)
        self.mixin = mixin
        self.ffn_residual = ffn_residual or StandardResidual(hidden_size, mixin.layer_idx, 1)
        self.ffn_norm = build_norm(norm, hidden_size, norm_eps)
        self.ffn = ffn
        self.activation_checkpointing = (
            False  # recompute this block in backward instead of storing activations
        )

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> LayerState:
        return LayerState(
            self.mixin.init_state(batch_size, device, dtype), self.ffn.init_state(batch_size, device, dtype)
        )

    def forward(
        self,
        h: Tensor,
        ctx: PositionContext,
        state: LayerState | None = None,
        documents: DocumentLayout | None = None,
        weights: dict[str, Tensor] | None = None,
        *,
        swapped: bool = False,
    ) -> tuple[Tensor, LayerState | None, FFNAux]:
        """With `documents` (document-aware packing, `model/documents.py`) the mixin, and an FFN that reads
        earlier tokens, run on each document alone; `ctx` then holds the per-document positions.
        `weights`: tensors by parameter name (`mixin.q_proj.weight`, …) that stand in for the block's own
        in this call (model.weights=hyper's generated weights, `model/hyper_weights.py`); `swapped` marks
        the call `_generated` makes with them in place (forward hooks see both calls)."""
        if swapped:
            return self._forward(h, ctx, state, documents)
        run = self._forward if weights is None else functools.partial(self._generated, weights)
        if self.activation_checkpointing and self.training and state is None:
            # the swap lies inside the checkpointed function, so the recompute in backward sees it too
            return checkpoint(run, h, ctx, None, documents, use_reentrant=False)
        return run(h, ctx, state, documents)

    def _generated(
        self,
        weights: dict[str, Tensor],
        h: Tensor,
        ctx: PositionContext,
        state: LayerState | None,
        documents: DocumentLayout | None,
    ) -> tuple[Tensor, LayerState | None, FFNAux]:
        """`_forward` with `weights` in place of the block's parameters of those names (swapped in for the
        call and back by `torch.func.functional_call`, which Dynamo traces without a graph break)."""
        return functional_call(self, weights, (h, ctx, state, documents), {"swapped": True})

    def _forward(
        self,
        h: Tensor,
        ctx: PositionContext,
        state: LayerState | None,
        documents: DocumentLayout | None = None,
    ) -> tuple[Tensor, LayerState | None, FFNAux]:
        x, carry = self.mixin_residual.read(h)
        mixed, mixin_state = self._mix(x, ctx, None if state is None else state.mixin, documents)
        h = self.mixin_residual.write(carry, mixed)
        x, carry = self.ffn_residual.read(h)
        fed, aux, ffn_state = self._feed(x, ctx, None if state is None else state.ffn, documents)
        h = self.ffn_residual.write(carry, fed)
        return h, None if state is None else LayerState(mixin_state, ffn_state), aux

    def _mix(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None, documents: DocumentLayout | None
    ) -> tuple[Tensor, MixinState | None]:
        """The mixin's output for its input x [B, T, D] (normed here), and its new state when decoding."""
        if documents is not None:
            normed = documents.unpack(self.mixin_norm(x))  # [N, L, D]
            return documents.pack(self.mixin(normed, ctx)[0], x), None
        if state is None:
            return self.mixin(self.mixin_norm(x), ctx)[0], None
        return self.mixin(self.mixin_norm(x), ctx, state)

    def _feed(
        self, x: Tensor, ctx: PositionContext, state: FFNState | None, documents: DocumentLayout | None
    ) -> tuple[Tensor, FFNAux, FFNState | None]:
        """The FFN's output for its input x [B, T, D] (normed here), its aux losses, and its new state.
        An FFN that reads earlier tokens (a token shift) sees zeros at pad positions: the input it would
        see before a row's first token, so a left-padded row equals the row run alone."""
        normed = self.ffn_norm(x)
        if self.ffn.state_size() > 0:
            normed = zero_pads(normed, ctx)
        if state is not None:
            return self.ffn.forward_with_state(normed, state)
        if documents is None or self.ffn.state_size() == 0:  # position-wise: packed as it is
            fed, aux = self.ffn(normed)
            return fed, aux, None
        fed, aux = self.ffn(documents.unpack(normed))
        return documents.pack(fed, x), aux, None
