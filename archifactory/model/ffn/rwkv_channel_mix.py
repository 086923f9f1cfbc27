"""RWKV channel-mix: the RWKV FFN, a squared-ReLU MLP on token-shifted inputs with a sigmoid receptance."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from archifactory.core.registry import register_ffn
from archifactory.model.ffn.base import FeedForward, FFNAux, FFNState, intermediate_size
from archifactory.model.mixins.kit import token_shift
from archifactory.model.roles import InitRoles, own_parameters


@register_ffn("rwkv_cmix")
class RWKVChannelMix(FeedForward):
    """RWKV channel-mix (Peng et al., "RWKV: Reinventing RNNs for the Transformer Era", 2023; the RWKV-6
    form of "Eagle and Finch", 2024).

    With x' the previous token's input (token shift) and per-channel mixes μ_k, μ_r:
    k = relu(W_k lerp(x, x', μ_k))², r = sigmoid(W_r lerp(x, x', μ_r)), y = r ⊙ out_proj(k).
    Init: μ_k = μ_r = 1 - (i/D)^0.5 (RWKV-6's middle-layer ratio); projections follow the model's scheme.

    Not position-wise: the token shift reads the previous token, so decoding carries a state — the last
    input of the previous call ([B, D]) — through `init_state` / `forward_with_state`, and a full forward
    equals prefill + token-by-token decoding. A plain `forward` starts from a zero previous token.

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

    def init_roles(self) -> InitRoles:
        # the token-shift mixes are drawn above
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))

    def forward(self, x: Tensor) -> tuple[Tensor, FFNAux]:
        return self._mix(x, token_shift(x, None)), {}  # previous token, zero before t=0

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> FFNState:
        return {"shift": torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)}

    def state_size(self) -> int:
        return self.hidden_size

    def forward_with_state(self, x: Tensor, state: FFNState) -> tuple[Tensor, FFNAux, FFNState]:
        return self._mix(x, token_shift(x, state["shift"])), {}, {"shift": x[:, -1]}

    def _mix(self, x: Tensor, previous: Tensor) -> Tensor:
        delta = previous - x
        k = torch.relu(self.key(x + delta * self.time_maa_k)).square()
        r = torch.sigmoid(self.receptance(x + delta * self.time_maa_r))
        return r * self.out_proj(k)

    def flops_per_token(self) -> float:
        dim, inner = self.hidden_size, self.intermediate_size
        return 2 * (2 * dim * inner + dim * dim) + 8 * dim + 2 * inner
