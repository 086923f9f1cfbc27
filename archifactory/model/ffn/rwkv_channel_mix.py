"""RWKV channel-mix: the RWKV FFN, a squared-ReLU MLP on token-shifted inputs with a sigmoid receptance."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.model.ffn.base import FeedForward, FFNAux, intermediate_size
from archifactory.registry import register_ffn


@register_ffn("rwkv_cmix")
class RWKVChannelMix(FeedForward):
    """RWKV channel-mix (Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", 2023; the RWKV-6
    form of "Eagle and Finch", 2024).

    With x' the previous token's input (token shift) and per-channel mixes μ_k, μ_r:
    k = relu(W_k lerp(x, x', μ_k))², r = sigmoid(W_r lerp(x, x', μ_r)), y = r ⊙ out_proj(k).
    Init: μ_k = μ_r = 1 - (i/D)^0.5 (RWKV-6's middle-layer ratio); projections follow the model's scheme.

    Limitation — not position-wise, and stateless: the token shift reads token t-1 of the *same call*,
    and the first token of every call sees a zero previous token. The FFN interface `forward(x) -> (y, aux)`
    carries no decode state, so prefill + token-by-token decoding does NOT reproduce a full forward with
    this FFN (each decoded token would see a zero shift). Train and score with full-sequence forwards; for
    generation re-run the full prefix, or use it with a mixin-side state once the FFN contract grows one.
    It is causal and batch-independent, so training is exact.

    Options: `intermediate_multiplier` (3.5 in RWKV-6), `multiple_of` (round the intermediate size up).
    """

    def __init__(
        self, hidden_size: int, layer_idx: int, intermediate_multiplier: float = 3.5, multiple_of: int = 32
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        self.intermediate_size = intermediate_size(hidden_size, intermediate_multiplier, multiple_of)
        ddd = torch.arange(hidden_size, dtype=torch.float32) / hidden_size
        self.time_maa_k = nn.Parameter(1.0 - ddd.pow(0.5))
        self.time_maa_r = nn.Parameter(1.0 - ddd.pow(0.5))
        self.key = nn.Linear(hidden_size, self.intermediate_size, bias=False)
        self.receptance = nn.Linear(hidden_size, hidden_size, bias=False)
        self.out_proj = nn.Linear(self.intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        delta = F.pad(x, (0, 0, 1, -1)) - x  # x_{t-1} - x_t within each sequence, zero before t=0; [B, T, D]
        k = torch.relu(self.key(x + delta * self.time_maa_k)).square()
        r = torch.sigmoid(self.receptance(x + delta * self.time_maa_r))
        return r * self.out_proj(k), {}

    def flops_per_token(self) -> float:
        dim, inner = self.hidden_size, self.intermediate_size
        return 2 * (2 * dim * inner + dim * dim) + 8 * dim + 2 * inner
