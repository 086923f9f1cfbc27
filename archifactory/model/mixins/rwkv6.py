"""RWKV-6 "Finch" time-mix: a linear recurrence with a matrix-valued state and data-dependent decay.

The WKV recurrence per head (r, k, w in R^K, v in R^V, state S in R^{K x V}, log-decay g = log w <= 0):

    o_t = r_t · (S_{t-1} + diag(u) k_tᵀ v_t)          S_t = diag(exp(g_t)) S_{t-1} + k_tᵀ v_t

Two reference implementations of it live here, both in plain PyTorch:
- `wkv6_chunked`: the training path. Chunks of `chunk_size` tokens, split into sub-chunks of
  `sub_chunk_size`; the log-decay from token s to token t is the sum of the log-decays strictly between
  them, always computed from sums of non-positive terms local to a sub-chunk (or whole sub-chunk totals),
  via masked matrix products (never as a difference of two cumulative sums, which cancels
  catastrophically for strong decays, and never as exp of a positive number). Only pairs inside one
  sub-chunk need a pairwise [S, S, K] decay; pairs across sub-chunks are matrix products of decayed r and
  k; across chunks the state is carried by a loop over chunks. Log-decays and the state are kept in at least fp32.
- `wkv6_recurrent`: token by token, the decode step (and the oracle for the chunked form).

Pads of a padded batch (`ctx.pad_mask`) are identity steps, set on the layer's inputs: zeros shifted in
by the token shift, k = 0 and log-decay 0, so a left-padded row ends in the state of the row alone.
"""

from __future__ import annotations

import math

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
from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters

NUM_MIXES = 5  # the ddlerp mixes, in this order: w (decay), k, v, r, g
FUSED_KERNEL = ("rwkv6", "chunk_rwkv6")


def depth_ratios(layer_idx: int, num_layers: int | None) -> tuple[float, float]:
    """RWKV's depth-dependent init ratios (ratio_0_to_1 = l / (L - 1), ratio_1_to_0 = 1 - l / L); a layer
    built outside a model (num_layers None) takes the middle of the stack, (0.5, 0.5)."""
    if num_layers is None:
        return 0.5, 0.5
    return layer_idx / max(num_layers - 1, 1), 1.0 - layer_idx / num_layers


