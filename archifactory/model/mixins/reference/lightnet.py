"""LightNet's attention in plain PyTorch: linear attention whose keys are normalised by a softmax over time.

Per head and key channel c, with key logits k_t [K] and their running log-normaliser
z_t = log Σ_{j<=t} exp(k_j) (fla's additive gate), the state is a softmax-over-time weighted sum:

    S_t = Σ_{j<=t} exp(k_j − z_t) v_jᵀ   [K, V]        o_t = scale · S_tᵀ q_t

i.e. GLA with the log-decay g_t = z_{t−1} − z_t and the key exp(k_t − z_t) (fla's `chunk_lightnet` is
exactly `fused_additive_gate` + `chunk_gla`). Chunked here with the decays taken as differences of z, never
as sums of g: in a chunk, o_t = scale Σ_{j<=t} Σ_c q_t[c] exp(k_j[c] − z_t[c]) v_j (pairwise weights
[C, C, K], masked before the exp, every exponent <= 0) plus the entering state read as
scale (q_t ⊙ exp(z_enter − z_t))ᵀ S. The decode state is (S, z); an empty one has z = VOID_LOGIT, and a pad
step carries the key logit VOID_LOGIT (and v = 0), which leaves S and z exactly as they were (key logits
above −9000 assumed, which any trained layer has by far).
Layout as fla: q/k [B, T, H, K], v [B, T, H, V]; states S [B, H, K, V], z [B, H, K]; scale K^−1/2 (fla's
default). Runs in fp32 (fp64 when the inputs are fp64).
"""

from __future__ import annotations

from torch import Tensor

from archifactory.model.mixins.kit import fla_op
from archifactory.model.mixins.reference.abc import VOID_LOGIT, chunked_normaliser
from archifactory.model.mixins.reference.common import carry_chunks, compute_dtype
from archifactory.model.mixins.reference.delta_rule import Chunker, decayed_scores, pair_decay

FUSED_KERNEL = ("lightnet", "chunk_lightnet")  # fla.ops.lightnet.chunk_lightnet

LightNetState = tuple[Tensor, Tensor]  # S [B, H, K, V], z [B, H, K]


def chunk_lightnet(q: Tensor, k: Tensor, v: Tensor, state: LightNetState, chunk_size: int):
    """The chunked form (module docstring) from `state`; returns (o [B, T, H, V], the final state)."""
    dtype = compute_dtype(q.dtype)
    memory, z_enter = (t.to(dtype) for t in state)
    chunk = Chunker(q.shape[1], chunk_size, dtype)
    kc, zc, z_first, z_final = chunked_normaliser(k, z_enter, chunk)  # [B, H, N, C, K], ...
    qc, vc = chunk(q) * q.shape[-1] ** -0.5, chunk(v)
    keys = (kc - zc).exp()  # exp(k_j − z_j) <= 1: the normalised key
    intra = decayed_scores(qc, keys, pair_decay(-zc, -zc, strict=False)) @ vc  # exp(z_j − z_t), j <= t
    to_end = keys * (zc - zc[..., -1:, :]).exp()  # exp(k_j − z_last)
    decay = (z_first - zc[..., -1:, :]).exp().transpose(-1, -2)  # [B, H, N, K, 1]
    entering, memory = carry_chunks(memory, to_end.transpose(-1, -2) @ vc, decay)  # [B, H, N, K, V]
    out = (qc * (z_first - zc).exp()) @ entering + intra
    return chunk.unchunk(out), (memory, z_final)


def empty_state(q: Tensor, v: Tensor) -> LightNetState:
    """A zero memory and a void normaliser for q [B, T, H, K], v [B, T, H, V]."""
    batch, _, heads, key_dim = q.shape
    dtype = compute_dtype(q.dtype)
    return (
        q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype),
        q.new_full((batch, heads, key_dim), VOID_LOGIT, dtype=dtype),
    )


def lightnet_forward(
    q: Tensor, k: Tensor, v: Tensor, state: LightNetState | None, backend: str, chunk_size: int
) -> tuple[Tensor, LightNetState | None]:
    """The mixin's entry point (k: the key logits). `backend` is resolved already; fla's `chunk_lightnet`
    runs the training path (no state). With a state the new one is returned in its dtype, without one
    None."""
    if backend == "fused" and state is None:
        out, _ = fla_op(*FUSED_KERNEL)(q=q, k=k.to(q.dtype), v=v)  # one dtype for fla's GLA kernel
        return out.to(v.dtype), None
    start = empty_state(q, v) if state is None else state
    out, new = chunk_lightnet(q, k, v, start, chunk_size)
    if state is None:
        return out.to(v.dtype), None
    return out.to(v.dtype), (new[0].to(state[0].dtype), new[1].to(state[1].dtype))
