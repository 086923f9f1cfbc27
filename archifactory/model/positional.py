"""Positional schemes: none | learned | sinusoidal | rope | alibi.

A scheme acts at up to three places, each a no-op by default:
- `embed(x, positions)`: additive position embeddings on the token embeddings (learned, sinusoidal);
- `rotate(x, positions)`: rotary rotation of queries and keys inside attention (rope);
- `attention_bias(num_heads, q_positions, k_positions)`: an additive attention bias (alibi).

The model owns the position counter and hands every mixin a `PositionContext`; attention-style mixins
call `rotate` / `attention_bias`, recurrent mixins carry order in their state and ignore it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import register_positional


class PositionalScheme(nn.Module):
    """Base scheme: no position information at all (NoPE)."""

    def __init__(self, hidden_size: int, max_seq_len: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.max_seq_len = max_seq_len

    def check_length(self, end: int) -> None:
        """Refuse positions up to `end` (exclusive) the scheme cannot represent. Called by the model with
        Python ints before the forward, so the hot path never reads a position back from the device."""

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x

    def rotation_tables(
        self, positions: Tensor, dim: int, device: torch.device
    ) -> tuple[Tensor, Tensor] | None:
        return None

    def rotate(self, x: Tensor, positions: Tensor, tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
        return x

    def attention_bias(self, num_heads: int, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        return None


@dataclass
class PositionContext:
    """What a mixin gets to know about positions: the scheme and where this call's tokens sit.

    `start` and `length` are Python ints, never tensors read back to the host: under torch.compile a
    `tensor.item()` or a tensor-valued `torch.arange` bound is a graph break and a host sync per layer.
    One context is made per model forward and shared by every layer, so the position tensor and the
    rotary tables are computed once per head size and reused (`_cache`, never kept across calls).
    """

    scheme: PositionalScheme
    start: int  # absolute position of the first token of this call (the model's decode counter)
    length: int  # tokens in this call
    device: torch.device | None = None
    # [B, T] bool, True at this call's real tokens and False at padding (`attention_mask == 0`); None when
    # the batch has no padding. Mixins never read it directly: the kit's `zero_pads` / `fill_pads` turn
    # it into identity steps of a recurrence, attention turns it into a key mask (`key_mask`).
    pad_mask: Tensor | None = None
    # [B] long: the left pads before each row's first real token, counted from the sequence start (a
    # prefill's pads stay counted in every later decode step); None when no row was ever left-padded.
    # A row's positions count its real tokens only: position = absolute index - lead.
    lead: Tensor | None = None
    # model.value_residual (model/value_residual.py): the first value-declaring layer's values [B, T, W] of
    # this call, stored by that layer and mixed in by the later ones; per call, never kept across calls
    first_values: Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def absolute(self) -> Tensor:
        """[T] absolute indices of this call's tokens in the (padded) sequence."""
        if "absolute" not in self._cache:
            self._cache["absolute"] = torch.arange(self.start, self.start + self.length, device=self.device)
        return self._cache["absolute"]

    @property
    def positions(self) -> Tensor:
        """Positions of this call's tokens: [T] without left padding, else [B, T] per row (absolute index
        minus the row's left pads, 0 at the pads themselves), so a left-padded row's learned, sinusoidal
        and rotary positions equal those of the row run alone."""
        if self.lead is None:
            return self.absolute
        if "positions" not in self._cache:
            self._cache["positions"] = (self.absolute[None, :] - self.lead[:, None]).clamp(min=0)
        return self._cache["positions"]

    def key_positions(self, past: int) -> Tensor:
        """[past + T] absolute indices of the keys: `past` cached tokens, then this call's."""
        return torch.arange(self.start - past, self.start + self.length, device=self.device)

    def key_mask(self, past: int) -> Tensor | None:
        """[B, past + T] bool, True at the keys a query may attend (real tokens): the `past` cached keys
        are real from each row's `lead` on, this call's where `pad_mask` says so. None without padding."""
        if self.lead is None and self.pad_mask is None:
            return None
        if self.lead is None:
            return F.pad(self.pad_mask, (past, 0), value=True)
        real = self.key_positions(past)[None, :] >= self.lead[:, None]  # [B, past + T]
        return real if self.pad_mask is None else real & F.pad(self.pad_mask, (past, 0), value=True)

    def rotate(self, x: Tensor) -> Tensor:
        """Rotate x [B, T, H, D] by this call's (per-row, when left-padded) positions (rope); identity for
        other schemes."""
        key = (x.shape[-1], x.device)
        if key not in self._cache:
            self._cache[key] = self.scheme.rotation_tables(self.positions, x.shape[-1], x.device)
        return self.scheme.rotate(x, self.positions, self._cache[key])

    def attention_bias(self, num_heads: int, past: int) -> Tensor | None:
        """Additive bias [H, T, past + T] for this call's queries over `past` cached keys and its own (alibi).
        Taken at absolute indices even in a left-padded batch: ALiBi depends on the query-key distance
        only, which padding does not change between real tokens (pads are masked), so it stays exact."""
        return self.scheme.attention_bias(num_heads, self.absolute, self.key_positions(past))


