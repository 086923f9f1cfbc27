"""CyFA: linear attention whose memory is partitioned by relative time on a learned clock (fla's CyFA).

The layer follows fla's `CyclicFlowAttention`: q/k/v projections through linear (no SiLU) short convs,
per-head RMSNorm on q and k, a Mamba2-style scalar log-decay per head, a write strength β and a clock step
δ (computed from the detached input, as fla: the clock's input path gets no gradient), the two-pass
slot recurrence of `reference/cyfa.py`, then the output scaled by P (so small readouts stay above the
norm's eps, as fla), a per-head RMSNorm gated by sigmoid of a low-rank projection, and o_proj. Pads of a
padded batch are identity steps: zero conv inputs, β = 0 (no write), log-decay 0 and δ = 0 (the clock
stands still).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    HeadDecay,
    ShortConvolution,
    check_divisible,
    fla_backend,
    head_rms_norm,
    low_rank_gate,
    zero_pads,
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.cyfa import FUSED_KERNEL, cyfa_fused, cyfa_reference, empty_state
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


@register_mixin("cyfa")
class CyclicFlowAttention(Mixin):
    """Cyclic Flow Attention ("CyFA: Linear Sequence Modeling with Relative-Time-Partitioned Memory",
    arXiv:2609.36259, 2026, code by Yixiao Chen; fla's `CyclicFlowAttention`).

    Per head, a learned clock λ_t = Σ δ_j with δ_t = sigmoid(d_proj x_t) ∈ (0, 1) places each token on a
    circle of P = num_slots − 1 lags. Keys and values are written, with strength β_t = sigmoid(b_proj x_t),
    into aligned memories H^k [d_k, M] and H^v [M, d_v] over M Fourier slots at the token's clock phase,
    both decayed by exp(g_t), g_t = −exp(A_log) · softplus(a_proj x_t + dt_bias). A query reads the slot
    logits q_tᵀ H^k / √d_k, rotates them by its own clock so they depend on relative time λ_t − λ_j only,
    maps them to P lag logits through a learned readout [P, P] (identity at init) on the Fourier basis,
    takes a softmax over the lags, and reads H^v with the resulting slot weights: content-based retrieval
    from a memory binned by relative (clock) time, linear in T. Math and chunked form:
    `mixins/reference/cyfa.py`; on CUDA fla's `chunk_cyfa` runs the training path. Positional schemes are
    ignored. Init as fla: A ~ U[0, 16], dt ~ log-U[0.001, 0.1] per head, readout = I.
    Decode state: H^k [H, d_k, M], H^v [H, M, d_v], the clock [H], the conv buffer.

    Options:
        num_heads; head_dim: null = hidden / num_heads (fla: 256); expand_k / expand_v: key / value
        width per head = head_dim · expand; num_slots: M, even (128); use_short_conv / conv_size (4);
        norm_eps (1e-5); chunk_size: the reference's chunk (64); backend: `auto`, `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        num_slots: int = 128,
        use_short_conv: bool = True,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=cyfa"
        self.backend = check_backend(backend, name)
        head_dim = head_dim or check_divisible(hidden_size, num_heads, name)
        self.head_k_dim, self.head_v_dim = (
            _head_width(head_dim, expand_k, name),
            _head_width(head_dim, expand_v, name),
        )
        if num_slots < 2 or num_slots % 2 or chunk_size < 1 or conv_size < 1:
            raise ArchiFactoryError(f"{name}: num_slots must be even and >= 2, chunk_size and conv_size >= 1")
        self.num_heads, self.num_slots, self.norm_eps, self.chunk_size = (
            num_heads,
            num_slots,
            norm_eps,
            chunk_size,
        )
        self.key_dim, self.value_dim = num_heads * self.head_k_dim, num_heads * self.head_v_dim
        self.widths = [self.key_dim, self.key_dim, self.value_dim]
        self.qkv_proj = nn.Linear(hidden_size, sum(self.widths), bias=False)
        self.conv = ShortConvolution(sum(self.widths), conv_size, silu=False) if use_short_conv else None
        self.head_decay = HeadDecay(hidden_size, num_heads, (0.0, 16.0))  # g [B, T, H]
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=True)  # write strength β
        self.d_proj = nn.Linear(hidden_size, num_heads, bias=True)  # clock step δ
        self.readout = nn.Parameter(torch.eye(num_slots - 1).expand(num_heads, -1, -1).clone())
        self.q_norm_weight = nn.Parameter(torch.ones(self.head_k_dim))
        self.k_norm_weight = nn.Parameter(torch.ones(self.head_k_dim))
        self.g_proj = low_rank_gate(hidden_size, self.head_v_dim, self.value_dim)
        self.norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.o_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        conv = () if self.conv is None else (self.conv,)
        keep = (*own_parameters(self), *self.head_decay.init_keep(), *conv)
        return InitRoles(residual=(self.o_proj,), keep=keep)  # decays, readout and gains drawn above

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        probe_q = torch.empty(batch_size, 0, self.num_heads, self.head_k_dim, device=device, dtype=dtype)
        probe_v = torch.empty(batch_size, 0, self.num_heads, self.head_v_dim, device=device, dtype=dtype)
        keys, values, clock = empty_state(probe_q, probe_v, self.num_slots)
        state = {"keys": keys, "values": values, "clock": clock}
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
        q, k, v = qkv.split(self.widths, dim=-1)
        heads = (batch, seq_len, self.num_heads)
        q, k, v = q.view(*heads, -1), k.view(*heads, -1), v.view(*heads, -1)
        g, delta, beta = self._gates(x, ctx)
        scale = self.head_k_dim**-0.5
        if self.backend_name() == "fused" and state is None:
            norms = (self.q_norm_weight, self.k_norm_weight, self.norm_eps)
            out, new = cyfa_fused(q, k, v, g, delta, beta, self.readout, norms, scale), None
        else:
            q = head_rms_norm(q, self.q_norm_weight, self.norm_eps).view(*heads, -1)
            k = head_rms_norm(k, self.k_norm_weight, self.norm_eps).view(*heads, -1)
            past = None if state is None else (state["keys"], state["values"], state["clock"])
            out, new = cyfa_reference(q, k, v, g, delta, beta, self.readout, scale, past, self.chunk_size)
        gate = self.g_proj(x)
        # ×P keeps small readouts above the norm's eps (fla)
        y = head_rms_norm(out * (self.num_slots - 1), self.norm_weight, self.norm_eps, gate, "sigmoid")
        y = self.o_proj(y.to(x.dtype))
        if state is None:
            return y, None
        updated = {name: t.to(state[name].dtype) for name, t in zip(("keys", "values", "clock"), new)}
        if conv_state is not None:
            updated["conv"] = conv_state
        return y, updated

    def _gates(self, x: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor, Tensor]:
        """(log-decay g, clock step δ, write strength β), each [B, T, H] in the compute dtype, 0 at pads."""
        dtype = compute_dtype(x.dtype)
        g = self.head_decay(x)
        delta = torch.sigmoid(self.d_proj(x.detach()).to(dtype))  # fla: the clock's input is detached
        beta = torch.sigmoid(self.b_proj(x).to(dtype))
        return zero_pads(g, ctx), zero_pads(delta, ctx), zero_pads(beta, ctx)

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=cyfa")

    def flops_per_token(self, seq_len: int) -> float:
        chunk, dk, dv, slots = (
            min(self.chunk_size, max(seq_len, 1)),
            self.head_k_dim,
            self.head_v_dim,
            self.num_slots,
        )
        lags = slots - 1
        # per head and token: two chunked simple-GLA passes (in-chunk scores and outputs, state read and
        # update), the lag readout through the table both ways, two rotations, the q/k norms
        passes = 2 * chunk * (dk + slots) + 4 * dk * slots + 2 * chunk * (slots + dv) + 4 * slots * dv
        per_head = passes + 4 * lags * slots + 12 * slots + 8 * dk
        conv = 0 if self.conv is None else self.conv.flops_per_token()
        return projection_flops(self) + conv + self.num_heads * per_head

    def state_size(self, seq_len: int) -> int:
        conv = 0 if self.conv is None else self.conv.state_size()
        return self.num_heads * (self.num_slots * (self.head_k_dim + self.head_v_dim) + 1) + conv


def _head_width(head_dim: int, expand: float, name: str) -> int:
    """head_dim · expand, refused unless a positive whole number."""
    width = head_dim * expand
    if width < 1 or not float(width).is_integer():
        raise ArchiFactoryError(f"{name}: head_dim={head_dim} times expand={expand} is not a whole width")
    return int(width)
