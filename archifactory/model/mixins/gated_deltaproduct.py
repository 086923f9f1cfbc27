"""Gated DeltaProduct: several delta-rule (generalised Householder) steps per token.

The layer is the delta-rule body of `deltanet.py` with `num_householder` keys, values and βs per token;
the recurrence is the chunked delta rule of `reference/delta_rule.py` run over the interleaved sequence
of T · n sub-steps (the decay on each token's first sub-step, the query read after its last), which is
exactly fla's construction (`chunk_gated_delta_product_ref`). On CUDA fla's `chunk_gated_delta_product`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.deltanet import DeltaRuleMixin
from archifactory.model.mixins.kit import fla_op
from archifactory.model.mixins.reference.delta_rule import chunk_delta_rule, delta_rule_step


def interleave_substeps(q: Tensor, g: Tensor | None, steps: int) -> tuple[Tensor, Tensor | None]:
    """Per-token q [B, T, H, K] and log-decay g [B, T, H] spread over `steps` sub-steps per token: q only
    on the last sub-step (zeros before it), g only on the first (zeros after it). -> [B, T·steps, ...]."""
    batch, seq_len = q.shape[:2]
    q_zeros = q.new_zeros(batch, seq_len, steps - 1, *q.shape[2:])
    q_sub = torch.cat([q_zeros, q[:, :, None]], dim=2).flatten(1, 2)
    if g is None:
        return q_sub, None
    g_zeros = g.new_zeros(batch, seq_len, steps - 1, *g.shape[2:])
    return q_sub, torch.cat([g[:, :, None], g_zeros], dim=2).flatten(1, 2)


def chunk_delta_product(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    g: Tensor | None,
    steps: int,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor | None]:
    """The gated delta product, chunked: q [B, T, H, K], g None or [B, T, H]; k [B, T·steps, H, K], v
    [B, T·steps, H, V], β [B, T·steps, H] (token t's sub-steps at t·steps .. t·steps + steps − 1). Scale
    1/sqrt(K). Returns o [B, T, H, V] and, if asked, the final state [B, H, K, V]; `chunk_size` counts
    sub-steps."""
    batch, seq_len, heads = q.shape[:3]
    q_sub, g_sub = interleave_substeps(q, g, steps)
    out, state = chunk_delta_rule(
        q_sub, k, v, beta, g_sub, q.shape[-1] ** -0.5, initial_state, output_final_state, chunk_size
    )
    return out.view(batch, seq_len, steps, heads, -1)[:, :, -1], state


def delta_product_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One token: q [B, H, K], g None or [B, H]; k [B, steps, H, K], v [B, steps, H, V], β [B, steps, H]."""
    for j in range(k.shape[1]):
        out, state = delta_rule_step(q, k[:, j], v[:, j], beta[:, j], g if j == 0 else None, state)
    return out, state


@register_mixin("gated_deltaproduct")
class GatedDeltaProduct(DeltaRuleMixin):
    """Gated DeltaProduct (Siems et al., "DeltaProduct: Improving State-Tracking in Linear RNNs via
    Householder Products", 2025).

    Each token takes n = `num_householder` delta-rule steps with its own keys k_{t,j}, values v_{t,j} and
    β_{t,j} (j = 1..n), after one Gated-DeltaNet decay α_t = exp(g_t):
        S ← α_t S,   then for j = 1..n:  S ← (I − β_{t,j} k_{t,j} k_{t,j}ᵀ) S + β_{t,j} k_{t,j} v_{t,j}ᵀ,
        o_t = S_tᵀ q_t / sqrt(d_k)
    — the state transition is a product of n generalised Householder matrices, which (with β ∈ (0, 2),
    `allow_neg_eigval`) lets the layer track richer state (permutations) than DeltaNet's single step.
    g_t = −exp(A_log) · softplus(a_proj x_t + dt_bias) as in Gated DeltaNet (A ~ U[0, 16], fla's init);
    without `use_forget_gate`, plain DeltaProduct. q, k, v: short causal conv + SiLU, q/k L2-normalised
    per head; output: per-head RMSNorm gated by SiLU(g_proj x), out_proj. Decode state: S [B, H, d_k,
    d_v] and the conv buffer. Parameters: d·(d + n·(d + d_v)) + d·H·n (+ d·H and 2H with the forget gate,
    + d·d_v with the gate) + d_v·d + conv.

    Options:
        num_heads (d_k = hidden / num_heads); expand_v: d_v = d_k · expand_v; num_householder: n ≥ 1
        (1 is Gated DeltaNet); use_forget_gate: the decay α_t; use_short_conv / conv_size; use_gate: SiLU
        output gate; allow_neg_eigval: β ∈ (0, 2); norm_eps; chunk_size: chunk length of the reference in
        sub-steps (chunk_size / n tokens); backend: `auto` (fla's `chunk_gated_delta_product` on CUDA),
        `reference` or `fused`.
    """

    fused_kernel = ("gated_delta_product", "chunk_gated_delta_product")

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        expand_v: float = 2.0,
        num_householder: int = 2,
        use_forget_gate: bool = True,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = True,
        allow_neg_eigval: bool = True,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        if num_householder < 1:
            raise ArchiFactoryError(
                f"mixin=gated_deltaproduct: num_householder={num_householder}; use 1 or more Householder steps"
            )
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, chunk_size=chunk_size, backend=backend,
            num_householder=num_householder, head_decay=(0.0, 16.0) if use_forget_gate else None,
        )  # fmt: skip

    def _delta_rule(
        self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, past: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """q [B, T, H, K], g [B, T, H]; k, v, β with n sub-steps per token [B, T·n, ...]."""
        if past is not None and q.shape[1] == 1:  # decode: the n sub-steps of one token
            out, state = delta_product_step(q[:, 0], k, v, beta, None if g is None else g[:, 0], past)
            return out[:, None], state
        if self.backend_name() == "fused":
            return self._fused_product(q, k, v, beta, g, past)
        steps = self.num_householder
        return chunk_delta_product(q, k, v, beta, g, steps, past, past is not None, self.chunk_size)

    def _fused_product(
        self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, past: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        kernel = fla_op(*self.fused_kernel)
        out, new_state = kernel(
            q=q, k=k, v=v, g=None if g is None else g.float().contiguous(), beta=beta.to(q.dtype),
            num_householder=self.num_householder,
            initial_state=None if past is None else past.float(), output_final_state=past is not None,
        )  # fmt: skip
        return out, None if past is None else new_state.to(past.dtype)
