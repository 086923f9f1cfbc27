"""Manifold-Constrained Hyper-Connections (Xie et al., DeepSeek-AI, "mHC", arXiv:2512.24880)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.registry import register_residual
from archifactory.model.residual.base import StreamResidual


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """Sinkhorn–Knopp (Sinkhorn & Knopp, 1967) on exp(logits) [..., n, n]: `iters` rounds of dividing each row
    and then each column by its sum, so the result is doubly stochastic (columns exactly, rows to the
    method's convergence). The max is subtracted first, which the normalisations cancel (no overflow)."""
    matrix = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        matrix = matrix / matrix.sum(dim=-1, keepdim=True)
        matrix = matrix / matrix.sum(dim=-2, keepdim=True)
    return matrix


# b_res off the diagonal: H_res starts at e/(e + n − 1) on the diagonal (0.48 for n = 4). A wider spread
# of the logits (a sharper identity) slows Sinkhorn–Knopp's convergence (the error shrinks by at most
# tanh(spread/2)² per round, Franklin & Lorenz 1989), so 20 rounds would no longer hold the rows to 1e-6.
RES_OFF_DIAGONAL = -1.0


@register_residual("mhc")
class ManifoldHyperConnection(StreamResidual):
    """mHC: Manifold-Constrained Hyper-Connections (Xie et al., DeepSeek-AI, 2025, arXiv:2512.24880).

    Hyper-connections (`residual=hyper`) over n = `expansion` streams x ∈ R^{n×C}, with the update (paper
    Eq. 3) x' = H_res x + H_postᵀ F(H_pre x) and the three mappings computed per token from the
    flattened, RMS-normalised streams x̃ = RMSNorm(vec(x)) ∈ R^{nC} (the norm's weight absorbed into φ):

        H̃_pre  = α_pre  · (x̃ φ_pre)      + b_pre     H_pre  = σ(H̃_pre)            ∈ R^{1×n}
        H̃_post = α_post · (x̃ φ_post)     + b_post    H_post = 2σ(H̃_post)          ∈ R^{1×n}
        H̃_res  = α_res  · mat(x̃ φ_res)   + b_res     H_res  = Sinkhorn-Knopp(H̃_res) ∈ R^{n×n}

    H_res is projected onto the doubly stochastic matrices (the Birkhoff polytope) by `sinkhorn_iters`
    rounds of Sinkhorn–Knopp on exp(H̃_res), alternately normalising rows and columns (the paper's
    t_max = 20). The stability claim this option lets a sweep test: a doubly stochastic matrix has spectral
    norm ≤ 1 and the set is closed under products, so the composite residual mapping ∏ H_res across depth
    stays doubly stochastic — it preserves the streams' mean and cannot amplify them, where HC's
    unconstrained A_r compose to gains of ~3000 at 27B (mHC stays near 1.6, paper Fig. 7).
    Iterations are fixed (no convergence test, no host sync). After the last round the columns sum to 1
    exactly and the rows to within a gap that shrinks geometrically, at a rate set by the spread of the
    logits: with 20 rounds and logits spread as at init the rows are within 1e-6 (tested at every step of
    a short run); logits trained far apart leave a gap, the approximation mHC-lite (arXiv:2601.05732)
    points out. The mappings are computed in fp32 or wider (autocast off), as the paper keeps them.

    Init (our choice: HC's static init mapped through the constraints; the paper asks only for small α):
    φ = 0 and α = 0.01, so the mappings start static; b_pre gives σ ≈ 0.88 on stream k mod n and 0.12
    on the others (HC's read-in e_{k mod n}, unsaturated); b_post = 0 (H_post = 1: every stream gets the
    output, HC's B = 1); b_res = 0 on the diagonal and −1 off it (H_res leans to HC's A_r = I with
    0.48 on the diagonal for n = 4, a spread Sinkhorn–Knopp converges on quickly). The streams start as
    copies and every H_res is doubly stochastic, so the model starts as the pre-norm residual up to the
    final norm's scale.

    Two H_res are inert by construction, and get no gradient: the first sub-layer's (its streams are still
    copies of the embedding, which a doubly stochastic matrix maps to themselves) and the last one's (the
    streams are summed after it, and its columns sum to 1).

    Options: `expansion` (n, the paper's 4), `sinkhorn_iters` (t_max, the paper's 20).
    """

    def __init__(
        self, hidden_size: int, layer_idx: int, sublayer: int, expansion: int = 4, sinkhorn_iters: int = 20
    ) -> None:
        super().__init__(hidden_size, expansion)
        if sinkhorn_iters < 1:
            raise ValueError(f"residual.sinkhorn_iters={sinkhorn_iters} must be >= 1")
        n, k = expansion, 2 * layer_idx + sublayer
        self.sinkhorn_iters = sinkhorn_iters
        self.phi = nn.Parameter(torch.zeros(n * hidden_size, n * n + 2 * n))  # [φ_pre | φ_post | φ_res]
        self.alpha = nn.Parameter(torch.full((3,), 0.01))  # α_pre, α_post, α_res
        self.b_pre = nn.Parameter(torch.where(torch.arange(n) == k % n, 2.0, -2.0))
        self.b_post = nn.Parameter(torch.zeros(n))
        self.b_res = nn.Parameter(RES_OFF_DIAGONAL * (1 - torch.eye(n)))

    def mappings(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(H_pre [B, T, n], H_post [B, T, n], H_res [B, T, n, n]) for the streams h [B, T, n, D], in fp32 at
        least (autocast off: bf16 would leave H_res visibly off the doubly stochastic set)."""
        n, dtype = self.expansion, torch.promote_types(h.dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            flat = F.rms_norm(h.flatten(-2).to(dtype), (n * self.hidden_size,))  # [B, T, nD]
            pre, post, res = (flat @ self.phi.to(dtype)).split([n, n, n * n], dim=-1)
            alpha = self.alpha.to(dtype)
            h_pre = torch.sigmoid(alpha[0] * pre + self.b_pre.to(dtype))
            h_post = 2 * torch.sigmoid(alpha[1] * post + self.b_post.to(dtype))
            res = alpha[2] * res.unflatten(-1, (n, n)) + self.b_res.to(dtype)  # [B, T, n, n]
            return h_pre, h_post, sinkhorn(res, self.sinkhorn_iters)

    def read(self, h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h_pre, h_post, h_res = self.mappings(h)
        # the streams are the residual path: mixed in their own dtype (fp32 under bf16 autocast)
        with torch.autocast(h.device.type, enabled=False):
            x = (h_pre.unsqueeze(-2).to(h.dtype) @ h).squeeze(-2)  # H_pre x: [B, T, D]
            residual = h_res.to(h.dtype) @ h  # H_res x: [B, T, n, D]
        return x, (residual, h_post.to(h.dtype))

    def write(self, carry: tuple[Tensor, Tensor], out: Tensor) -> Tensor:
        residual, h_post = carry
        return residual + h_post.unsqueeze(-1) * out.unsqueeze(-2)  # [B, T, n, D]

    def flops_per_token(self) -> float:
        n, d = self.expansion, self.hidden_size
        projections = 2 * n * d * (n * n + 2 * n)
        mixing = 2 * n * d + 2 * n * n * d + 2 * n * d  # H_pre x, H_res x, the weighted write-back
        return float(projections + mixing + 4 * n * n * self.sinkhorn_iters)
