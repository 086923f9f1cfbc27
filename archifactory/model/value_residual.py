"""Value residual learning (`model.value_residual=true`): every layer that declares values mixes the first
such layer's values into its own.

ResFormer (Zhou et al., "Value Residual Learning For Alleviating Attention Concentration In Transformers",
2024, arXiv:2410.17897) adds the first layer's attention values V_1 to layer n's, V_n ← λ₁ V_n + λ₂ V_1;
RWKV-7 (Peng et al. 2025, `v_first`) does the same with a data-dependent gate,
v ← v + (v_first − v) ⊙ σ(v₀ + (x_v W_a) W_b). Both are one rule here,

    v ← v + (v_first − v) ⊙ σ(g),       g = λ (one learned scalar per layer, init 0: ResFormer's λ₁ = λ₂ = ½)
                                          g = v₀ + (x W_a) W_b (a mixin that asks for a rank, RWKV-7's form)

a convex mix of a layer's own values and the first layer's, token by token (no mixing along T, so decoding
needs no extra state: a call's first-layer values for its own tokens are all a later layer needs).

The contract stays per layer (docs/architecture.md, "The component contract"): a mixin never learns about
other layers. It declares what it could mix (`Mixin.value_gate()`: the width of its values, a gate rank)
and calls `self.mix_first_values(v, ctx, x)` on its values; the model (`attach_value_residual`) gives the
first declaring layer a `ValueResidual` that stores its values in the call's `PositionContext` and every
later declaring layer one that mixes them in. Without `model.value_residual` nothing is attached and the
call returns v itself (bit-identical to a model without the option).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.positional import PositionContext


@dataclass(frozen=True)
class ValueGate:
    """A mixin's declaration: its values are [B, T, `width`] where it calls `mix_first_values`; `rank` > 0
    asks for a data-dependent gate from a low-rank projection of the tensor it passes (RWKV-7), 0 for a
    learned scalar (ResFormer)."""

    width: int
    rank: int = 0


class DeclaresValues(Protocol):
    """What `attach_value_residual` needs of a layer's mixin (`model/mixins/base.py` implements it)."""

    value_residual: ValueResidual | None

    def value_gate(self) -> ValueGate | None: ...


class ValueResidual(nn.Module):
    """One layer's value residual (module docstring). `first=True`: the first declaring layer, which stores
    its values in the call's context and has no weights; else the gate: a scalar λ (rank 0) or RWKV-7's
    v₀ [W] (init 1), W_a [W, r] (init 0) and W_b [r, W] (orthogonal × 0.1), RWKV-7's init."""

    def __init__(self, gate: ValueGate, first: bool) -> None:
        super().__init__()
        self.width, self.rank, self.first = gate.width, gate.rank, first
        if first:
            return
        if gate.rank == 0:
            self.lam = nn.Parameter(torch.zeros(1))
        else:
            self.v0 = nn.Parameter(torch.ones(gate.width))
            self.v1 = nn.Parameter(torch.zeros(gate.width, gate.rank))
            self.v2 = nn.Parameter(nn.init.orthogonal_(torch.empty(gate.rank, gate.width), gain=0.1))

    def forward(self, v: Tensor, ctx: PositionContext, x: Tensor | None = None) -> Tensor:
        """v [B, T, W] mixed with the first layer's values of this call; x [B, T, W] feeds a ranked gate."""
        if self.first:
            ctx.first_values = v
            return v
        first = ctx.first_values
        if first is None:
            raise RuntimeError("value residual: no first-layer values in this call's context")
        if self.rank == 0:
            logits = self.lam
        else:
            if x is None:
                raise RuntimeError("value residual: a data-dependent gate needs the mixin's gate input x")
            logits = self.v0 + (x @ self.v1.to(x.dtype)) @ self.v2.to(x.dtype)
        return v + (first.to(v.dtype) - v) * torch.sigmoid(logits).to(v.dtype)

    def flops_per_token(self) -> float:
        """The mix (a subtraction, a product, an addition per channel) and a ranked gate's projections."""
        if self.first:
            return 0.0
        return float(3 * self.width + 4 * self.width * self.rank)


def attach_value_residual(mixins: Sequence[DeclaresValues], names: Sequence[str]) -> None:
    """Give every mixin that declares values its `ValueResidual`: the first one stores, the later ones mix.
    `names` (each layer's mixin name) make the refusals readable. Refuses a model with no declaring layer
    and layers whose value widths differ (the first layer's values must fit every later layer's)."""
    declared = [(i, gate) for i, m in enumerate(mixins) if (gate := m.value_gate()) is not None]
    if not declared:
        raise ArchiFactoryError(
            f"model.value_residual=true, but no layer's mixin ({', '.join(sorted(set(names)))}) has a value "
            "projection to mix; use a mixin that declares one (gqa, deltanet, gated_deltanet, rwkv7, …) "
            "or set model.value_residual=false"
        )
    first_idx, first_gate = declared[0]
    for i, gate in declared:
        if gate.width != first_gate.width:
            raise ArchiFactoryError(
                f"model.value_residual=true: layer {i} ({names[i]}) has values {gate.width} wide, the first "
                f"layer with values ({first_idx}, {names[first_idx]}) {first_gate.width}; the first layer's "
                "values must fit every later layer's (match the value widths or turn the option off)"
            )
        mixins[i].value_residual = ValueResidual(gate, first=i == first_idx)


def default_gate_rank(width: int) -> int:
    """RWKV-7's LoRA rank of the value gate: max(32, round(1.3·√W / 32)·32)."""
    return max(32, round(1.3 * math.sqrt(width) / 32) * 32)
