"""HGRN: the hierarchically gated recurrent network's element-wise gated linear recurrence.

Pads of a padded batch (`ctx.pad_mask`) are identity steps: zero input and log-forget-gate 0 (f = 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_mixin
from archifactory.model.mixins.base import Mixin, MixinState, check_backend, projection_flops
from archifactory.model.mixins.kit import fla_backend, head_rms_norm, zero_pads
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.hgrn import FUSED_KERNEL, diagonal_scan
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, own_parameters


@register_mixin("hgrn")
class HGRN(Mixin):
    """HGRN (Qin et al., "Hierarchically Gated Recurrent Neural Network for Sequence Modeling", NeurIPS
    2023), in the real-valued form of fla's `HGRNAttention`.

    Per channel, with forget gate f_t = lb + (1 − lb) · sigmoid(f_proj x_t) (lb = `lower_bound`) and the
    input gate tied to it:
        h_t = f_t ⊙ h_{t-1} + (1 − f_t) ⊙ SiLU(i_proj x_t)
    — an element-wise linear recurrence, scanned in chunks (`reference/hgrn.py`) or by fla's `chunk_hgrn`.
    Output: RMSNorm over the width times SiLU(g_proj x_t) (fla's FusedRMSNormGated), then out_proj.
    Positional schemes are ignored (order lives in the recurrence). Decode state: h [B, hidden·expand_ratio].
    The paper's lower bound grows with depth and is learned at the model level; here it is a fixed
    per-layer option (0 = none), as for `hgrn2`.

    Options:
        expand_ratio: recurrence width / hidden size; lower_bound: forget-gate floor in [0, 1);
        norm_eps; chunk_size: chunk length of the reference scan;
        backend: `auto` (fla's `chunk_hgrn` on CUDA), `reference` or `fused`.
    """

    def __init__(
        self,
        hidden_size: int,
        layer_idx: int,
        *,
        expand_ratio: int = 1,
        lower_bound: float = 0.0,
        norm_eps: float = 1e-5,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__(hidden_size, layer_idx)
        if expand_ratio < 1 or chunk_size < 1 or not 0.0 <= lower_bound < 1.0:
            raise ArchiFactoryError(
                f"mixin=hgrn: need expand_ratio >= 1, chunk_size >= 1 and 0 <= lower_bound < 1, got "
                f"{expand_ratio}, {chunk_size}, {lower_bound}"
            )
        self.backend = check_backend(backend, "mixin=hgrn")  # availability is checked per call
        self.input_dim = hidden_size * expand_ratio
        self.lower_bound, self.norm_eps, self.chunk_size = lower_bound, norm_eps, chunk_size
        # i, f and g in one matmul (the parameters of fla's i_proj, f_proj and g_proj)
        self.ifg_proj = nn.Linear(hidden_size, 3 * self.input_dim, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.input_dim))
        self.out_proj = nn.Linear(self.input_dim, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        # the output-norm gain is drawn in the constructor
        return InitRoles(residual=(self.out_proj,), keep=own_parameters(self))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        return {
            "recurrent": torch.zeros(batch_size, self.input_dim, device=device, dtype=compute_dtype(dtype))
        }

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(the recurrence input (1 − f)·SiLU(i), log f, the output gate's pre-activation), each
        [B, T, input_dim]; the first two in the compute dtype."""
        i, f, gate = self.ifg_proj(x).split(self.input_dim, dim=-1)
        g = F.logsigmoid(f.to(compute_dtype(x.dtype)))  # log f_t without the bound
        if self.lower_bound > 0:  # log(lb + (1 − lb) f), computed in log space
            g = torch.logaddexp(
                torch.full_like(g, math.log(self.lower_bound)), math.log1p(-self.lower_bound) + g
            )
        return F.silu(i.to(g.dtype)) * -torch.expm1(g), g, gate

    def forward(
        self, x: Tensor, ctx: PositionContext, state: MixinState | None = None
    ) -> tuple[Tensor, MixinState | None]:
        inputs, g, gate = self.gates(x)
        inputs, g = zero_pads(inputs, ctx), zero_pads(g, ctx)  # pads: h_t = h_{t-1}
        past = None if state is None else state["recurrent"]
        h, new_state = diagonal_scan(inputs, g, past, self.backend_name(), self.chunk_size)
        y = head_rms_norm(h[..., None, :], self.norm_weight, self.norm_eps, gate)  # one group: all of it
        return self.out_proj(y.to(x.dtype)), None if state is None else {"recurrent": new_state}

    def backend_name(self) -> str:
        return fla_backend(self.backend, self.out_proj.weight, FUSED_KERNEL, "mixin=hgrn")

    def flops_per_token(self, seq_len: int) -> float:
        # the scan (decay multiply + add), the tied input gate and the gated norm: a few per channel
        return projection_flops(self) + 8 * self.input_dim

    def state_size(self, seq_len: int) -> int:
        return self.input_dim
