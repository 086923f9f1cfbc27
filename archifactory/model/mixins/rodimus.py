"""Rodimus: a single-head GLA memory over an expanded width, with temperature-shaped gates.

Pads of a padded batch (`ctx.pad_mask`) are identity steps: a zero input to the short conv and to the
values, k = 0 (no write) and log-decay 0 (no decay), so a left-padded row ends in the row's own state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import ShortConvolution, fla_backend, fla_op, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.gla import chunk_gla, gla_step
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

FUSED_KERNEL = ("gla", "chunk_gla")  # fla's RodimusAttention calls chunk_gla with one head


def inner_width(hidden_size: int) -> int:
    """fla's d_inner: 2 · hidden rounded up to a multiple of 8."""
    return -(-2 * hidden_size // 8) * 8


@register_mixin("rodimus")
class Rodimus(Mixin):
    """Rodimus (He et al., "Rodimus*: Breaking the Accuracy-Efficiency Trade-Off with Efficient
    Attentions", ICLR 2025; fla's `RodimusAttention`, block_type `rodimus`).

    x is widened to d_inner = 2·hidden twice, u = up_proj x and the output gate z = gate_proj x; ũ =
    SiLU(conv(u)) (short causal conv). One head with an m-channel memory (m = `expand_ratio`):
        g_t = softplus(W_g ũ_t + b_g),  τ_t = sigmoid(W_τ ũ_t + b_τ)     (per memory channel)
        k_t = normalize(W_k ũ_t) ⊙ g_t^τ_t,   log α_t = −τ_t ⊙ g_t,    v_t = sigmoid(W_i2 W_i1 u_t + b_i) ⊙ u_t
        S_t = diag(α_t) S_{t−1} + k_t v_tᵀ,      o_t = S_tᵀ (W_q ũ_t) / √m
    — GLA with one head of key width m and value width d_inner (`reference/gla.py`, chunked). Then
    y = down_proj RMSNorm((o_t + r ⊙ ũ_t) ⊙ SiLU(z_t)) with the learnable per-channel skip r (ones at
    init). The temperature τ couples the decay and the write strength: a strong forget also writes
    strongly. fla's `rodimus_plus` block adds sliding-window shared-key attention after this layer; that
    is a block, not a mixer (use a hybrid with `swa` for the nearest ablation). Positional schemes are
    ignored. Decode state: S [B, 1, m, d_inner] + the conv buffer [B, d_inner, conv_size − 1].

    Options:
        expand_ratio: memory channels m (64); input_gate_low_rank: the value gate's rank (null = fla's
        auto, max(hidden / 64, 16)); use_short_conv / conv_size (4) / conv_bias (true); norm_eps (1e-5);
        k_norm_eps (1e-12); chunk_size: reference chunk length (per-channel decays need a pairwise
        [C, C, m] decay inside a chunk); backend: `auto` (fla's `chunk_gla` on CUDA), `reference`, `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        expand_ratio: int = 64,
        input_gate_low_rank: int | None = None,
        use_short_conv: bool = True,
        conv_size: int = 4,
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        k_norm_eps: float = 1e-12,
        chunk_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=rodimus"
        rank = max(hidden_size // 64, 16) if input_gate_low_rank is None else input_gate_low_rank
        if min(expand_ratio, rank, chunk_size, conv_size) < 1:
            raise ArchiFactoryError(
                f"{name}: expand_ratio, input_gate_low_rank, chunk_size and conv_size must be >= 1, got "
                f"{expand_ratio}, {rank}, {chunk_size}, {conv_size}"
            )
        self.backend = check_backend(backend, name)  # availability is checked per call
        self.inner = inner_width(hidden_size)
        self.mem_size, self.chunk_size = expand_ratio, chunk_size
        self.norm_eps, self.k_norm_eps = norm_eps, k_norm_eps
        # fla's up_proj and gate_proj in one matmul (the same parameters)
        self.in_proj = nn.Linear(hidden_size, 2 * self.inner, bias=False)
        self.conv = ShortConvolution(self.inner, conv_size, bias=conv_bias) if use_short_conv else None
        self.qk_proj = nn.Linear(self.inner, 2 * expand_ratio, bias=False)  # fla's q_proj, k_proj
        self.decay_proj = nn.Linear(self.inner, 2 * expand_ratio, bias=True)  # fla's g_gate, tau_gate
        self.i_gate_down = nn.Linear(self.inner, rank, bias=False)
        self.i_gate_up = nn.Linear(rank, self.inner, bias=True)
        self.residual_weight = nn.Parameter(torch.ones(self.inner))
        self.norm_weight = nn.Parameter(torch.ones(self.inner))
        self.out_proj = nn.Linear(self.inner, hidden_size, bias=False)  # fla's down_proj

    def init_roles(self) -> InitRoles:
        conv = () if self.conv is None else (self.conv,)  # the skip and norm gains start at 1
        return InitRoles(residual=(self.out_proj,), keep=(*own_parameters(self), *conv))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, 1, self.mem_size, self.inner)
        state = {"recurrent": torch.zeros(shape, device=device, dtype=compute_dtype(dtype))}
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size, device, dtype)
        return state

    def projections(
        self, x: Tensor, ctx: PositionContext, conv_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, log-decay [B, T, 1, m], v [B, T, 1, d_inner] (k, v, log-decay in the compute dtype and 0
        at pads), the conv output ũ, the output gate z and the new conv buffer."""
        dtype = compute_dtype(x.dtype)
        up, gate = self.in_proj(x).split(self.inner, dim=-1)
        up = zero_pads(up, ctx)  # pads: a zero conv input and a zero value
        shifted, new_conv = (up, None) if self.conv is None else self.conv(up, conv_state)
        q, k = self.qk_proj(shifted).split(self.mem_size, dim=-1)
        g, tau = self.decay_proj(shifted).to(dtype).split(self.mem_size, dim=-1)
        g, tau = F.softplus(g), torch.sigmoid(tau)
        k = F.normalize(k.to(dtype), dim=-1, eps=self.k_norm_eps) * g.pow(tau)
        v = torch.sigmoid(self.i_gate_up(self.i_gate_down(up))).to(dtype) * up.to(dtype)
        k, log_decay = zero_pads(k, ctx), zero_pads(-tau * g, ctx)  # pads: no write, no decay
        heads = (*x.shape[:2], 1, -1)
        return (
            q.view(heads), k.view(heads), log_decay.view(heads), v.view(heads), shifted, gate, new_conv
        )  # fmt: skip

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        conv_state = None if state is None else state.get("conv")
        q, k, g, v, shifted, gate, new_conv = self.projections(x, ctx, conv_state)
        past = None if state is None else state["recurrent"]
        if past is not None and x.shape[1] == 1:
            out, new_state = gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], past)
            out = out[:, None]
        elif self.backend_name() == "fused":
            kernel = fla_op(*FUSED_KERNEL)
            out, new_state = kernel(
                q=q, k=k.to(q.dtype), v=v.to(q.dtype), g=g.float(),
                initial_state=None if past is None else past.float(), output_final_state=past is not None,
            )  # fmt: skip
            new_state = None if past is None else new_state.to(past.dtype)
        else:
            out, new_state = chunk_gla(q, k, v, g, None, past, past is not None, self.chunk_size)
        dtype = compute_dtype(x.dtype)
        mixed = out.flatten(2).to(dtype) + shifted.to(dtype) * self.residual_weight.to(dtype)
        y = head_rms_norm(mixed[..., None, :], self.norm_weight, self.norm_eps, gate, gate_first=True)
        y = self.out_proj(y.to(x.dtype))
        if state is None:
            return y, None
        new = {"recurrent": new_state}
        if new_conv is not None:
            new["conv"] = new_conv
        return y, new

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.out_proj.weight, FUSED_KERNEL, "mixin=rodimus")

    def flops_per_token(self, seq_len: int) -> float:
        conv = 0 if self.conv is None else self.conv.flops_per_token()
        chunk, m, d = min(self.chunk_size, max(seq_len, 1)), self.mem_size, self.inner
        # chunked GLA with one head: decayed q·k scores and scores·v over a chunk, q·S and the state
        # update; the gates, key norm, skip and gated norm a few per channel
        rule = 2 * chunk * (m + d) + 4 * m * d
        return projection_flops(self) + conv + rule + 8 * m + 8 * d

    def state_size(self, seq_len: int) -> int:
        conv = 0 if self.conv is None else self.conv.state_size()
        return self.mem_size * self.inner + conv
