"""Titans' neural memory as a token mixer: a linear memory trained at test time by gradient descent with
momentum and forgetting. The memory is `reference/titans.py` (fla 0.6.0 has no kernel for it: its
`fla.ops.titans` is the naive oracle only); `reference/mini_batch.py` keeps every token in its stream's
mini-batch slot across padded rows, prefills and decode steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, projection_flops
from archifactory.model.mixins.kit import ShortConvolution, check_divisible, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.mini_batch import MiniBatchLayout
from archifactory.model.mixins.reference.titans import TitansState, titans_linear
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

STATE_KEYS = ("memory", "anchor", "momentum")


@register_mixin("titans")
class Titans(Mixin):
    """Titans' neural memory, linear variant (Behrouz, Zhong & Mirrokni, "Titans: Learning to Memorize at
    Test Time", 2024; the memory of fla's `fla.ops.titans`).

    Per head (d = hidden / num_heads) a linear memory M with the inner model f(x) = x + LN(x M) learns the
    associations of the sequence, ℓ_t = ‖LN(k_t M) − (v_t − k_t)‖², by gradient descent with momentum
    ("surprise") and forgetting:
        S_t = η_t S_{t-1} − θ_t ∇ℓ_t(M₀),   M_t = (1 − α_t) M_{t-1} + S_t,   o_t = z_t + LN(z_t), z_t = q_t M_t,
    the gradient taken at M₀, the memory the token's mini-batch of `chunk_size` tokens entered with (the
    paper's parallel training; the size is part of the math, 16 as fla). Gates per token and head:
    θ_t = base_lr · sigmoid(·) / d, η_t = sigmoid(·), α_t = sigmoid(·) from one `gate_proj` (biases 0,
    0 and −5: little forgetting at init). q, k, v: a short causal conv + SiLU (the paper's depthwise conv
    and SiLU), q and k L2-normalised per head. The memory starts from a learned M_init ~ N(0, 0.02²) (the
    outer loop); the inner LayerNorm is learned per head (ones, zeros). Output: per-head RMSNorm gated by
    SiLU(`g_proj` x) (the paper's normalisation and gating), `out_proj`. The positional scheme is
    ignored. No fused path: fla 0.6.0 ships only the naive oracle for this memory.

    Decode state: M and M₀ (offsets from M_init) and S [B, H, d, d], the phase in the current mini-batch
    [B], the conv buffer: any cut of a stream (prefill, decode steps, left pads) equals the full forward.
    Pads of a padded batch are empty slots: zero conv input, θ = 0, η = 1, α = 0, no momentum into M, no
    phase advance.

    Options: num_heads; base_lr (1.0); conv_size (4); norm_eps (1e-6: the inner LayerNorm and the output
    norm); chunk_size: the mini-batch size. No `backend` option: the reference is the only path.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        base_lr: float = 1.0,
        conv_size: int = 4,
        norm_eps: float = 1e-6,
        chunk_size: int = 16,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=titans"
        self.head_dim = check_divisible(hidden_size, num_heads, name)
        if chunk_size < 1 or base_lr <= 0 or conv_size < 2:
            raise ArchiFactoryError(
                f"{name}: need chunk_size >= 1, base_lr > 0 and conv_size >= 2, "
                f"got {chunk_size}, {base_lr}, {conv_size}"
            )
        self.num_heads, self.chunk_size, self.base_lr, self.norm_eps = (
            num_heads,
            chunk_size,
            base_lr,
            norm_eps,
        )
        heads, d = num_heads, self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.conv = ShortConvolution(3 * hidden_size, conv_size)
        self.gate_proj = nn.Linear(hidden_size, 3 * num_heads, bias=False)  # θ, η, α logits
        self.gate_bias = nn.Parameter(torch.tensor([0.0, 0.0, -5.0]).repeat_interleave(num_heads))
        self.memory_init = nn.Parameter(torch.randn(heads, d, d).mul_(0.02))
        self.ln_weight = nn.Parameter(torch.ones(heads, d))  # the inner model's LayerNorm
        self.ln_bias = nn.Parameter(torch.zeros(heads, d))
        self.norm_weight = nn.Parameter(torch.ones(d))
        self.g_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # the gate biases, M_init and the norms are set here; the conv keeps its own init
        return InitRoles(residual=(self.out_proj,), keep=(*own_parameters(self), self.conv))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        dtype = compute_dtype(dtype)
        shape = (batch_size, self.num_heads, self.head_dim, self.head_dim)
        state = {key: torch.zeros(shape, device=device, dtype=dtype) for key in STATE_KEYS}
        state["phase"] = torch.zeros(batch_size, device=device, dtype=dtype)
        state["conv"] = self.conv.init_state(batch_size, device, dtype)
        return state

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(θ, log η, log(1 − α)), each [B, T, H] in the compute dtype."""
        logits = self.gate_proj(x).to(compute_dtype(x.dtype)) + self.gate_bias
        theta, eta, alpha = logits.chunk(3, dim=-1)
        return self.base_lr * torch.sigmoid(theta) / self.head_dim, F.logsigmoid(eta), F.logsigmoid(-alpha)

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        dtype = compute_dtype(x.dtype)
        qkv, conv_state = self.conv(
            zero_pads(self.qkv_proj(x), ctx), None if state is None else state["conv"]
        )
        q, k, v = qkv.reshape(batch, seq_len, 3, self.num_heads, self.head_dim).unbind(2)  # [B, T, H, d]
        q, k = l2_normalize(q), l2_normalize(k)
        gates = self.gates(x)
        init = self.memory_init.to(dtype)
        if state is None:
            past = TitansState(init, init, torch.zeros_like(init))
            phase = torch.zeros(batch, device=x.device, dtype=dtype)
        else:
            past = TitansState(state["memory"] + init, state["anchor"] + init, state["momentum"])
            phase = state["phase"]
        layout = None
        if state is not None or ctx.pad_mask is not None:  # the mini-batch grid of each row
            layout = MiniBatchLayout.build(ctx.pad_mask, phase.long(), seq_len, self.chunk_size)
            q, k, v, *gates = (layout.to_grid(t) for t in (q, k, v, *gates))
        out, final = titans_linear(
            q, k, v, *gates, self.ln_weight, self.ln_bias, past,
            None if layout is None else layout.real, self.chunk_size, self.norm_eps,
        )  # fmt: skip
        if layout is not None:
            out = layout.from_grid(out)
        out = head_rms_norm(out, self.norm_weight, self.norm_eps, self.g_proj(x))
        y = self.out_proj(out.to(x.dtype))
        if state is None:
            return y, None
        seen = seq_len if ctx.pad_mask is None else ctx.pad_mask.sum(1)
        new = {"memory": final.memory - init, "anchor": final.anchor - init, "momentum": final.momentum}
        new["phase"] = (phase + seen) % self.chunk_size
        new = {key: t.to(state[key].dtype) for key, t in new.items()}
        return y, new | {"conv": conv_state}

    def flops_per_token(self, seq_len: int) -> float:
        # per head and token (d = head size, C = chunk): the key's product with M₀ (2d²), the query's with
        # M and S (4d²), the chunk-end writes into M and S (4d²), the scores, their product with the
        # gradients and the two C×C pair-decay products (4Cd + 2C²), the inner LayerNorm, its backward
        # and the output LayerNorm (~20d)
        d, c = self.head_dim, self.chunk_size
        inner = self.num_heads * (10 * d * d + 4 * c * d + 2 * c * c + 20 * d)
        return projection_flops(self) + self.conv.flops_per_token() + inner

    def state_size(self, seq_len: int) -> int:
        return 3 * self.num_heads * self.head_dim**2 + 1 + self.conv.state_size()
