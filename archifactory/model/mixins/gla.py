"""Gated linear attention mixers with a per-channel data-dependent decay: GLA and HGRN2.

Both run `reference/gla.py` (chunked, plain PyTorch) or fla's `chunk_gla` Triton kernel on CUDA; they
differ in how q, k, v and the decay come from the input. Pads of a padded batch (`ctx.pad_mask`) are
identity steps: a zero input to the short conv, k = 0 (no write) and log-decay 0 (no decay), set on the
kernel's inputs so the reference and fla's kernel both keep a left-padded row's state exact.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    ShortConvolution,
    check_divisible,
    fla_backend,
    fla_op,
    head_rms_norm,
    scaled_width,
    zero_pads,
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.gla import chunk_gla, gla_step
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

FUSED_KERNEL = ("gla", "chunk_gla")


class GLAFamily(Mixin):
    """What GLA and HGRN2 share: the recurrence on the resolved path, state, FLOPs (not registered)."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    chunk_size: int
    backend: str

    @abstractmethod
    def projections(
        self, x: Tensor, ctx: PositionContext, conv_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """q, k, g [B, T, H, K], v [B, T, H, V] and the new conv buffer (None without one); a short conv
        gets zeros at the pads of `ctx`."""

    @abstractmethod
    def readout(self, x: Tensor, out: Tensor) -> Tensor:
        """o [B, T, H, V] (compute dtype) -> y [B, T, D]."""

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, self.num_heads, self.head_k_dim, self.head_v_dim)
        state = {"recurrent": torch.zeros(shape, device=device, dtype=compute_dtype(dtype))}
        conv = getattr(self, "conv", None)
        if conv is not None:
            state["conv"] = conv.init_state(batch_size, device, dtype)
        return state

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        q, k, v, g, conv_state = self.projections(x, ctx, None if state is None else state.get("conv"))
        k, g = zero_pads(k, ctx), zero_pads(g, ctx)  # pads: no write, no decay
        past = None if state is None else state["recurrent"]
        if past is not None and x.shape[1] == 1:
            out, new_state = gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], past)
            out = out[:, None]
        elif self.backend_name() == "fused":
            kernel = fla_op(*FUSED_KERNEL)
            out, new_state = kernel(
                q=q, k=k, v=v, g=g.float(), initial_state=None if past is None else past.float(),
                output_final_state=past is not None,
            )  # fmt: skip
            new_state = None if past is None else new_state.to(past.dtype)
        else:
            out, new_state = chunk_gla(q, k, v, g, None, past, past is not None, self.chunk_size)
        y = self.readout(x, out.to(compute_dtype(x.dtype)))
        if state is None:
            return y, None
        new = {"recurrent": new_state}
        if conv_state is not None:
            new["conv"] = conv_state
        return y, new

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.out_proj.weight, FUSED_KERNEL, f"mixin={self.registry_name}")

    def flops_per_token(self, seq_len: int) -> float:
        projections = projection_flops(self)
        conv = getattr(self, "conv", None)
        conv_flops = 0 if conv is None else conv.flops_per_token()
        # chunked GLA per head and token: decayed q·k scores and scores·v over a chunk, q·S, state update
        chunk = min(self.chunk_size, max(seq_len, 1))
        rule = self.num_heads * (
            2 * chunk * (self.head_k_dim + self.head_v_dim) + 4 * self.head_k_dim * self.head_v_dim
        )
        return projections + conv_flops + rule

    def state_size(self, seq_len: int) -> int:
        conv = getattr(self, "conv", None)
        conv_size = 0 if conv is None else conv.state_size()
        return self.num_heads * self.head_k_dim * self.head_v_dim + conv_size


