"""The delta-rule mixers: DeltaNet, Gated DeltaNet and Kimi Delta Attention.

They share one layer shape (fla's): a fused q/k/v projection, a short causal depthwise conv + SiLU on
q, k and v, L2-normalised q and k per head, β = sigmoid(b_proj x), the chunked delta rule of
`reference/delta_rule.py` (fla's Triton kernel on CUDA), a per-head RMSNorm (gated when the layer has an
output gate) and `out_proj`. They differ only in the decay: none, one scalar per head, one per channel.

Padded batches (`ctx.pad_mask`): a pad position is an identity step — a zero input to the short conv,
β = 0 (no write) and log-decay 0 (no decay) — set on the layer's inputs, so the reference and the fused
kernel both leave the state of a left-padded row exactly as the row alone would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    HeadDecay,
    ShortConvolution,
    fla_backend,
    fla_op,
    head_rms_norm,
    inverse_softplus_dt,
    key_head_size,
    low_rank_gate,
    value_heads,
    zero_pads,
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import chunk_delta_rule, delta_rule_step, l2_normalize
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters
from archifactory.model.value_residual import ValueGate


class DeltaRuleMixin(Mixin):
    """Shared body of the delta-rule mixers (not registered itself); subclasses define `log_decay`."""

    fused_kernel: tuple[str, str] = ("delta_rule", "chunk_delta_rule")
    # whether the fused kernel maps value head j to key head j // (H_v / H) itself (fla's GVA); else q/k
    # are repeated per value head before it
    fused_gva: bool = False

    def __init__(
        self,
        *,
        hidden_size: int,
        layer_idx: int,
        num_heads: int,
        expand_v: float,
        use_short_conv: bool,
        conv_size: int,
        use_gate: bool,
        allow_neg_eigval: bool,
        norm_eps: float,
        chunk_size: int,
        backend: str,
        num_householder: int = 1,
        head_decay: tuple[float, float] | None = None,
        num_v_heads: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = f"mixin={self.registry_name}"
        self.head_k_dim = key_head_size(hidden_size, num_heads, head_dim, name)
        self.num_v_heads = value_heads(num_heads, num_v_heads, name)
        head_v_dim = self.head_k_dim * expand_v
        if not float(head_v_dim).is_integer() or head_v_dim < 1:
            raise ArchiFactoryError(
                f"{name}: expand_v={expand_v} gives a value head of {head_v_dim} channels; "
                "pick expand_v so that the key head size (head_dim, or hidden_size / num_heads) · expand_v "
                "is a whole number"
            )
        if chunk_size < 1 or (use_short_conv and conv_size < 2):
            raise ArchiFactoryError(
                f"{name}: need chunk_size >= 1 and conv_size >= 2, got {chunk_size}, {conv_size}"
            )
        self.backend = check_backend(backend, name)  # availability is checked per call
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.num_heads, self.head_v_dim = num_heads, int(head_v_dim)
        # H key heads of d_k, H_v value heads of d_v (β, the decay, the state and the output norm per value
        # head); each key head serves H_v / H consecutive value heads (fla's GVA, Qwen3-Next)
        self.key_dim, self.value_dim = num_heads * self.head_k_dim, self.num_v_heads * self.head_v_dim
        self.allow_neg_eigval = allow_neg_eigval
        # GatedDeltaProduct's n keys, values and βs per token (n = 1: one delta step, the other mixers)
        self.num_householder = num_householder
        width = self.key_dim + num_householder * (self.key_dim + self.value_dim)
        self.qkv_proj = nn.Linear(hidden_size, width, bias=False)
        self.conv = ShortConvolution(width, conv_size) if use_short_conv else None
        self.b_proj = nn.Linear(hidden_size, self.num_v_heads * num_householder, bias=False)
        # `head_decay`: the A init range of a Mamba2-style scalar decay per head (None: no such decay)
        self.head_decay = None if head_decay is None else HeadDecay(hidden_size, self.num_v_heads, head_decay)
        self.g_proj = self.make_output_gate(hidden_size) if use_gate else None
        self.norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def make_output_gate(self, hidden_size: int) -> nn.Module:
        """The output gate's projection x -> [B, T, value_dim]: one Linear (KDA's is low-rank)."""
        return nn.Linear(hidden_size, self.value_dim, bias=False)

    def log_decay(self, x: Tensor) -> Tensor | None:
        """log D_t: None (no decay), [B, T, H] or [B, T, H, K], in the compute dtype."""
        return None if self.head_decay is None else self.head_decay(x)

    def output_gate(self, x: Tensor) -> Tensor | None:
        """The output gate's pre-activation [B, T, value_dim], or None without a gate."""
        return None if self.g_proj is None else self.g_proj(x)

    gate_activation: str = "swish"

    def init_roles(self) -> InitRoles:
        # the output-norm gain and the decay parameters (A_log, dt_bias; the head decay's) are drawn in
        # the constructors; the short conv keeps its own init
        decay = () if self.head_decay is None else self.head_decay.init_keep()
        conv = () if self.conv is None else (self.conv,)
        return InitRoles(residual=(self.out_proj,), keep=(*own_parameters(self), *decay, *conv))

    def value_gate(self) -> ValueGate:
        return ValueGate(self.num_householder * self.value_dim)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        dtype = compute_dtype(dtype)
        state = {
            "recurrent": torch.zeros(
                batch_size, self.num_v_heads, self.head_k_dim, self.head_v_dim, device=device, dtype=dtype
            )
        }
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size, device, dtype)
        return state

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
        steps = self.num_householder  # k, v and β come as `steps` sub-steps per token: [B, T·steps, H, *]
        q, k, v = qkv.split([self.key_dim, steps * self.key_dim, steps * self.value_dim], dim=-1)
        v = self.mix_first_values(v, ctx)  # model.value_residual (ResFormer); else v itself
        q = l2_normalize(q.reshape(batch, seq_len, self.num_heads, self.head_k_dim))  # [B, T, H, K]
        k = l2_normalize(k.reshape(batch, seq_len * steps, self.num_heads, self.head_k_dim))
        v = v.reshape(batch, seq_len * steps, self.num_v_heads, self.head_v_dim)  # [B, T·steps, H_v, V]
        # pads are identity steps of the delta rule: β = 0 (no write) and log-decay 0 (no decay)
        beta = zero_pads(torch.sigmoid(self.b_proj(x).to(compute_dtype(x.dtype))), ctx)  # [B, T, H_v·steps]
        beta = beta.reshape(batch, seq_len * steps, self.num_v_heads)
        if self.allow_neg_eigval:  # β in (0, 2): eigenvalues of I - β k kᵀ in (-1, 1)
            beta = 2 * beta
        g = self.log_decay(x)
        g = None if g is None else zero_pads(g, ctx)
        past = None if state is None else state["recurrent"]
        out, new_state = self._delta_rule(q, k, v, beta, g, past)
        out = head_rms_norm(out, self.norm_weight, self.norm_eps, self.output_gate(x), self.gate_activation)
        y = self.out_proj(out.to(x.dtype))
        if state is None:
            return y, None
        new = {"recurrent": new_state}
        if conv_state is not None:
            new["conv"] = conv_state
        return y, new

    def per_value_head(self, t: Tensor) -> Tensor:
        """q or k [B, T, H, K] -> [B, T, H_v, K]: key head h repeated for its value heads h·G .. h·G + G − 1
        (G = H_v / H); t itself when every key head has one value head."""
        groups = self.num_v_heads // self.num_heads
        return t if groups == 1 else t.repeat_interleave(groups, dim=2)

    def _delta_rule(
        self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, past: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """q/k [B, T, H, K] (one key head per group of value heads), v [B, T, H_v, V], β and g per value head."""
        if past is not None and q.shape[1] == 1:
            q, k = self.per_value_head(q), self.per_value_head(k)
            out, new_state = delta_rule_step(
                q[:, 0], k[:, 0], v[:, 0], beta[:, 0], None if g is None else g[:, 0], past
            )
            return out[:, None], new_state
        if self.backend_name() == "fused":
            return self._fused(q, k, v, beta, g, past)
        q, k = self.per_value_head(q), self.per_value_head(k)
        return chunk_delta_rule(q, k, v, beta, g, None, past, past is not None, self.chunk_size)

    def _fused(
        self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor | None, past: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if not self.fused_gva:
            q, k = self.per_value_head(q), self.per_value_head(k)
        kernel = fla_op(*self.fused_kernel)
        extra = {} if g is None else {"g": g.float().contiguous()}
        out, new_state = kernel(
            q=q, k=k, v=v, beta=beta.to(q.dtype), **extra,
            initial_state=None if past is None else past.float(), output_final_state=past is not None,
        )  # fmt: skip
        return out, None if past is None else new_state.to(past.dtype)

    def backend_name(self) -> str:
        return fla_backend(
            self.backend, self.qkv_proj.weight, self.fused_kernel, f"mixin={self.registry_name}"
        )

    def flops_per_token(self, seq_len: int) -> float:
        projections = projection_flops(self)
        conv = 0 if self.conv is None else self.conv.flops_per_token()
        # chunked delta rule per head and token: k·k and q·k scores, the (I + A)⁻¹ solve (C³/3 per chunk),
        # W_v and W_k, and per token the u = W_v − W_k S, q·S, and state-update products
        # (GatedDeltaProduct: per Householder sub-step, chunks counted in sub-steps)
        steps = self.num_householder
        chunk = min(self.chunk_size, max(seq_len * steps, 1))
        # (GVA: the rule runs once per value head, each on its group's shared q/k)
        k_dim, v_dim = self.head_k_dim, self.head_v_dim
        rule = self.num_v_heads * (
            6 * chunk * k_dim + 4 * chunk * v_dim + 2 * chunk * chunk / 3 + 6 * k_dim * v_dim
        )
        return projections + conv + steps * rule

    def state_size(self, seq_len: int) -> int:
        conv = 0 if self.conv is None else self.conv.state_size()
        return self.num_v_heads * self.head_k_dim * self.head_v_dim + conv


@register_mixin("deltanet")
class DeltaNet(DeltaRuleMixin):
    """DeltaNet (Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence
    Length", 2024; the delta rule of Schlag et al., 2021).

    Per head, with L2-normalised q/k (after a short causal conv + SiLU) and β_t = sigmoid(b_proj x_t):
        S_t = S_{t-1} + β_t k_t (v_t − S_{t-1}ᵀ k_t)ᵀ,      o_t = S_tᵀ q_t / sqrt(d_k)
    — the state is corrected toward each new key-value pair instead of only accumulating. Computed in the
    chunked WY form (one triangular solve per chunk). Then a per-head RMSNorm (gated by SiLU(g_proj x)
    with `use_gate`) and out_proj. Positional schemes are ignored. Decode state: S [B, H_v, d_k, d_v]
    and the conv buffer. Parameters: d·(2H·d_k + H_v·d_v) + d·H_v + H_v·d_v·d (+ d·H_v·d_v with the gate)
    + conv (2d·d + 2d·d_v + d·H + conv by default).

    Grouped value heads (fla's GVA, Qwen3-Next): with num_v_heads = G·num_heads, each of the H key heads
    (q and k) serves G consecutive value heads; β, the state, the output norm and gate are per value head.

    Options:
        num_heads: key heads H; num_v_heads: value heads H_v (null = H; a multiple of H); head_dim: the key
        head size d_k (null = hidden / num_heads); expand_v: d_v = d_k · expand_v;
        use_short_conv / conv_size: the causal depthwise conv on q, k, v (kernel 4 in the paper);
        use_gate: SiLU output gate; allow_neg_eigval: β ∈ (0, 2) (Grazzi et al., 2025);
        norm_eps: RMSNorm epsilon; chunk_size: chunk length of the reference;
        backend: `auto` (fla's `chunk_delta_rule` on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        num_v_heads: int | None = None,
        head_dim: int | None = None,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = False,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, chunk_size=chunk_size, backend=backend,
            num_v_heads=num_v_heads, head_dim=head_dim,
        )  # fmt: skip


@register_mixin("gated_deltanet")
class GatedDeltaNet(DeltaRuleMixin):
    """Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with Delta
    Rule", 2025).

    DeltaNet with a per-head scalar decay α_t = exp(g_t), Mamba2-parameterised:
        g_t = −exp(A_log) · softplus(a_proj x_t + dt_bias),
        S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,      o_t = S_tᵀ q_t / sqrt(d_k)
    (gating lets the state forget quickly, the delta rule overwrite precisely). Output: per-head RMSNorm
    gated by SiLU(g_proj x), then out_proj. Init (the paper's and fla's): A ~ U[0, 16], dt ~
    log-U[0.001, 0.1] (stored as softplus⁻¹). Decode state: S [B, H_v, d_k, d_v] and the conv buffer.
    With num_v_heads (fla's GVA; Qwen3-Next uses 16 key and 32 value heads of 128) the decay is per value
    head too.

    Options: as DeltaNet, num_v_heads and head_dim included (expand_v 2 and use_gate true by default, as
    in the paper's layer), backend `auto` takes fla's `chunk_gated_delta_rule` on CUDA (GVA natively).
    """

    fused_kernel = ("gated_delta_rule", "chunk_gated_delta_rule")
    fused_gva = True

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        num_v_heads: int | None = None,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        use_gate: bool = True,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=use_gate,
            allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, chunk_size=chunk_size, backend=backend,
            head_decay=(0.0, 16.0), num_v_heads=num_v_heads, head_dim=head_dim,
        )  # fmt: skip


@register_mixin("kda")
class KimiDeltaAttention(DeltaRuleMixin):
    """Kimi Delta Attention (Moonshot AI, "Kimi Linear: An Expressive, Efficient Attention
    Architecture", 2025).

    Gated DeltaNet with a per-channel (diagonal) decay: g_t ∈ R^{d_k} per head,
        g_t = −exp(A_log) · softplus(f_proj x_t + dt_bias)   (f_proj low-rank: d → d_v → d_k·H),
        S_t = (I − β_t k_t k_tᵀ) diag(exp g_t) S_{t-1} + β_t k_t v_tᵀ,      o_t = S_tᵀ q_t / sqrt(d_k).
    Output: per-head RMSNorm gated by sigmoid(g_proj x) (g_proj low-rank d → d_v → value width, with a
    bias), then out_proj. Init: A ~ U[1, 16] per head, dt ~ log-U[0.001, 0.1] per channel. The pairwise
    per-channel decay inside a chunk costs C·d_k memory per token, hence the smaller default chunk.
    Decode state: S [B, H, d_k, d_v] and the conv buffer.

    Options: as DeltaNet (use_gate true: KDA always gates its output); backend `auto` takes fla's
    `chunk_kda` on CUDA.
    """

    fused_kernel = ("kda", "chunk_kda")
    gate_activation = "sigmoid"

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        expand_v: float = 1.0,
        use_short_conv: bool = True,
        conv_size: int = 4,
        allow_neg_eigval: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            hidden_size=hidden_size, layer_idx=layer_idx, num_heads=num_heads, expand_v=expand_v,
            use_short_conv=use_short_conv, conv_size=conv_size, use_gate=True,
            allow_neg_eigval=allow_neg_eigval, norm_eps=norm_eps, chunk_size=chunk_size, backend=backend,
        )  # fmt: skip
        self.f_proj = nn.Sequential(
            nn.Linear(hidden_size, self.head_v_dim, bias=False),
            nn.Linear(self.head_v_dim, self.key_dim, bias=False),
        )
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(1, 16).log())
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.key_dim))

    def log_decay(self, x: Tensor) -> Tensor:
        dtype = compute_dtype(x.dtype)
        batch, seq_len, _ = x.shape
        dt = F.softplus(self.f_proj(x).to(dtype) + self.dt_bias.to(dtype))  # [B, T, H·K]
        dt = dt.view(batch, seq_len, self.num_heads, self.head_k_dim)
        return -torch.exp(self.A_log.to(dtype))[:, None] * dt  # [B, T, H, K]

    def make_output_gate(self, hidden_size: int) -> nn.Module:
        return low_rank_gate(hidden_size, self.head_v_dim, self.value_dim)
