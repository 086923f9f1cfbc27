"""RWKV-7 "Goose" time-mix: the generalised delta rule with vector-valued decay and in-context learning rate.

Pads of a padded batch (`ctx.pad_mask`) are identity steps, set on the layer's inputs: zeros shifted in by
the token shift, k = 0, a = 0 (so β = κ̂ ⊙ a = 0) and log-decay 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend
from archifactory.model.mixins.kit import (
    check_divisible,
    fla_backend,
    fla_op,
    head_group_norm,
    token_shift,
    zero_pads,
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import chunk_dplr, dplr_step
from archifactory.model.mixins.rwkv6 import depth_ratios
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters
from archifactory.model.value_residual import ValueGate, default_gate_rank

NUM_MIXES = 6  # token-shift lerps, in this order: r, w, k, v, a, g
MAX_LOG_DECAY = 0.6065306597126334  # exp(-0.5): log w_t = -exp(-0.5) · sigmoid(·) ∈ (-0.607, 0)
FUSED_KERNEL = ("rwkv7", "chunk_rwkv7")


def orthogonal(rows: int, cols: int, gain: float) -> Tensor:
    """An orthogonal [rows, cols] matrix times `gain` (RWKV-7's LoRA up-projection init)."""
    weight = torch.empty(rows, cols)
    nn.init.orthogonal_(weight, gain=gain)
    return weight


@register_mixin("rwkv7")
class RWKV7TimeMix(Mixin):
    """RWKV-7 "Goose" time-mix (Peng et al., "RWKV-7 'Goose' with Expressive Dynamic State Evolution",
    2025).

    Token shift: six static lerps x + (x_{t-1} − x) ⊙ μ_* give the inputs of r, w, k, v, a, g. Per head
    (K = V = head size, scale 1), with κ̂ = L2-normalise(k ⊙ k_k), in-context learning rate
    a = sigmoid(LoRA_a), decay w = exp(−e^{−0.5} · sigmoid(LoRA_w)) per channel and the "replacement"
    key k ← k ⊙ (1 + (a − 1) ⊙ k_a), the state S [K, V] evolves by the generalised delta rule

        S_t = diag(w_t) S_{t−1} − κ̂_t ((a_t ⊙ κ̂_t)ᵀ S_{t−1}) + k_t v_tᵀ,      o_t = S_tᵀ r_t

    (fla's DPLR form with α = −κ̂, β = κ̂ ⊙ a; computed chunkwise, `reference/delta_rule.chunk_dplr`).
    Then a per-head GroupNorm, the bonus (Σ r ⊙ k ⊙ r_k) v, the gate g = sigmoid(x_g G₁) G₂ and out_proj.
    The value residual across layers (v lerped toward the first layer's v, v ← v + (v_first − v) ⊙
    σ(v₀ + x_v W_a W_b)) is on with `model.value_residual=true` (`model/value_residual.py`); off, every
    layer uses its own v.
    Decode state: S [B, H, K, V] (>= fp32) and the token-shift buffer [B, D].

    Init (RWKV-7's, depth-dependent through a = l/(L−1), b = 1 − l/L for layer l of the model's L layers;
    `num_layers` is supplied by the model, a layer built alone uses a = b = 0.5): lerps
    μ = 1 − (i/D)^{b·e}, e = 0.2, 0.9, 0.7, 0.7, 0.9, 0.2 for r, w, k, v, a, g; decay bias
    −6 + 6 (i/(D−1))^{1+a^{0.3}} + 0.5 + 2.5·zigzag, a bias
    −0.19 + 0.3·zigzag + 0.4·linear, k_k 0.71 − 0.1·linear, k_a 1.02, r_k −0.04; LoRA down-projections zero,
    up-projections orthogonal × 0.1; r/k/v/out projections follow the model's scheme.

    Options:
        num_heads: heads; decay_rank / a_rank / gate_rank: LoRA ranks of w, a and g;
        norm_eps: GroupNorm epsilon per head-channel (× head size, as fla); chunk_size: chunk length of
            the reference (sub-chunked, `reference/per_channel.py`: memory ~ (S + chunk_size/S) · D
            per token with sub-chunks of S ≈ √chunk_size);
        backend: `auto` (fla's `chunk_rwkv7` on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        decay_rank: int = 64,
        a_rank: int = 64,
        gate_rank: int = 128,
        norm_eps: float = 1e-5,
        chunk_size: int = 16,
        backend: str = "auto",
        num_layers: int | None = None,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.head_dim = check_divisible(hidden_size, num_heads, "mixin=rwkv7")
        if min(decay_rank, a_rank, gate_rank, chunk_size) < 1:
            raise ArchiFactoryError(
                f"mixin=rwkv7: decay_rank={decay_rank}, a_rank={a_rank}, gate_rank={gate_rank} and "
                f"chunk_size={chunk_size} must all be >= 1"
            )
        self.backend = check_backend(backend, "mixin=rwkv7")  # availability is checked per call
        self.num_heads, self.chunk_size = num_heads, chunk_size
        self.norm_eps = norm_eps * self.head_dim
        dim = hidden_size
        ratio_0_to_1, ratio_1_to_0 = depth_ratios(layer_idx, num_layers)
        ddd = torch.arange(dim, dtype=torch.float32) / dim
        linear = torch.arange(dim, dtype=torch.float32) / max(dim - 1, 1) - 0.5
        pos = torch.arange(dim) % self.head_dim
        zigzag = (pos - (self.head_dim - 1) / 2) / max((self.head_dim - 1) / 2, 1)
        zigzag = zigzag * zigzag.abs()
        exponents = torch.tensor([0.2, 0.9, 0.7, 0.7, 0.9, 0.2]) * ratio_1_to_0  # r, w, k, v, a, g
        self.time_mix = nn.Parameter(1.0 - ddd[None, :].pow(exponents[:, None]))  # [6, D]
        www = -6 + 6 * (torch.arange(dim) / max(dim - 1, 1)).pow(1 + ratio_0_to_1**0.3)
        self.w0 = nn.Parameter(www + 0.5 + zigzag * 2.5)
        self.w1 = nn.Parameter(torch.zeros(dim, decay_rank))
        self.w2 = nn.Parameter(orthogonal(decay_rank, dim, 0.1))
        self.a0 = nn.Parameter(-0.19 + zigzag * 0.3 + linear * 0.4)
        self.a1 = nn.Parameter(torch.zeros(dim, a_rank))
        self.a2 = nn.Parameter(orthogonal(a_rank, dim, 0.1))
        self.g1 = nn.Parameter(torch.zeros(dim, gate_rank))
        self.g2 = nn.Parameter(orthogonal(gate_rank, dim, 0.1))
        self.k_k = nn.Parameter(0.71 - linear * 0.1)
        self.k_a = nn.Parameter(torch.full((dim,), 1.02))
        self.r_k = nn.Parameter(torch.full((num_heads, self.head_dim), -0.04))
        self.r_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def init_roles(self) -> InitRoles:
        # every raw parameter (mixes, decays, LoRA factors, bonus, group-norm affine) is drawn above
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))

    def value_gate(self) -> ValueGate:
        return ValueGate(self.hidden_size, default_gate_rank(self.hidden_size))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, self.num_heads, self.head_dim, self.head_dim)
        return {
            "recurrent": torch.zeros(shape, device=device, dtype=compute_dtype(dtype)),
            "shift": torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype),
        }

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, dim = x.shape
        shape = (batch, seq_len, self.num_heads, self.head_dim)
        # x_{t-1} - x_t [B, T, D]; pads shift in zeros, as the start of a sequence does
        shift_in = zero_pads(x, ctx)  # its last token is the decode buffer (a trailing pad leaves 0)
        delta = token_shift(shift_in, None if state is None else state["shift"]) - x
        mixed = x[:, :, None] + delta[:, :, None] * self.time_mix  # [B, T, 6, D]
        x_r, x_w, x_k, x_v, x_a, x_g = mixed.unbind(dim=2)
        dtype = compute_dtype(x.dtype)
        log_w = -MAX_LOG_DECAY * torch.sigmoid((self.w0 + torch.tanh(x_w @ self.w1) @ self.w2).to(dtype))
        a = torch.sigmoid(self.a0 + (x_a @ self.a1) @ self.a2)  # in-context learning rate, [B, T, D]
        gate = torch.sigmoid(x_g @ self.g1) @ self.g2
        r, k, v = self.r_proj(x_r), self.k_proj(x_k), self.v_proj(x_v)
        v = self.mix_first_values(v, ctx, x_v)  # model.value_residual: RWKV-7's v_first; else v itself
        kappa = F.normalize((k * self.k_k).view(shape), dim=-1)  # κ̂ [B, T, H, K]
        k = k * (1 + (a - 1) * self.k_a)  # the replacement key
        r, k, v, a, log_w = r.view(shape), k.view(shape), v.view(shape), a.view(shape), log_w.view(shape)
        # pads are identity steps: no write (k = 0), no removal (a = 0 in β = κ̂ ⊙ a), no decay
        k, a, log_w = zero_pads(k, ctx), zero_pads(a, ctx), zero_pads(log_w, ctx)
        past = None if state is None else state["recurrent"]
        out, new_state = self._recurrence(r, log_w, k, v, -kappa, kappa * a, past)  # [B, T, H, V]
        out = head_group_norm(out, self.norm_weight, self.norm_bias, self.norm_eps)  # [B, T, D]
        bonus = (r * k * self.r_k).sum(-1, keepdim=True) * v  # [B, T, H, V]
        out = (out + bonus.to(out.dtype).reshape(batch, seq_len, dim)) * gate.to(out.dtype)
        y = self.out_proj(out.to(x.dtype))
        new = None if state is None else {"recurrent": new_state, "shift": shift_in[:, -1]}
        return y, new

    def _recurrence(
        self, r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, alpha: Tensor, beta: Tensor, past: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The DPLR rule on the resolved path; a single decode token always takes the step."""
        if past is not None and r.shape[1] == 1:
            out, new_state = dplr_step(
                r[:, 0], k[:, 0], v[:, 0], alpha[:, 0], beta[:, 0], log_w[:, 0], past, 1.0
            )
            return out[:, None], new_state
        if self.backend_name() == "fused":
            kernel = fla_op(*FUSED_KERNEL)
            out, new_state = kernel(
                r=r, w=log_w.to(r.dtype), k=k, v=v, a=alpha, b=beta, scale=1.0,
                initial_state=None if past is None else past.float(), output_final_state=past is not None,
            )  # fmt: skip
            return out, None if past is None else new_state.to(past.dtype)
        return chunk_dplr(r, k, v, alpha, beta, log_w, 1.0, past, past is not None, self.chunk_size)

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.r_proj.weight, FUSED_KERNEL, "mixin=rwkv7")

    def flops_per_token(self, seq_len: int) -> float:
        dim, head = self.hidden_size, self.head_dim
        projections = 2 * 4 * dim * dim  # r, k, v, out
        lora = 2 * dim * (2 * self.w1.shape[1] + 2 * self.a1.shape[1] + 2 * self.g1.shape[1])
        # chunked DPLR per head and token: four decayed C×K score products, the C³/3 solve per chunk,
        # the H solve's right-hand sides, the loop's state products, and the readout
        chunk = min(self.chunk_size, max(seq_len, 1))
        rule = self.num_heads * (
            10 * chunk * head + 8 * chunk * head + 2 * chunk * chunk / 3 + 8 * head * head
        )
        elementwise = 40 * dim  # shifts, six lerps, gates, normalisation, group norm, bonus
        return projections + lora + rule + elementwise

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_dim * self.head_dim + self.hidden_size
