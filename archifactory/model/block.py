"""The one place with residual + norm logic: x + mixin(norm(x)), then x + ffn(norm(x))."""

from __future__ import annotations

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from archifactory.model.ffn.base import FeedForward, FFNAux
from archifactory.model.mixins.base import Mixin, MixinState
from archifactory.model.norms import build_norm
from archifactory.model.positional import PositionContext


class Block(nn.Module):
    """A pre-norm residual block: N × [norm → mixin → +residual, norm → FFN → +residual]."""

    def __init__(self, mixin: Mixin, ffn: FeedForward, hidden_size: int, norm: str, norm_eps: float) -> None:
        super().__init__()
        self.mixin_norm = build_norm(norm, hidden_size, norm_eps)
        self.mixin = mixin
        self.ffn_norm = build_norm(norm, hidden_size, norm_eps)
        self.ffn = ffn
        self.activation_checkpointing = False  # recompute this block in backward instead of storing activations

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None, FFNAux]:
        if self.activation_checkpointing and self.training and state is None:
            return checkpoint(self._forward, x, ctx, None, use_reentrant=False)
        return self._forward(x, ctx, state)

    def _forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None
    ) -> tuple[Tensor, MixinState | None, FFNAux]:
        mixed, state = self.mixin(self.mixin_norm(x), ctx, state)
        x = x + mixed
        fed, aux = self.ffn(self.ffn_norm(x))
        return x + fed, state, aux