@register_mixin("gla")
class GatedLinearAttention(GLAFamily):
    """Gated linear attention (Yang et al., "Gated Linear Attention Transformers with Hardware-Efficient
    Training", 2024).

    Per head, with a per-channel data-dependent decay from a low-rank projection,
        α_t = sigmoid(W₂ W₁ x_t + b)^{1/τ} (log α_t = logsigmoid(·) / τ, τ = gate_logit_normalizer),
        S_t = diag(α_t) S_{t-1} + k_tᵀ v_t,      o_t = q_t S_t / sqrt(d_k),
    chunked (`reference/gla.py`). Output: per-head RMSNorm, times SiLU(g_proj x) with the output gate, then
    out_proj. Optional short causal convs (+ SiLU) on q/k/v. Decode state: S [B, H, d_k, d_v] (+ conv).

    Options:
        num_heads; expand_k: key width / hidden (0.5 in the paper); expand_v: value width / hidden (1);
        gate_low_rank_dim: rank of the decay projection (16); gate_logit_normalizer: τ (16);
        use_output_gate; use_short_conv / conv_size; norm_eps; chunk_size: reference chunk length
            (per-channel decays need a pairwise [C, C, d_k] decay inside a chunk);
        backend: `auto` (fla's `chunk_gla` on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        use_output_gate: bool = True,
        use_short_conv: bool = False,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        chunk_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=gla"
        if min(num_heads, gate_low_rank_dim, chunk_size) < 1 or gate_logit_normalizer <= 0:
            raise ArchiFactoryError(
                f"{name}: num_heads, gate_low_rank_dim and chunk_size must be >= 1 and gate_logit_normalizer > 0"
            )
        self.backend = check_backend(backend, name)  # availability is checked per call
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.num_heads, self.normalizer = num_heads, gate_logit_normalizer
        self.key_dim = scaled_width(hidden_size, expand_k, num_heads, name, "expand_k")
        self.value_dim = scaled_width(hidden_size, expand_v, num_heads, name, "expand_v")
        self.head_k_dim, self.head_v_dim = self.key_dim // num_heads, self.value_dim // num_heads
        self.qkv_proj = nn.Linear(hidden_size, 2 * self.key_dim + self.value_dim, bias=False)
        self.conv = ShortConvolution(2 * self.key_dim + self.value_dim, conv_size) if use_short_conv else None
        self.gk_proj = nn.Sequential(
            nn.Linear(hidden_size, gate_low_rank_dim, bias=False),
            nn.Linear(gate_low_rank_dim, self.key_dim, bias=True),
        )
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False) if use_output_gate else None
        self.norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # the output-norm gain is drawn in the constructor; the optional short conv keeps its own init
        conv = () if self.conv is None else (self.conv,)
        return InitRoles(residual=(self.out_proj,), keep=(*own_parameters(self), *conv))

    def projections(
        self, x: Tensor, ctx: PositionContext, conv_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        batch, seq_len, _ = x.shape
        qkv, new_conv = zero_pads(self.qkv_proj(x), ctx), None
        if self.conv is not None:
            qkv, new_conv = self.conv(qkv, conv_state)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        heads = (batch, seq_len, self.num_heads, -1)
        g = F.logsigmoid(self.gk_proj(x).to(compute_dtype(x.dtype))) / self.normalizer  # [B, T, H·K]
        return q.view(heads), k.view(heads), v.view(heads), g.view(heads), new_conv

    def readout(self, x: Tensor, out: Tensor) -> Tensor:
        gate = None if self.g_proj is None else self.g_proj(x)
        out = head_rms_norm(out, self.norm_weight, self.norm_eps, gate)  # [B, T, H·V]
        return self.out_proj(out.to(x.dtype))


@register_mixin("hgrn2")
class HGRN2(GLAFamily):
    """HGRN2 (Qin et al., "HGRN2: Gated Linear RNNs with State Expansion", 2024).

    HGRN's element-wise gated recurrence with its hidden state expanded by an outer product: per head,
    forget gate f_t = lb + (1 − lb) · sigmoid(f_proj x_t) (per state channel; lb = `lower_bound`), the
    input gate tied to it (k_t = 1 − f_t), q_t = SiLU(q_proj x_t), i_t = i_proj x_t:
        S_t = diag(f_t) S_{t-1} + k_t i_tᵀ,      o_t = q_t S_t / sqrt(d_k)
    — GLA-shaped, so it runs through `chunk_gla` (fla's HGRN2 layer calls the same kernel). Output:
    RMSNorm over the full width, then out_proj. Decode state: S [B, H, expand_ratio, hidden / H].
    The paper learns a lower bound per layer that grows with depth at the model level; here it is a
    fixed per-layer option (0 = none).

    Options:
        num_heads; expand_ratio: state expansion, the key width per head (null = hidden / num_heads);
        lower_bound: forget-gate floor in [0, 1); norm_eps; chunk_size: reference chunk length;
        backend: `auto` (fla's `chunk_gla` on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        expand_ratio: int | None = None,
        lower_bound: float = 0.0,
        norm_eps: float = 1e-5,
        chunk_size: int = 16,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=hgrn2"
        self.head_v_dim = check_divisible(hidden_size, num_heads, name)
        self.head_k_dim = expand_ratio or self.head_v_dim
        if self.head_k_dim < 1 or chunk_size < 1 or not 0.0 <= lower_bound < 1.0:
            raise ArchiFactoryError(
                f"{name}: need expand_ratio >= 1, chunk_size >= 1 and 0 <= lower_bound < 1, got "
                f"{expand_ratio}, {chunk_size}, {lower_bound}"
            )
        self.backend = check_backend(backend, name)  # availability is checked per call
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.num_heads, self.lower_bound = num_heads, lower_bound
        self.forget_dim = num_heads * self.head_k_dim
        self.qf_proj = nn.Linear(hidden_size, 2 * self.forget_dim, bias=False)
        self.i_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # the output-norm gain is drawn in the constructor
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))

    def projections(
        self, x: Tensor, ctx: PositionContext, conv_state: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        batch, seq_len, _ = x.shape
        q, f = self.qf_proj(x).split([self.forget_dim, self.forget_dim], dim=-1)
        g = F.logsigmoid(f.to(compute_dtype(x.dtype)))  # log f_t without the bound
        if self.lower_bound > 0:  # log(lb + (1 − lb) f), computed in log space
            g = torch.logaddexp(
                torch.full_like(g, math.log(self.lower_bound)), math.log1p(-self.lower_bound) + g
            )
        k = -torch.expm1(g)  # 1 − f_t, accurate when f_t is close to 1
        heads = (batch, seq_len, self.num_heads, -1)
        i = self.i_proj(x)
        return F.silu(q).view(heads), k.to(x.dtype).view(heads), i.view(heads), g.view(heads), None

    def readout(self, x: Tensor, out: Tensor) -> Tensor:
        out = head_rms_norm(out.flatten(-2)[..., None, :], self.norm_weight, self.norm_eps)  # over all of D
        return self.out_proj(out.to(x.dtype))
