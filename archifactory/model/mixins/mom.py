"""MoM, Mixture-of-Memories: a router sends each token to k of E gated delta-rule memories.

Each memory sees only the tokens routed to it, in order (fla packs them per memory); here every memory's
sequence is packed to the call's length T (static shapes), its unused tail made identity steps (β = 0,
log-decay 0) and its conv buffer taken from its last real inputs. Pads of a padded batch are routed
nowhere, so no memory sees them.
"""

from __future__ import annotations

import math

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
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import chunk_delta_rule, delta_rule_step, l2_normalize
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

FUSED_KERNEL = ("gated_delta_rule", "chunk_gated_delta_rule")


def pack(x: Tensor, rank: Tensor) -> Tensor:
    """x [B, T, ...] -> [B, E, T, ...]: memory e's routed tokens first, in order (rank [B, T, E] is each
    token's place in memory e's sequence, T where it is not routed there); the tail is zeros."""
    batch, seq_len, memories = rank.shape
    tail = x.shape[2:]
    index = rank.transpose(1, 2).reshape(batch, memories, seq_len, *([1] * len(tail)))
    source = x[:, None].expand(batch, memories, *x.shape[1:])
    out = x.new_zeros(batch, memories, seq_len + 1, *tail)  # slot T collects the tokens routed elsewhere
    return out.scatter(2, index.expand_as(source), source)[:, :, :seq_len]


