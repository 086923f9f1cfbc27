"""A short causal depthwise convolution with an explicit decode buffer (the delta-rule mixers' q/k/v conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ShortConvolution(nn.Module):
    """Causal depthwise conv1d (kernel `kernel_size`, no bias) followed by SiLU, over x [B, T, C].

    The decode state is the last `kernel_size - 1` raw inputs [B, C, kernel_size - 1] (zeros at the
    start), so conv(prefill) then conv(token) … equals conv(whole sequence). Init: nn.Conv1d's default,
    U(-1/sqrt(k), 1/sqrt(k)), which the model's init scheme leaves alone (it is not a Linear)."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        bound = kernel_size**-0.5
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size).uniform_(-bound, bound))

    def forward(self, x: Tensor, buffer: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x [B, T, C] -> (SiLU(conv(x)) [B, T, C], the new buffer, or None when none was given)."""
        xt = x.transpose(1, 2)  # [B, C, T]
        width = self.kernel_size - 1
        past = xt.new_zeros(xt.shape[0], self.channels, width) if buffer is None else buffer.to(xt.dtype)
        full = torch.cat([past, xt], dim=2)  # [B, C, width + T]
        out = F.conv1d(full, self.weight.to(xt.dtype), groups=self.channels)  # [B, C, T]
        new_buffer = None if buffer is None else full[:, :, full.shape[2] - width :].to(buffer.dtype)
        return F.silu(out).transpose(1, 2), new_buffer

    def state_size(self) -> int:
        """Elements of one sequence's buffer."""
        return self.channels * (self.kernel_size - 1)
