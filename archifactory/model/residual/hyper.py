"""Hyper-Connections (Zhu et al., "Hyper-Connections", ICLR 2025, arXiv:2409.19606)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archifactory.core.registry import register_residual
from archifactory.model.residual.base import StreamResidual


@register_residual("hyper")
class HyperConnection(StreamResidual):
    """Hyper-Connections (Zhu et al., "Hyper-Connections", ICLR 2025, arXiv:2409.19606).

    The hidden state is widened to `expansion` (n) streams H ∈ R^{n×D} per token (the embedding copied into
    each; summed before the final norm). Each sub-layer T (mixin or FFN, with its pre-norm) has the
    connection matrix HC = [[0, B], [A_m, A_r]] ∈ R^{(n+1)×(n+1)}:

        h_in = A_mᵀ H                 width connection: the sub-layer's input, a learned mix of the streams
        H'   = A_rᵀ H + Bᵀ T(h_in)    depth connection: streams mixed by A_r, the output written with weights B

    The paper's static init: B = 1, A_m = e_{k mod n} (sub-layer k reads stream k mod n), A_r = I; so
    n = 1 is exactly the pre-norm residual h + T(norm(h)), bit for bit.

    `dynamic=true` is the paper's DHC: with H̄ = norm(H) (LayerNorm over D, per stream),
        A_m(H) = A_m + s_α · tanh(H̄ W_m),  A_r(H) = A_r + s_α · tanh(H̄ W_r),  B(H) = B + s_β · tanh(H̄ W_β)ᵀ
    with W_m, W_r (stored together as `alpha_fn` [D, n+1]) and W_β (`beta_fn` [D]) zero-initialised and the
    scales s_α, s_β initialised to 0.01, so a dynamic connection starts as the static one.

    Options: `expansion` (n, the paper's best is 4), `dynamic` (DHC, default; false: SHC).
    """

    standard_equivalent = {"expansion": 1, "dynamic": False}

    def __init__(
        self, hidden_size: int, layer_idx: int, sublayer: int, expansion: int = 4, dynamic: bool = True
    ) -> None:
        super().__init__(hidden_size, expansion)
        n, k = expansion, 2 * layer_idx + sublayer
        read_in = torch.zeros(n, 1)
        read_in[k % n, 0] = 1.0
        # [n, n+1]: column 0 is A_m (stream -> sub-layer input), columns 1.. are A_r (stream -> stream)
        self.static_alpha = nn.Parameter(torch.cat([read_in, torch.eye(n)], dim=1))
        self.static_beta = nn.Parameter(torch.ones(n))  # B: the sub-layer output's weight into each stream
        self.dynamic = dynamic
        if dynamic:
            self.norm = nn.LayerNorm(hidden_size)
            self.alpha_fn = nn.Parameter(torch.zeros(hidden_size, n + 1))
            self.alpha_scale = nn.Parameter(torch.full((1,), 0.01))
            self.beta_fn = nn.Parameter(torch.zeros(hidden_size))
            self.beta_scale = nn.Parameter(torch.full((1,), 0.01))

    def weights(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha [.., n, n+1] = [A_m | A_r], beta [.., n] = B) for the streams h [B, T, n, D]."""
        if not self.dynamic:
            return self.static_alpha, self.static_beta
        normed = self.norm(h)  # [B, T, n, D]
        alpha = self.static_alpha + self.alpha_scale * torch.tanh(normed @ self.alpha_fn)  # [B, T, n, n+1]
        beta = self.static_beta + self.beta_scale * torch.tanh(normed @ self.beta_fn)  # [B, T, n]
        return alpha, beta

    def read(self, h: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        # the streams are the residual path: mixed in their own dtype (fp32 under bf16 autocast), as the
        # standard residual adds in it
        with torch.autocast(h.device.type, enabled=False):
            alpha, beta = self.weights(h)
            mixed = alpha.transpose(-1, -2).to(h.dtype) @ h  # [B, T, n+1, D]: row 0 the input, 1.. A_rᵀ H
        return mixed[..., 0, :], (mixed[..., 1:, :], beta.to(h.dtype))

    def write(self, carry: tuple[Tensor, Tensor], out: Tensor) -> Tensor:
        residual, beta = carry
        return residual + beta.unsqueeze(-1) * out.unsqueeze(-2)  # [B, T, n, D]

    def flops_per_token(self) -> float:
        n, d = self.expansion, self.hidden_size
        flops = 2 * n * (n + 1) * d + 2 * n * d  # width mix + the weighted write-back
        if self.dynamic:
            flops += 2 * n * d * (n + 2)  # the projections of the normed streams (norm and tanh not counted)
        return float(flops)
