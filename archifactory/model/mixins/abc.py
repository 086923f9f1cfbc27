"""Attention with bounded-memory control: M softmax-normalised memory slots per head, read by a softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    check_divisible,
    fill_pads,
    fla_backend,
    head_rms_norm,
    scaled_width,
    zero_pads,
)
from archifactory.model.mixins.reference.abc import FUSED_KERNEL, VOID_LOGIT, abc_forward
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

CLAMP_RANGE = 1.0e3  # |clamp_min|, |clamp_max| bound: keeps VOID_LOGIT far below every slot logit


@register_mixin("abc")
class ABCAttention(Mixin):
    """ABC (Peng et al., "ABC: Attention with Bounded-memory Control", 2022; fla's `ABCAttention`).

    Each head keeps M memory slots. Slot logits s_t = clamp(s_proj x) weight each token into every slot by
    a running softmax over time, so the slots are normalised sums of the past keys and values; a query reads
    them through a softmax over the slots:
        H^k_t = Σ_{j<=t} k_j softmax_j(s)ᵀ,   p_t = softmax(q_tᵀ H^k_t / √d_k),
        H^v_t = Σ_{j<=t} softmax_j(s) v_jᵀ,   o_t = H^v_tᵀ p_t
    (gated slot attention whose gate comes from the normaliser; chunked in `reference/abc.py`, on CUDA
    fla's `chunk_abc` for training). q and k are rotated by the model's positional scheme (RoPE: fla's
    `use_rope`). Then a per-head RMSNorm, gated by swish(g_proj x) (`use_output_gate`), and out_proj.
    Decode state: H^k [B, H, d_k, M], H^v [B, H, M, d_v] and the slot log-normaliser z [B, H, M] (fp32).
    No short convolution (fla's default).

    Options:
        num_heads; expand_k / expand_v: key and value widths as multiples of hidden (0.5 / 1, fla's);
        num_slots: M (null = the key head size); use_input_gate: swish on q, k, v (false);
        use_output_gate: the swish-gated norm (true; false: an ungated RMSNorm); clamp_min / clamp_max:
        the slot-logit clamp (−32 / 32, within ±1000); norm_eps; chunk_size: reference chunk length (16:
        its in-chunk weights are [C, C, M] per head); backend: `auto`, `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        num_slots: int | None = None,
        use_input_gate: bool = False,
        use_output_gate: bool = True,
        clamp_min: float = -32.0,
        clamp_max: float = 32.0,
        norm_eps: float = 1e-5,
        chunk_size: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=abc"
        if chunk_size < 1 or (num_slots is not None and num_slots < 1):
            raise ArchiFactoryError(f"{name}: chunk_size and num_slots must be >= 1")
        if not -CLAMP_RANGE <= clamp_min < clamp_max <= CLAMP_RANGE:
            raise ArchiFactoryError(
                f"{name}: clamp_min={clamp_min}, clamp_max={clamp_max} must satisfy "
                f"-{CLAMP_RANGE:g} <= clamp_min < clamp_max <= {CLAMP_RANGE:g}"
            )
        self.backend = check_backend(backend, name)
        check_divisible(hidden_size, num_heads, name)
        self.num_heads, self.chunk_size, self.norm_eps = num_heads, chunk_size, norm_eps
        self.use_input_gate, self.use_output_gate = use_input_gate, use_output_gate
        self.clamp = (clamp_min, clamp_max)
        self.key_dim = scaled_width(hidden_size, expand_k, num_heads, name, "expand_k")
        self.value_dim = scaled_width(hidden_size, expand_v, num_heads, name, "expand_v")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.num_slots = num_slots or self.head_k_dim
        gate = self.value_dim if use_output_gate else 0
        self.widths = [self.key_dim, self.key_dim, self.value_dim, num_heads * self.num_slots, gate]
        self.proj = nn.Linear(hidden_size, sum(self.widths), bias=False)  # q, k, v, slot logits, gate
        self.norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))  # the norm gain, drawn above

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        heads, slots, dtype = self.num_heads, self.num_slots, compute_dtype(dtype)
        return {
            "keys": torch.zeros(batch_size, heads, self.head_k_dim, slots, device=device, dtype=dtype),
            "values": torch.zeros(batch_size, heads, slots, self.head_v_dim, device=device, dtype=dtype),
            "normaliser": torch.full((batch_size, heads, slots), VOID_LOGIT, device=device, dtype=dtype),
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v, s, g = self.proj(x).split(self.widths, dim=-1)
        if self.use_input_gate:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        heads = (batch, seq_len, self.num_heads, -1)
        q, k = ctx.rotate(q.view(heads)), ctx.rotate(zero_pads(k, ctx).view(heads))
        v = zero_pads(v, ctx).view(heads)
        # a pad step: a void slot logit leaves the normaliser and both memories exactly as they were
        s = fill_pads(s.to(compute_dtype(x.dtype)).clamp(*self.clamp), ctx, VOID_LOGIT).view(heads)
        past = None if state is None else (state["keys"], state["values"], state["normaliser"])
        out, new = abc_forward(q, k, v, s, past, self.backend_name(), self.chunk_size)
        y = head_rms_norm(out, self.norm_weight, self.norm_eps, g if self.use_output_gate else None)
        y = self.out_proj(y.to(x.dtype))
        return y, None if new is None else dict(zip(("keys", "values", "normaliser"), new))

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.proj.weight, FUSED_KERNEL, "mixin=abc")

    def flops_per_token(self, seq_len: int) -> float:
        chunk, slots = min(self.chunk_size, max(seq_len, 1)), self.num_slots
        dk, dv = self.head_k_dim, self.head_v_dim
        # per head and token: the normaliser and the slot weights of a chunk, then each pass's in-chunk
        # scores, the weighted sum over the chunk, the state read and the state update; the softmax
        weights = 4 * slots + 2 * chunk * slots
        first = 2 * chunk * dk + 2 * chunk * slots + 4 * dk * slots
        second = 2 * chunk * slots + 2 * chunk * dv + 4 * slots * dv
        return projection_flops(self) + self.num_heads * (weights + first + second + 5 * slots)

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.num_slots * (self.head_k_dim + self.head_v_dim + 1)