@register_mixin("mom")
class MixtureOfMemories(Mixin):
    """MoM (Du et al., "MoM: Linear Sequence Modeling with Mixture-of-Memories", 2025; fla's
    `MomAttention`).

    A softmax router over E memories picks the top-k per token (weights renormalised over the k). Memory
    e has its own k, v, β and decay projections and its own gated delta-rule state, and reads only the
    tokens routed to it, in order: over its packed sequence,
        S_j = e^{g_j} (I − β_j k_j k_jᵀ) S_{j−1} + β_j k_j v_jᵀ,   o_j = S_jᵀ q_j / √d_k,
    g = −exp(A_log)·softplus(a + dt_bias) (A_log, dt_bias shared by the memories), q and k L2-normalised
    per head after SiLU short convs (weights shared, run per memory's sequence). A token's output is the
    routing-weighted sum of its k memories' outputs, then a per-head RMSNorm gated by swish(g_proj x) and
    out_proj. Positional schemes are ignored. Decode state per memory: S [E, H, d_k, d_v] and the conv
    buffer of its last routed inputs. fla's optional shared memory (`shared_mem`) and single k/v
    projection are not options; fla's training mode runs the conv across memory boundaries of its packed
    batch, here each memory's sequence is convolved on its own (fla's eval behaviour).

    Options:
        num_heads; head_dim (null = hidden / num_heads; fla: 256); expand_v (2); num_memories: E (8);
        topk (2); use_output_gate (true); conv_size (4); conv_bias (false); norm_eps; chunk_size (32);
        backend: `auto` (fla's `chunk_gated_delta_rule` on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_v: float = 2.0,
        num_memories: int = 8,
        topk: int = 2,
        use_output_gate: bool = True,
        conv_size: int = 4,
        conv_bias: bool = False,
        norm_eps: float = 1e-5,
        chunk_size: int = 32,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=mom"
        head_k = head_dim or check_divisible(hidden_size, num_heads, name)
        head_v = head_k * expand_v
        if not 1 <= topk <= num_memories or min(num_heads, head_k, chunk_size, conv_size) < 1:
            raise ArchiFactoryError(
                f"{name}: need 1 <= topk={topk} <= num_memories={num_memories} and num_heads, head_dim, "
                "chunk_size, conv_size >= 1"
            )
        if not float(head_v).is_integer():
            raise ArchiFactoryError(f"{name}: head_dim·expand_v = {head_v} must be a whole number")
        self.backend = check_backend(backend, name)
        self.num_heads, self.head_k_dim, self.head_v_dim = num_heads, head_k, int(head_v)
        self.num_memories, self.topk = num_memories, topk
        self.norm_eps, self.chunk_size = norm_eps, chunk_size
        self.key_dim, self.value_dim = num_heads * head_k, num_heads * self.head_v_dim
        self.widths = [self.key_dim, self.value_dim, num_heads, num_heads]  # each memory's k, v, β, a
        self.q_proj = nn.Linear(hidden_size, self.key_dim, bias=False)
        self.router = nn.Linear(hidden_size, num_memories, bias=False)  # fla's `gate`
        # fla's k_proj, v_proj, b_proj, a_proj of every memory, stacked [E, out, in] as nn.Linear weights
        self.memory_weight = nn.Parameter(torch.empty(num_memories, sum(self.widths), hidden_size))
        nn.init.normal_(self.memory_weight, std=0.02)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(0, 16).log())
        dt = torch.exp(torch.rand(num_heads) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
        dt = dt.clamp(min=1e-4)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.conv = ShortConvolution(2 * self.key_dim + self.value_dim, conv_size, bias=conv_bias)
        self.g_proj = nn.Linear(hidden_size, self.value_dim, bias=False) if use_output_gate else None
        self.norm_weight = nn.Parameter(torch.ones(self.head_v_dim))
        self.out_proj = nn.Linear(self.value_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # the stacked memory projections are drawn like Linear weights; A_log, dt_bias and the norm gain
        # above; the conv keeps its own init
        keep = tuple(p for p in own_parameters(self) if p is not self.memory_weight)
        return InitRoles(residual=(self.out_proj,), matrices=(self.memory_weight,), keep=(*keep, self.conv))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        memories, dtype = (batch_size, self.num_memories), compute_dtype(dtype)
        shape = (*memories, self.num_heads, self.head_k_dim, self.head_v_dim)
        conv = self.conv.init_state(batch_size * self.num_memories, device, dtype)
        return {
            "recurrent": torch.zeros(shape, device=device, dtype=dtype),
            "conv": conv.unflatten(0, memories),
        }

    def route(self, x: Tensor, ctx: PositionContext) -> tuple[Tensor, Tensor]:
        """(the routing weights [B, T, E], 0 off a token's top-k and at pads; routed [B, T, E] bool)."""
        scores = self.router(x).to(compute_dtype(x.dtype)).softmax(-1)
        top = scores.topk(self.topk, dim=-1)
        weights = torch.zeros_like(scores).scatter(-1, top.indices, top.values / top.values.sum(-1, True))
        routed = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, top.indices, True)
        if ctx.pad_mask is not None:
            routed = routed & ctx.pad_mask[..., None]
        return weights, routed

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        memories, heads, dtype = self.num_memories, self.num_heads, compute_dtype(x.dtype)
        weights, routed = self.route(x, ctx)
        count = routed.sum(1)  # [B, E]: tokens each memory gets in this call
        rank = torch.where(routed, routed.long().cumsum(1) - 1, seq_len)  # [B, T, E]
        packed = pack(x, rank)  # [B, E, T, D]
        valid = torch.arange(seq_len, device=x.device) < count[..., None]  # [B, E, T]
        k, v, b, a = torch.einsum("betd,eod->beto", packed, self.memory_weight.to(x.dtype)).split(
            self.widths, dim=-1
        )
        inputs = torch.cat([self.q_proj(packed), k, v], dim=-1).flatten(0, 1)  # [B·E, T, C]
        buffer = None if state is None else state["conv"].flatten(0, 1)
        mixed, _ = self.conv(inputs, buffer)
        q, k, v = mixed.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        q = l2_normalize(q.unflatten(-1, (heads, -1)))  # [B·E, T, H, d_k]
        k = l2_normalize(k.unflatten(-1, (heads, -1)))
        v = v.unflatten(-1, (heads, -1))
        on = valid.flatten(0, 1)[..., None]  # [B·E, T, 1]: the packed tail is identity steps
        beta = torch.sigmoid(b.to(dtype)).flatten(0, 1) * on
        g = -self.A_log.to(dtype).exp() * F.softplus(a.to(dtype).flatten(0, 1) + self.dt_bias.to(dtype)) * on
        past = None if state is None else state["recurrent"].flatten(0, 1)
        out, new_state = self._delta_rule(q, k, v, beta, g, past)  # [B·E, T, H, d_v]
        out = out.unflatten(0, (batch, memories)).to(dtype)
        index = rank.clamp(max=seq_len - 1).transpose(1, 2)  # [B, E, T]: each token's place, per memory
        per_token = out.gather(2, index[..., None, None].expand(-1, -1, -1, heads, self.head_v_dim))
        mixed_out = torch.einsum("bteh...,bte->bth...", per_token.permute(0, 2, 1, 3, 4), weights)
        gate = None if self.g_proj is None else self.g_proj(x)
        y = self.out_proj(head_rms_norm(mixed_out, self.norm_weight, self.norm_eps, gate).to(x.dtype))
        if state is None:
            return y, None
        # each memory's conv buffer: its last conv_size − 1 inputs, the routed ones of this call after the old
        full = torch.cat([buffer.to(inputs.dtype), inputs.transpose(1, 2)], dim=2)  # [B·E, C, K − 1 + T]
        width = self.conv.kernel_size - 1
        start = count.flatten()[:, None] + torch.arange(width, device=x.device)  # [B·E, K − 1]
        new_buffer = full.gather(2, start[:, None, :].expand(-1, full.shape[1], -1))
        return y, {
            "recurrent": new_state.unflatten(0, (batch, memories)),
            "conv": new_buffer.unflatten(0, (batch, memories)).to(state["conv"].dtype),
        }

    def _delta_rule(
        self, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor, past: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        if past is not None and q.shape[1] == 1:
            out, new_state = delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g[:, 0], past)
            return out[:, None], new_state
        if self.backend_name() == "fused":
            out, new_state = fla_op(*FUSED_KERNEL)(
                q=q, k=k, v=v, g=g.float().contiguous(), beta=beta.to(q.dtype),
                initial_state=None if past is None else past.float(), output_final_state=past is not None,
            )  # fmt: skip
            return out, None if past is None else new_state.to(past.dtype)
        return chunk_delta_rule(q, k, v, beta, g, None, past, past is not None, self.chunk_size)

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.q_proj.weight, FUSED_KERNEL, "mixin=mom")

    def flops_per_token(self, seq_len: int) -> float:
        # q, router, gate and out projections; then every memory's k/v/β/a projections, conv and chunked
        # gated delta rule (as `gated_deltanet`): each memory's sequence is packed to the call's length,
        # so every token position runs through all E memories (fla's packing does topk/E of this work)
        chunk, dk, dv = min(self.chunk_size, max(seq_len, 1)), self.head_k_dim, self.head_v_dim
        rule = self.num_heads * (6 * chunk * dk + 4 * chunk * dv + 2 * chunk * chunk / 3 + 6 * dk * dv)
        memory = 2 * self.hidden_size * sum(self.widths) + self.conv.flops_per_token() + rule
        return projection_flops(self) + self.num_memories * memory

    def state_size(self, seq_len: int) -> int:
        per_memory = self.num_heads * self.head_k_dim * self.head_v_dim + self.conv.state_size()
        return self.num_memories * per_memory
