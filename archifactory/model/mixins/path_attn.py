"""PaTH attention: softmax attention whose position encoding is a data-dependent product of Householders."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import (
    ShortConvolution,
    fill_pads,
    fla_backend,
    fla_op,
    grouped_heads,
    head_rms_norm,
    zero_pads,
)
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.delta_rule import l2_normalize
from archifactory.model.mixins.reference.path_attn import path_attention, path_step
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles

FUSED_KERNEL = ("path_attn", "parallel_path_attn")
FUSED_HEAD_DIMS = (16, 32, 64, 128)  # fla's parallel_path_attn supports these head sizes only


@register_mixin("path_attn")
class PaTHAttention(Mixin):
    """PaTH attention (Yang et al., "PaTH Attention: Position Encoding via Accumulating Householder
    Transformations", 2025).

    Causal softmax attention in which the key j seen by query i is transformed by every token between
    them: with H_s = I − β_s w_s w_sᵀ (w_s = L2-normalised, short-conv'd w_proj x_s; β_s = 2·sigmoid(
    bt_proj x_s) ∈ (0, 2)),
        o_i = Σ_{j<=i} softmax_j(scale · (q_iᵀ H_i ⋯ H_{j+1} k_j + G_i − G_j)) v_j
    — a position encoding that, unlike RoPE's fixed rotations, depends on the data (so it can track
    state). With `use_forget_gate`, G is FoX's cumulative log forget gate (logsigmoid(g_proj x), one per
    query head; scaled with the logits as in fla). Positional schemes are ignored: PaTH is the position
    encoding. Grouped K/V heads; optional per-head RMSNorm of q and k. The reference is blockwise
    (`reference/path_attn.py`, O(T²) like attention); on CUDA fla's `parallel_path_attn`. Decode state:
    the KV cache with every key already carried to the newest token [B, T, H_kv, d] (fp32), the values,
    the gates' G per query head (with the forget gate) and the w conv buffer. In a padded batch a pad is
    an identity step (β = 0, zero conv input, log f = 0) and its key is masked; a padded call runs the
    reference (fla's kernel has no mask).

    Options:
        num_heads; num_kv_heads (null = num_heads); use_forget_gate; use_qk_norm (eps `norm_eps`);
        w_rank: w_proj as d → w_rank → kv width (fla: 32), 0 for one full d → kv matrix;
        use_w_shortconv / conv_size: the causal conv + SiLU on w (fla: kernel 3); chunk_size: block
        length of the reference; backend: `auto` (fla on CUDA for training and an empty-cache prefill;
        decoding steps in PyTorch), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        use_forget_gate: bool = False,
        use_qk_norm: bool = False,
        norm_eps: float = 1e-5,
        w_rank: int = 32,
        use_w_shortconv: bool = True,
        conv_size: int = 3,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        name = "mixin=path_attn"
        self.head_dim, self.num_kv_heads = grouped_heads(hidden_size, num_heads, num_kv_heads, name)
        if chunk_size < 1 or w_rank < 0 or (use_w_shortconv and conv_size < 2):
            raise ArchiFactoryError(
                f"{name}: need chunk_size >= 1, w_rank >= 0 and conv_size >= 2; got {chunk_size}, {w_rank}, {conv_size}"
            )
        self.backend = check_backend(backend, name)
        self.num_heads, self.chunk_size, self.norm_eps = num_heads, chunk_size, norm_eps
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden_size, hidden_size + 2 * self.kv_size, bias=False)
        if w_rank:
            self.w_proj = nn.Sequential(
                nn.Linear(hidden_size, w_rank, bias=False), nn.Linear(w_rank, self.kv_size, bias=False)
            )
        else:
            self.w_proj = nn.Linear(hidden_size, self.kv_size, bias=False)
        self.conv = ShortConvolution(self.kv_size, conv_size) if use_w_shortconv else None
        self.bt_proj = nn.Linear(hidden_size, self.num_kv_heads, bias=True)
        self.g_proj = nn.Linear(hidden_size, num_heads, bias=True) if use_forget_gate else None
        self.q_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if use_qk_norm else None
        self.k_norm_weight = nn.Parameter(torch.ones(self.head_dim)) if use_qk_norm else None
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        norms = tuple(p for p in (self.q_norm_weight, self.k_norm_weight) if p is not None)
        return InitRoles(
            residual=(self.out_proj,), keep=(*norms, *(() if self.conv is None else (self.conv,)))
        )

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        shape = (batch_size, 0, self.num_kv_heads, self.head_dim)
        state = {
            "k": torch.zeros(shape, device=device, dtype=compute_dtype(dtype)),
            "v": torch.zeros(shape, device=device, dtype=dtype),
        }
        if self.g_proj is not None:
            state["gate"] = torch.zeros(
                batch_size, 0, self.num_heads, device=device, dtype=compute_dtype(dtype)
            )
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch_size, device, dtype)
        return state

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, _ = x.shape
        dtype = compute_dtype(x.dtype)
        q, k, v = self.qkv_proj(x).split([self.hidden_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, seq_len, self.num_heads, self.head_dim)
        k = k.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq_len, self.num_kv_heads, self.head_dim)
        if self.q_norm_weight is not None:
            q = head_rms_norm(q, self.q_norm_weight, self.norm_eps).view_as(q).to(q.dtype)
            k = head_rms_norm(k, self.k_norm_weight, self.norm_eps).view_as(k).to(k.dtype)
        # a pad is an identity step: zero conv input, β = 0 (H = I), log f = 0; its key is masked
        w, conv_state = zero_pads(self.w_proj(x), ctx), None
        if self.conv is not None:
            w, conv_state = self.conv(w, None if state is None else state["conv"])
        w = l2_normalize(w.view(batch, seq_len, self.num_kv_heads, self.head_dim).to(dtype))
        beta = fill_pads(2 * torch.sigmoid(self.bt_proj(x).to(dtype)), ctx, 0.0)  # [B, T, H_kv], β ∈ (0, 2)
        log_f = None if self.g_proj is None else fill_pads(F.logsigmoid(self.g_proj(x).to(dtype)), ctx, 0.0)
        gate = None if log_f is None else log_f.cumsum(1)  # G_t within this call
        if gate is not None and state is not None and state["gate"].shape[1]:  # continue from the cache
            gate = gate + state["gate"][:, -1:]
        key_mask = ctx.key_mask(0 if state is None else state["k"].shape[1])  # [B, Tk] when padded
        if state is not None and seq_len == 1:
            step_gate = None if gate is None else gate[:, 0]
            out, new = path_step(
                q[:, 0], k[:, 0], v[:, 0], w[:, 0], beta[:, 0], step_gate, state, key_mask=key_mask
            )
            out = out[:, None]
        elif (
            self.backend_name() == "fused"
            and key_mask is None
            and (state is None or state["k"].shape[1] == 0)
        ):
            out, new = self._fused(q, k, v, w, beta, log_f, state)
        else:
            out, new = self._reference(q, k, v, w, beta, gate, state, key_mask)
        y = self.out_proj(out.reshape(batch, seq_len, self.hidden_size).to(x.dtype))
        if state is None:
            return y, None
        if conv_state is not None:
            new["conv"] = conv_state
        return y, new

    def _reference(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        w: Tensor,
        beta: Tensor,
        gate: Tensor | None,
        state: MixinState | None,
        key_mask: Tensor | None,
    ) -> tuple[Tensor, MixinState]:
        """Blockwise PaTH; a cache enters as keys whose Householders are the identity (w = 0, β = 0);
        key_mask [B, Tk] masks a padded batch's pad keys."""
        new: MixinState = {}
        gate_k = gate
        if state is not None:
            past = state["k"]
            k = torch.cat([past.to(k.dtype), k], dim=1)
            v = torch.cat([state["v"], v.to(state["v"].dtype)], dim=1)
            w = torch.cat([w.new_zeros(past.shape), w], dim=1)
            beta = torch.cat([beta.new_zeros(past.shape[:3]), beta], dim=1)
            if gate is not None:
                gate_k = torch.cat([state["gate"], gate.to(state["gate"].dtype)], dim=1)
                new["gate"] = gate_k
            new["v"] = v
        out, keys = path_attention(
            q, k, v, w, beta, gate, gate_k, None, self.chunk_size, state is not None, key_mask
        )
        if state is not None:
            new["k"] = keys.to(state["k"].dtype)
        return out, new

    def _fused(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        w: Tensor,
        beta: Tensor,
        log_f: Tensor | None,
        state: MixinState | None,
    ) -> tuple[Tensor, MixinState]:
        kernel = fla_op(*FUSED_KERNEL)
        out, keys = kernel(
            q, k, v, w.float(), beta.float(), None if log_f is None else log_f.float(),
            scale=self.head_dim**-0.5, use_cache=state is not None,
        )  # fmt: skip
        if state is None:
            return out, {}
        new = {"k": keys.to(state["k"].dtype), "v": v.to(state["v"].dtype)}
        if log_f is not None:
            new["gate"] = log_f.cumsum(1).to(state["gate"].dtype)
        return out, new

    def backend_name(self) -> str:
        if self.head_dim not in FUSED_HEAD_DIMS:
            if self.backend == "fused":
                raise ArchiFactoryError(
                    f"mixin=path_attn: backend=fused needs a head size in {FUSED_HEAD_DIMS}, got {self.head_dim}; "
                    "change model.hidden_size / num_heads or use mixin.backend=reference"
                )
            return "reference"
        return fla_backend(self.backend, self.qkv_proj.weight, FUSED_KERNEL, "mixin=path_attn")

    def flops_per_token(self, seq_len: int) -> float:
        conv = 0 if self.conv is None else self.conv.flops_per_token()
        keys = (seq_len + 1) / 2  # average causal prefix
        chunk, d = min(self.chunk_size, max(seq_len, 1)), self.head_dim
        # per query head and token: q·k̃ and p·v over the prefix, and the query rows carried through one more
        # chunk product per earlier chunk ((R Wᵀ) U: 4d per key); in-chunk q·w, q·k, (q·w) X and (q·w) U
        per_query = 8 * d * keys + 4 * chunk * d + 2 * chunk * chunk + 2 * chunk * d
        # per key head and token: w·w and w·k in the chunk, the triangular solve for U and X, K̃ = K − XᵀW
        per_key = 4 * chunk * d + chunk * (chunk + d) + 2 * chunk * d
        return projection_flops(self) + conv + self.num_heads * per_query + self.num_kv_heads * per_key

    def state_size(self, seq_len: int) -> int:
        gates = 0 if self.g_proj is None else self.num_heads
        conv = 0 if self.conv is None else self.conv.state_size()
        return (2 * self.kv_size + gates) * seq_len + conv
