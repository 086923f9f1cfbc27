"""mLSTM: xLSTM's matrix-memory LSTM as a token mixer, in the layer form of xLSTM 7B.

Pads of a padded batch (`ctx.pad_mask`) are identity steps: input gate −inf (no write) and log forget
gate 0 (no decay), so the max-state m is unchanged too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, projection_flops
from archifactory.model.mixins.kit import check_divisible, fill_pads, scaled_width, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.mlstm import mlstm_forward
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


def soft_cap(x: Tensor, cap: float | None) -> Tensor:
    """cap · tanh(x / cap) (Gemma-2's logit soft-capping, xLSTM 7B's gate pre-activations); None: x."""
    return x if cap is None else cap * torch.tanh(x / cap)


@register_mixin("mlstm")
class MLSTM(Mixin):
    """mLSTM (Beck et al., "xLSTM: Extended Long Short-Term Memory", NeurIPS 2024), in the layer form of
    xLSTM 7B (Beck et al., "xLSTM 7B: A Recurrent LLM for Fast and Efficient Inference", 2025).

    Per head, a matrix memory C [d_qk, d_v] and normaliser n written with an exponential input gate
    exp(ĩ) and a sigmoid forget gate, read as h_t = C_t q_t / max(|n_t·q_t|, 1), stabilised by a
    max-state m (`reference/mlstm.py`: chunkwise-parallel, exact against the recurrence, all exponents
    <= 0; decode state (C, n, m)). Layer choices, xLSTM 7B's where they fit the mixin contract:
    q, k, v and the output gate are plain projections of x (no short conv and no up-projection block:
    7B's "post-up-projection" layer, whose FFN is the model's `ffn`); d_qk = qk_dim_factor · hidden
    (0.5), d_v = v_dim_factor · hidden (1); gate pre-activations ĩ, f̃ = W x + b per head, soft-capped
    at 15; then a LayerNorm per head (weight, no bias), times sigmoid(o-gate x), out_proj. Init as
    7B's: gate weights 0, input-gate bias −10, forget-gate biases linspace(3, 6) over the heads.
    Positional schemes are ignored (the gates carry order). fla has no mLSTM kernel, so there is no
    fused path (no `backend` option): the reference runs on every device (mlstm_kernels' Triton
    kernels are not a dependency).

    Options:
        num_heads; qk_dim_factor (0.5); v_dim_factor (1.0); gate_soft_cap (15; null = none);
        norm_eps: per-head LayerNorm epsilon (1e-6); eps: the read-out denominator's (1e-6);
        chunk_size: chunk length of the chunkwise form (64).
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        qk_dim_factor: float = 0.5,
        v_dim_factor: float = 1.0,
        gate_soft_cap: float | None = 15.0,
        norm_eps: float = 1e-6,
        eps: float = 1e-6,
        chunk_size: int = 64,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=mlstm"
        if chunk_size < 1 or (gate_soft_cap is not None and gate_soft_cap <= 0) or eps <= 0:
            raise ArchiFactoryError(
                f"{name}: chunk_size={chunk_size} must be >= 1, gate_soft_cap={gate_soft_cap} (or null) and "
                f"eps={eps} must be > 0"
            )
        check_divisible(hidden_size, num_heads, name)
        self.num_heads, self.chunk_size = num_heads, chunk_size
        self.gate_soft_cap, self.norm_eps, self.eps = gate_soft_cap, norm_eps, eps
        self.qk_dim = scaled_width(hidden_size, qk_dim_factor, num_heads, name, "qk_dim_factor")
        self.v_dim = scaled_width(hidden_size, v_dim_factor, num_heads, name, "v_dim_factor")
        self.head_qk_dim, self.head_v_dim = self.qk_dim // num_heads, self.v_dim // num_heads
        self.widths = [self.qk_dim, self.qk_dim, self.v_dim, self.v_dim]  # q, k, v, output gate
        self.qkvo_proj = nn.Linear(hidden_size, sum(self.widths), bias=False)
        self.gate_proj = nn.Linear(hidden_size, 2 * num_heads, bias=True)  # (ĩ | f̃) per head
        with torch.no_grad():
            self.gate_proj.weight.zero_()
            bias = self.gate_proj.bias  # (input gates | forget gates); on the device it was built on
            bias[:num_heads].fill_(-10.0)
            bias[num_heads:].copy_(torch.linspace(3.0, 6.0, num_heads, device=bias.device))
        self.norm_weight = nn.Parameter(torch.ones(self.v_dim))
        self.out_proj = nn.Linear(self.v_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.out_proj,), keep=(self.gate_proj, *own_parameters(self)))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        heads, key, value, dtype = self.num_heads, self.head_qk_dim, self.head_v_dim, compute_dtype(dtype)
        return {
            "memory": torch.zeros(batch_size, heads, key, value, device=device, dtype=dtype),
            "normaliser": torch.zeros(batch_size, heads, key, device=device, dtype=dtype),
            "max_state": torch.zeros(batch_size, heads, device=device, dtype=dtype),
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        q, k, v, o = self.qkvo_proj(x).split(self.widths, dim=-1)
        q, k = (t.view(batch, seq_len, self.num_heads, self.head_qk_dim) for t in (q, k))
        v = v.view(batch, seq_len, self.num_heads, self.head_v_dim)
        gates = soft_cap(self.gate_proj(x).to(compute_dtype(x.dtype)), self.gate_soft_cap)
        i, f = gates.split(self.num_heads, dim=-1)  # [B, T, H] each
        i, f = fill_pads(i, ctx, float("-inf")), zero_pads(F.logsigmoid(f), ctx)  # pads: no write, no decay
        past = None if state is None else (state["memory"], state["normaliser"], state["max_state"])
        h, new = mlstm_forward(q, k, v, i, f, past, self.chunk_size, self.eps)  # h [B, T, H, d_v]
        normed = F.layer_norm(h, (self.head_v_dim,), eps=self.norm_eps).flatten(-2) * self.norm_weight
        y = self.out_proj((torch.sigmoid(o) * normed).to(x.dtype))
        if state is None:
            return y, None
        return y, {"memory": new[0], "normaliser": new[1], "max_state": new[2]}

    def flops_per_token(self, seq_len: int) -> float:
        # chunkwise form per head and token: q·k scores and scores·(v | 1) over a chunk, q·(C | n), the
        # (C | n) update
        chunk = min(self.chunk_size, max(seq_len, 1))
        key, value = self.head_qk_dim, self.head_v_dim + 1
        cell = self.num_heads * (2 * chunk * (key + value) + 4 * key * value)
        return projection_flops(self) + cell

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * (self.head_qk_dim * self.head_v_dim + self.head_qk_dim + 1)