def wkv6_recurrent(
    r: Tensor, k: Tensor, v: Tensor, g: Tensor, u: Tensor, state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Token-by-token WKV. r/k/g [B, T, H, K], v [B, T, H, V], u [H, K], state [B, H, K, V] (None = 0).
    Returns (o [B, T, H, V], final state [B, H, K, V]), both in the compute dtype (>= fp32)."""
    dtype = compute_dtype(v.dtype)
    r, k, v, g, u = (t.to(dtype) for t in (r, k, v, g, u))
    batch, seq_len, heads, key_dim = r.shape
    if state is None:
        state = r.new_zeros(batch, heads, key_dim, v.shape[-1])
    state = state.to(dtype)
    outputs = []
    for t in range(seq_len):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, K, V]
        outputs.append((r[:, t, :, :, None] * (state + u[:, :, None] * kv)).sum(-2))  # [B, H, V]
        state = g[:, t].exp()[..., None] * state + kv
    return torch.stack(outputs, dim=1), state


def _chunk_masks(size: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """0/1 masks over positions in a block: between [L*L, L] (s < j < t, row t*L+s), strictly before
    [L, L] (j < t), strictly after [L, L] (j > s), causal [L, L] (s < t). Built per call, not cached:
    they are tiny, and torch.compile folds them into constants (it ignores an lru_cache anyway)."""
    idx = torch.arange(size, device=device)
    t, s, j = idx[:, None, None], idx[None, :, None], idx[None, None, :]
    between = ((s < j) & (j < t)).reshape(size * size, size)
    before = idx[None, :] < idx[:, None]
    return between, before, before.t().contiguous(), before


def wkv6_chunked(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    u: Tensor,
    state: Tensor | None = None,
    chunk_size: int = 32,
    sub_chunk_size: int = 8,
) -> tuple[Tensor, Tensor]:
    """Chunked WKV, same contract as `wkv6_recurrent`; one Python iteration per chunk, not per token.

    Each chunk is split into sub-chunks of `sub_chunk_size` tokens. For s in an earlier sub-chunk than t,
    with p the first token of t's sub-chunk and q the first token after s's sub-chunk, the decay splits as
    exp(sum_{p<=j<t} g) · exp(sum over whole sub-chunks between) · exp(sum_{s<j<q} g): three sums of
    non-positive terms, each local, so the off-diagonal sub-blocks are plain matrix products of decayed r
    and k. Only the diagonal sub-blocks use the pairwise [S, S, K] decay."""
    dtype = compute_dtype(v.dtype)
    batch, seq_len, heads, key_dim = r.shape
    value_dim = v.shape[-1]
    sub = max(1, min(sub_chunk_size, chunk_size, seq_len))
    size = math.ceil(max(1, min(chunk_size, seq_len)) / sub) * sub  # a multiple of the sub-chunk
    num_sub = size // sub
    num_chunks = math.ceil(seq_len / size)
    pad = num_chunks * size - seq_len
    shape = (batch, heads, num_chunks, num_sub, sub)

    def chunks(x: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, N, n, S, D]; padding: k=v=r=0, g=0 (no decay)
        x = F.pad(x.to(dtype), (0, 0, 0, 0, 0, pad))
        return x.transpose(1, 2).reshape(*shape, x.shape[-1])

    r, k, v, g = chunks(r), chunks(k), chunks(v), chunks(g)
    between, before, after, causal = (m.to(dtype) for m in _chunk_masks(sub, r.device))
    sub_between, sub_before, sub_after, sub_causal = (m.to(dtype) for m in _chunk_masks(num_sub, r.device))

    # diagonal sub-blocks: decay from s to t is exp(sum_{s<j<t} g_j), a sum of non-positive terms
    seg = (between @ g).view(*shape, sub, key_dim)  # [B, H, N, n, St, Ss, K]
    diag = (r[..., :, None, :] * k[..., None, :, :] * seg.exp()).sum(-1) * causal  # [B, H, N, n, St, Ss]

    # off-diagonal sub-blocks: r decayed from its sub-chunk start, k to its sub-chunk end, and the whole
    # sub-chunks strictly between them (zero above and on the diagonal)
    r_sub = r * (before @ g).exp()  # [B, H, N, n, S, K]
    k_sub = k * (after @ g).exp()
    totals = g.sum(-2)  # [B, H, N, n, K]
    middle = (sub_between @ totals).view(batch, heads, num_chunks, num_sub, num_sub, key_dim)
    middle = middle.exp() * sub_causal[..., None]  # [B, H, N, ni, nj, K]
    blocks = (r_sub[..., :, None, :, :] * middle[..., None, :]) @ k_sub[..., None, :, :, :].transpose(-1, -2)
    eye = torch.eye(num_sub, dtype=dtype, device=r.device)[:, :, None, None]
    blocks = blocks + eye * diag[..., :, None, :, :]  # [B, H, N, ni, nj, St, Ss]
    scores = blocks.transpose(-3, -2).reshape(batch, heads, num_chunks, size, size)
    v = v.reshape(batch, heads, num_chunks, size, value_dim)
    bonus = (r * u.to(dtype)[None, :, None, None, None, :] * k).sum(-1)  # [B, H, N, n, S]
    out = scores @ v + bonus.reshape(batch, heads, num_chunks, size, 1) * v  # [B, H, N, L, V]

    # inter-chunk: the state at each chunk start, carried chunk to chunk
    r_decayed = r_sub * (sub_before @ totals).exp()[..., None, :]  # decay from the chunk start to before t
    k_decayed = k_sub * (sub_after @ totals).exp()[..., None, :]  # decay from after s to the chunk end
    r_decayed = r_decayed.reshape(batch, heads, num_chunks, size, key_dim)
    k_decayed = k_decayed.reshape(batch, heads, num_chunks, size, key_dim)
    chunk_kv = k_decayed.transpose(-1, -2) @ v  # [B, H, N, K, V]
    chunk_decay = totals.sum(-2).exp()[..., None]  # [B, H, N, K, 1]
    current = r.new_zeros(batch, heads, key_dim, value_dim) if state is None else state.to(dtype)
    starts, current = carry_chunks(current, chunk_kv, chunk_decay)
    out = out + r_decayed @ starts  # [B, H, N, L, V]
    out = out.reshape(batch, heads, num_chunks * size, value_dim)[:, :, :seq_len].transpose(1, 2)
    return out, current


@register_mixin("rwkv6")
class RWKV6TimeMix(Mixin):
    """RWKV-6 "Finch" time-mix (Peng et al., "Eagle and Finch: RWKV with Matrix-Valued States and Dynamic
    Recurrence", 2024).

    Token shift with data-dependent interpolation (ddlerp): x_prev - x is mixed into x with five per-channel
    weights (for w, k, v, r, g) offset by a shared low-rank (rank `mix_rank`) tanh projection. The decay is
    data-dependent per channel, w_t = exp(-exp(d_t)) with d_t = time_decay + tanh(x_w A) B (rank
    `decay_rank`); u is a learned per-channel bonus for the current token. Per head (size hidden/num_heads,
    keys = values = head size, scale 1 as in RWKV) the WKV recurrence in the module docstring gives o_t,
    followed by a per-head group norm, a SiLU gate and `out_proj`. Decode state: the WKV state
    [B, H, K, V] (kept in >= fp32) and the token-shift buffer [B, D] (the last input token).

    Init (RWKV-6's, depth-dependent through a = l/(L-1), b = 1 - l/L for layer l of the model's L layers,
    `num_layers` being supplied by the model): mixes 1 - (i/D)^b (v: 1 - (i/D)^b - 0.3a, r/g:
    1 - (i/D)^(b/2)), time_decay -6 + 5 (i/(D-1))^(0.7 + 1.3a), LoRA down-projections zero and
    up-projections U(-0.01, 0.01), bonus a (1 - i/(D-1)) + zigzag 0.1; r/k/v/g/out projections follow the
    model's scheme.

    Options:
        num_heads: WKV heads; mix_rank: rank of the ddlerp LoRA (32 in RWKV-6);
        decay_rank: rank of the decay LoRA (64); norm_eps: group-norm epsilon (RWKV-6: 64e-5);
        chunk_size: tokens per chunk of the reference chunked form (one Python step per chunk);
        sub_chunk_size: tokens per sub-chunk inside a chunk (memory ~ B·T·D·(sub_chunk_size +
            chunk_size/sub_chunk_size); about sqrt(chunk_size) is best);
        backend: `auto` (fla's `chunk_rwkv6` Triton kernel on CUDA when fla is installed, else reference),
            `reference` (plain PyTorch, any device), `fused` (fla; refuses to run elsewhere).
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        num_heads: int = 4,
        mix_rank: int = 32,
        decay_rank: int = 64,
        norm_eps: float = 64e-5,
        chunk_size: int = 32,
        sub_chunk_size: int = 8,
        backend: str = "auto",
        num_layers: int | None = None,
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.num_heads = num_heads
        self.head_dim = check_divisible(hidden_size, num_heads, "mixin=rwkv6")
        check_backend(backend, "mixin=rwkv6")
        if chunk_size < 1 or sub_chunk_size < 1 or mix_rank < 1 or decay_rank < 1:
            raise ArchiFactoryError(
                f"mixin=rwkv6: chunk_size={chunk_size}, sub_chunk_size={sub_chunk_size}, mix_rank={mix_rank}, "
                f"decay_rank={decay_rank} must all be positive"
            )
        self.backend = backend
        self.mix_rank, self.decay_rank = mix_rank, decay_rank
        self.norm_eps, self.chunk_size, self.sub_chunk_size = norm_eps, chunk_size, sub_chunk_size

        dim = hidden_size
        ratio_0_to_1, ratio_1_to_0 = depth_ratios(layer_idx, num_layers)
        ddd = torch.arange(dim, dtype=torch.float32) / dim
        lerp = 1.0 - ddd.pow(ratio_1_to_0)
        lerp_half = 1.0 - ddd.pow(0.5 * ratio_1_to_0)
        self.time_maa_x = nn.Parameter(lerp.clone())
        self.time_maa = nn.Parameter(
            torch.stack([lerp, lerp, lerp - 0.3 * ratio_0_to_1, lerp_half, lerp_half])
        )
        self.time_maa_w1 = nn.Parameter(torch.zeros(dim, NUM_MIXES * mix_rank))
        self.time_maa_w2 = nn.Parameter(torch.empty(NUM_MIXES, mix_rank, dim).uniform_(-0.01, 0.01))
        n = torch.arange(dim, dtype=torch.float32) / max(dim - 1, 1)
        self.time_decay = nn.Parameter(-6.0 + 5.0 * n.pow(0.7 + 1.3 * ratio_0_to_1))
        self.time_decay_w1 = nn.Parameter(torch.zeros(dim, decay_rank))
        self.time_decay_w2 = nn.Parameter(torch.empty(decay_rank, dim).uniform_(-0.01, 0.01))
        zigzag = ((torch.arange(dim) + 1) % 3 - 1).float() * 0.1
        self.time_faaaa = nn.Parameter((ratio_0_to_1 * (1.0 - n) + zigzag).view(num_heads, self.head_dim))

        self.receptance = nn.Linear(dim, dim, bias=False)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(dim))
        self.norm_bias = nn.Parameter(torch.zeros(dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)

    def init_roles(self) -> InitRoles:
        # every raw parameter (mixes, decays, LoRA factors, bonus, group-norm affine) is drawn above
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        wkv = torch.zeros(
            batch_size,
            self.num_heads,
            self.head_dim,
            self.head_dim,
            device=device,
            dtype=compute_dtype(dtype),
        )
        return {"wkv": wkv, "shift": torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)}

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        batch, seq_len, dim = x.shape
        heads, head_dim = self.num_heads, self.head_dim
        # x_{t-1} - x_t [B, T, D]; pads shift in zeros, as the start of a sequence does
        shift_in = zero_pads(x, ctx)  # its last token is the decode buffer (a trailing pad leaves 0)
        delta = token_shift(shift_in, None if state is None else state["shift"]) - x

        # ddlerp: five data-dependent interpolations between x_t and x_{t-1}
        lora = torch.tanh((x + delta * self.time_maa_x) @ self.time_maa_w1).view(
            batch, seq_len, NUM_MIXES, -1
        )
        lora = torch.einsum("btfr,frd->btfd", lora, self.time_maa_w2)  # [B, T, 5, D]
        mixed = x[:, :, None] + delta[:, :, None] * (self.time_maa + lora)  # [B, T, 5, D]
        x_w, x_k, x_v, x_r, x_g = mixed.unbind(dim=2)

        log_decay = self.time_decay + torch.tanh(x_w @ self.time_decay_w1) @ self.time_decay_w2
        log_decay = -log_decay.to(compute_dtype(x.dtype)).exp()  # log w_t = -exp(d_t) <= 0, [B, T, D]
        shape = (batch, seq_len, heads, head_dim)
        r, k, v = self.receptance(x_r).view(shape), self.key(x_k).view(shape), self.value(x_v).view(shape)
        g = log_decay.view(shape)
        k, g = zero_pads(k, ctx), zero_pads(g, ctx)  # pads: no write, no decay (identity WKV steps)

        wkv_state = None if state is None else state["wkv"]
        out, final = self._wkv(r, k, v, g, wkv_state)  # [B, T, H, V]

        out = head_group_norm(out, self.norm_weight, self.norm_bias, self.norm_eps).to(x.dtype)  # [B, T, D]
        y = self.out_proj(out * F.silu(self.gate(x_g)))
        new_state = None if state is None else {"wkv": final.to(state["wkv"].dtype), "shift": shift_in[:, -1]}
        return y, new_state

    def _wkv(
        self, r: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """Run the recurrence on the resolved path; single-token decode always takes the recurrent step."""
        if state is not None and r.shape[1] == 1:
            return wkv6_recurrent(r, k, v, g, self.time_faaaa, state)
        if self.backend_name() == "fused":
            return fla_op(*FUSED_KERNEL)(
                r,
                k,
                v,
                g,
                self.time_faaaa.to(r.dtype),
                scale=1.0,
                initial_state=state,
                output_final_state=state is not None,
            )
        return wkv6_chunked(r, k, v, g, self.time_faaaa, state, self.chunk_size, self.sub_chunk_size)

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.out_proj.weight, FUSED_KERNEL, "mixin=rwkv6")

    def flops_per_token(self, seq_len: int) -> float:
        dim = self.hidden_size
        projections = 2 * 5 * dim * dim  # r, k, v, g, out
        lora = 2 * 2 * NUM_MIXES * dim * self.mix_rank + 2 * 2 * dim * self.decay_rank
        # recurrent form per head: k v outer product + decay + add (3 K V), readout r·S (2 K V), bonus
        wkv = 5 * dim * self.head_dim + 4 * dim
        elementwise = 30 * dim  # shifts, five lerps, decay exp, group norm, gate
        return projections + lora + wkv + elementwise

    def state_size(self, seq_len: int) -> int:
        return self.num_heads * self.head_dim * self.head_dim + self.hidden_size
