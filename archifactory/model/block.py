"""The one place with residual + norm logic: x + mixin(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from archifactory.model.documents import DocumentLayout
from archifactory.model.ffn.base import FeedForward, FFNAux, FFNState
from archifactory.model.mixins.base import Mixin, MixinState
from archifactory.model.norms import build_norm
from archifactory.model.positional import PositionContext


@dataclass
class LayerState:
    """One block's decode state: the mixin's and the FFN's (empty for position-wise FFNs)."""

    mixin: MixinState
    ffn: FFNState


class Block(nn.Module):
    """A pre-norm residual block: N × [norm → mixin → +residual, norm → FFN → +residual]."""

    def __init__(self, mixin: Mixin, ffn: FeedForward, hidden_size: int, norm: str, norm_eps: float) -> None:
        super().__init__()
        self.mixin_norm = build_norm(norm, hidden_size, norm_eps)
        self.mixin = mixin
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
        x: Tensor,
        ctx: PositionContext,
        state: LayerState | None = None,
        documents: DocumentLayout | None = None,
    ) -> tuple[Tensor, LayerState | None, FFNAux]:
        """With `documents` (document-aware packing, `model/documents.py`) the mixin, and an FFN that reads
        earlier tokens, run on each document alone; `ctx` then holds the per-document positions."""
        if self.activation_checkpointing and self.training and state is None:
            return checkpoint(self._forward, x, ctx, None, documents, use_reentrant=False)
        return self._forward(x, ctx, state, documents)

    def _forward(
        self,
        x: Tensor,
        ctx: PositionContext,
        state: LayerState | None,
        documents: DocumentLayout | None = None,
    ) -> tuple[Tensor, LayerState | None, FFNAux]:
        if documents is not None:
            normed = documents.unpack(self.mixin_norm(x))  # [N, L, D]
            x = x + documents.pack(self.mixin(normed, ctx)[0], x)
            if self.ffn.state_size() == 0:  # position-wise: packed as it is
                fed, aux = self.ffn(self.ffn_norm(x))
                return x + fed, None, aux
            fed, aux = self.ffn(documents.unpack(self.ffn_norm(x)))
            return x + documents.pack(fed, x), None, aux
        if state is None:
            x = x + self.mixin(self.mixin_norm(x), ctx)[0]
            fed, aux = self.ffn(self.ffn_norm(x))
            return x + fed, None, aux
        mixed, mixin_state = self.mixin(self.mixin_norm(x), ctx, state.mixin)
        x = x + mixed
        fed, aux, ffn_state = self.ffn.forward_with_state(self.ffn_norm(x), state.ffn)
        return x + fed, LayerState(mixin_state, ffn_state), aux
