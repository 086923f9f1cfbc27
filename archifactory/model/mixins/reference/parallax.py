"""Parallax (parameterized local linear attention) in plain PyTorch (Zuo et al., 2026; fla's naive form).

Softmax attention is the Nadaraya–Watson estimate: a locally *constant* fit of the values around the
query, o = Σ_j p_j v_j with p = softmax(scale · q·k_j). Local linear attention fits a locally *linear*
model instead; Parallax replaces its solver by a learned second query r (the "probe") and keeps the
first-order correction: with s_j = r·k_j (not scaled),

    o = E_p[v] · (1 + E_p[s]) − E_p[s v] = E_p[v] − Cov_p(s, v)

(fla: O1/d1 · (1 + d2/d1) − O2/d1 with unnormalised p1, d1 = Σ p1, p2 = p1 ⊙ s, d2 = Σ p2) — softmax
attention minus the covariance, under the attention weights, between the probe score and the value. It is
also the first-order expansion of softmax attention with logits scale·q·k − s around s = 0. Masked
(invisible) keys get p = 0 and so drop out of every term. Materialises [B, H, Tq, Tk]; fp32 (fp64 for
fp64 inputs).
"""

from __future__ import annotations

from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype

FUSED_KERNEL = ("parallax", "parallel_parallax")  # fla.ops.parallax.parallel_parallax


def parallax_attention(
    q: Tensor,
    r: Tensor,
    k: Tensor,
    v: Tensor,
    visible: Tensor,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """q, r [B, H, Tq, D]; k, v [B, H_kv, Tk, D] with H_kv dividing H; `visible` [Tq, Tk] or
    [B, 1, Tq, Tk] (True = the query sees the key; every query sees at least one), `bias` [H, Tq, Tk]
    additive on the softmax logits, scale default 1/sqrt(D) (on q·k only). Returns [B, H, Tq, D] in q's
    dtype."""
    dtype = compute_dtype(q.dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    groups = q.shape[1] // k.shape[1]
    k, v = (t.to(dtype).repeat_interleave(groups, dim=1) for t in (k, v))
    logits = (q.to(dtype) @ k.transpose(-1, -2)) * scale  # [B, H, Tq, Tk]
    if bias is not None:
        logits = logits + bias.to(dtype)
    weights = logits.masked_fill(~visible, float("-inf")).softmax(-1)  # p1 / d1
    probed = weights * (r.to(dtype) @ k.transpose(-1, -2))  # p2 / d1: 0 where invisible
    out = (weights @ v) * (1 + probed.sum(-1, keepdim=True)) - probed @ v
    return out.to(q.dtype)
