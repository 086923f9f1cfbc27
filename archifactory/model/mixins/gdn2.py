"""Gated DeltaNet-2: Kimi Delta Attention with channel-wise erase and write gates.

The layer shape is `deltanet.py`'s KDA (fused q/k/v projection, short conv + SiLU, L2-normalised q/k, a
low-rank per-channel decay, a low-rank sigmoid-gated per-head RMSNorm, out_proj) with the scalar β
replaced by an erase gate b ∈ [0, 1]^{d_k} and a write gate w ∈ [0, 1]^{d_v}. The recurrence is the
delta rule reading the state with the key b ⊙ k and writing w ⊙ v with k, so the reference is
`reference/delta_rule.py`'s chunked form with its `read_key`; on CUDA fla's `chunk_gdn2`. Pads of a
padded batch are identity steps: a zero input to the short conv, b = w = 0 (no erase, no write) and
log-decay 0 (no decay).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import MixinState
from archifactory.model.mixins.deltanet import KimiDeltaAttention
from archifactory.model.mixins.kit import fla_op, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import chunk_delta_rule, delta_rule_step, l2_normalize
from archifactory.model.positional import PositionContext


def gdn2_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    erase: Tensor,
    write: Tensor,
    initial_state: Tensor | None,
    output_final_state: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None]:
    """S_t = (I − k_t (b_t ⊙ k_t)ᵀ) diag(exp g_t) S_{t-1} + k_t (w_t ⊙ v_t)ᵀ, o_t = S_tᵀ q_t / sqrt(K): the
    chunked delta rule with β = 1, value w ⊙ v and the read key b ⊙ k (the written key stays k).
    q/k/g/erase [B, T, H, K], v/write [B, T, H, V]; one token (T = 1) with a state steps directly."""
    read, wv, ones = erase * k, write * v, erase.new_ones(erase.shape[:3])
    if initial_state is not None and q.shape[1] == 1:
        out, state = delta_rule_step(
            q[:, 0], k[:, 0], wv[:, 0], ones[:, 0], g[:, 0], initial_state, read_key=read[:, 0]
        )
        return out[:, None], state
    return chunk_delta_rule(
        q, k, wv, ones, g, None, initial_state, output_final_state, chunk_size, read_key=read
    )


@register_mixin("gdn2")
class GatedDeltaNet2(KimiDeltaAttention):
    """Gated DeltaNet-2 (fla's `GatedDeltaNet2`, "Gated DeltaNet-2: Decoupling Erase and Write in Linear
    Attention").

    KDA's per-channel decay g_t = −exp(A_log) · softplus(f_proj x_t + dt_bias) with two channel-wise
    gates in place of its scalar β: the erase gate b_t = sigmoid(b_proj x_t) ∈ [0, 1]^{d_k} on the key
    axis and the write gate w_t = sigmoid(w_proj x_t) ∈ [0, 1]^{d_v} on the value axis,
        S_t = (I − k_t (b_t ⊙ k_t)ᵀ) diag(exp g_t) S_{t-1} + k_t (w_t ⊙ v_t)ᵀ,      o_t = S_tᵀ q_t / sqrt(d_k)
    (b = w = β recovers KDA). Output: per-head RMSNorm gated by sigmoid(g_proj x) (low-rank with a bias),
    out_proj. Init as KDA (A ~ U[1, 16] per head, dt ~ log-U[0.001, 0.1] per channel). Decode state:
    S [B, H, d_k, d_v] and the conv buffer.

    Options: num_heads (d_k = hidden / num_heads); expand_v: d_v = d_k · expand_v; use_short_conv /
    conv_size; allow_neg_eigval: b ∈ (0, 2); norm_eps; chunk_size (the reference's chunk; per-channel
    decays are sub-chunked); backend: `auto` (fla's `chunk_gdn2` on CUDA), `reference` or
    `fused`.
    """

    fused_kernel = ("gdn2", "chunk_gdn2")

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size, layer_idx, num_heads=num_heads, expand_v=expand_v, use_short_conv=use_short_conv,
            conv_size=conv_size, allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, chunk_size=chunk_size,
            backend=backend,
        )  # fmt: skip
        self.b_proj = nn.Linear(hidden_size, self.key_dim, bias=False)  # the erase gate (KDA's: one β)
        self.w_proj = nn.Linear(hidden_size, self.value_dim, bias=False)  # the write gate

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        qkv = zero_pads(self.qkv_proj(x), ctx)  # pads: a zero input to the short conv
        conv_state = None
        if self.conv is not None:
            qkv, conv_state = self.conv(qkv, None if state is None else state["conv"])
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        v = self.mix_first_values(v, ctx)  # model.value_residual (ResFormer); else v itself
        heads = (batch, seq_len, self.num_heads)
        q = l2_normalize(q.reshape(*heads, self.head_k_dim))  # [B, T, H, K]
        k = l2_normalize(k.reshape(*heads, self.head_k_dim))
        v = v.reshape(*heads, self.head_v_dim)  # [B, T, H, V]
        dtype = compute_dtype(x.dtype)
        # pads are identity steps: no erase, no write (b = w = 0) and log-decay 0
        erase = zero_pads(torch.sigmoid(self.b_proj(x).to(dtype)), ctx).view(*heads, self.head_k_dim)
        if self.allow_neg_eigval:
            erase = 2 * erase
        write = zero_pads(torch.sigmoid(self.w_proj(x).to(dtype)), ctx).view(*heads, self.head_v_dim)
        g = zero_pads(self.log_decay(x), ctx)  # [B, T, H, K]
        past = None if state is None else state["recurrent"]
        if self.backend_name() == "fused" and not (past is not None and seq_len == 1):
            out, new_state = self._fused_gdn2(q, k, v, g, erase, write, past)
        else:
            out, new_state = gdn2_rule(q, k, v, g, erase, write, past, past is not None, self.chunk_size)
        out = head_rms_norm(out, self.norm_weight, self.norm_eps, self.output_gate(x), self.gate_activation)
        y = self.out_proj(out.to(x.dtype))
        if state is None:
            return y, None
        new = {"recurrent": new_state}
        if conv_state is not None:
            new["conv"] = conv_state
        return y, new

    def _fused_gdn2(
        self, q: Tensor, k: Tensor, v: Tensor, g: Tensor, erase: Tensor, write: Tensor, past: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        kernel = fla_op(*self.fused_kernel)
        out, new_state = kernel(
            q=q, k=k, v=v.to(q.dtype), g=g.float().contiguous(), b=erase.to(q.dtype), w=write.to(q.dtype),
            initial_state=None if past is None else past.float(), output_final_state=past is not None,
        )  # fmt: skip
        return out, None if past is None else new_state.to(past.dtype)