@register_positional("none")
class NoPositional(PositionalScheme):
    """No positional information (NoPE; Kazemnejad et al., "The Impact of Positional Encoding on Length
    Generalization in Transformers", 2023). Causal attention still infers order."""


@register_positional("learned")
class LearnedPositional(PositionalScheme):
    """Learned absolute position embeddings added to the token embeddings (GPT-2, Radford et al. 2019).

    Options: none beyond `max_seq_len` (the table size; longer inputs are refused).
    """

    def __init__(self, hidden_size: int, max_seq_len: int) -> None:
        super().__init__(hidden_size, max_seq_len)
        self.weight = nn.Embedding(max_seq_len, hidden_size)

    def check_length(self, end: int) -> None:
        if end > self.max_seq_len:
            raise ArchiFactoryError(
                f"position {end - 1} is beyond positional=learned's table of {self.max_seq_len}; "
                "raise model.max_seq_len or use positional=rope"
            )

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + self.weight(positions).to(x.dtype)


@register_positional("sinusoidal")
class SinusoidalPositional(PositionalScheme):
    """Fixed sinusoidal position embeddings added to the token embeddings (Vaswani et al., 2017).

    Options: `base` (the wavelength base, 10000 in the paper).
    """

    def __init__(self, hidden_size: int, max_seq_len: int, base: float = 10000.0) -> None:
        super().__init__(hidden_size, max_seq_len)
        self.base = base

    def embed(self, x: Tensor, positions: Tensor) -> Tensor:
        half = self.hidden_size // 2
        freqs = torch.exp(
            -math.log(self.base) * torch.arange(half, device=x.device, dtype=torch.float32) / half
        )
        angles = positions.to(torch.float32)[..., None] * freqs  # [(B,) T, D/2]
        table = torch.zeros(*positions.shape, self.hidden_size, device=x.device, dtype=torch.float32)
        table[..., 0 : 2 * half : 2] = torch.sin(angles)
        table[..., 1 : 2 * half : 2] = torch.cos(angles)
        return x + table.to(x.dtype)


@register_positional("rope")
class RotaryPositional(PositionalScheme):
    """Rotary position embedding (Su et al., "RoFormer", 2021), rotate-half convention (GPT-NeoX/Llama).

    Queries and keys are rotated by position-dependent angles so that q·k depends on the offset only.
    Options: `theta` (the frequency base, 10000 in the paper, 500000 in Llama 3).
    """

    def __init__(self, hidden_size: int, max_seq_len: int, theta: float = 10000.0) -> None:
        super().__init__(hidden_size, max_seq_len)
        self.theta = theta

    def rotation_tables(self, positions: Tensor, dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin in fp32 for the rotate-half layout: [1, T, 1, dim] for positions [T], [B, T, 1, dim]
        for per-row positions [B, T]."""
        if dim % 2:
            raise ArchiFactoryError(f"rope needs an even head dimension, got {dim}; change the head size")
        inv_freq = self.theta ** (-torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim)
        angles = positions.to(device, torch.float32)[..., None] * inv_freq  # [(B,) T, D/2]
        angles = torch.cat([angles, angles], dim=-1)  # [(B,) T, D]
        angles = angles.reshape(-1, positions.shape[-1], 1, dim)  # [1 or B, T, 1, D]
        return angles.cos(), angles.sin()

    def rotate(self, x: Tensor, positions: Tensor, tables: tuple[Tensor, Tensor] | None = None) -> Tensor:
        cos, sin = tables if tables is not None else self.rotation_tables(positions, x.shape[-1], x.device)
        x1, x2 = x.chunk(2, dim=-1)
        rotated_half = torch.cat([-x2, x1], dim=-1)
        if x.dtype == torch.float64:
            return x * cos.double() + rotated_half * sin.double()
        return (x.float() * cos + rotated_half.float() * sin).to(x.dtype)


def alibi_slopes(num_heads: int) -> Tensor:
    """Head slopes of ALiBi: a geometric sequence 2^(-8/n), interleaved for non-powers of two."""

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return torch.tensor(power_of_two_slopes(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = power_of_two_slopes(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(power_of_two_slopes(closest) + extra)


@register_positional("alibi")
class AlibiPositional(PositionalScheme):
    """Attention with Linear Biases (Press et al., "Train Short, Test Long", 2022).

    Adds -slope_h * (i - j) to the attention logit of query i and key j; no embeddings at all.
    """

    def attention_bias(self, num_heads: int, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        slopes = alibi_slopes(num_heads).to(q_positions.device)  # [H]
        distance = (q_positions[:, None] - k_positions[None, :]).clamp(min=0).to(torch.float32)  # [Tq, Tk]
        return -slopes[:, None, None] * distance[None, :, :]  # [H, Tq, Tk]
