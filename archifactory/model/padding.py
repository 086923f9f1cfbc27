"""Padded batches: turn a transformers-style `attention_mask` into what the blocks need.

A batch of sequences of different lengths is padded to one width: on the left for generation (every row's
last token is real, so the next token is predicted for all rows at once), on the right for scoring.
The model takes `attention_mask` [B, T] (1 = token, 0 = pad) and hands every mixin, through its
`PositionContext`:
- `pad_mask` [B, T] bool (True = real token), None when the mask is all ones, so an unpadded batch keeps
  the fast path and the compiled graph of a call without a mask;
- `lead` [B]: the left pads of each row. Positions count real tokens only (position = index - lead), so a
  left-padded row gets the learned / sinusoidal / rotary positions of the row run alone; attention masks
  the pad keys; recurrent mixins make every pad an identity step (the kit's `zero_pads` / `fill_pads`).

Decoding: `DecodeState.lead` keeps the prefill's pad counts, so later steps need no mask (a
transformers-style mask covering the past is accepted too; only its last T columns are read). Refused,
in one line: a mask with a hole (0 between 1s: a short convolution or token shift would see the hole),
right padding in a call with a decode state, and pad tokens in a decode step after the prefill.

Reading the mask (all ones? contiguous?) is a host sync: a padded call is an inference-time call
(generation, scoring); training never passes a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from archifactory.core.errors import ArchiFactoryError


@dataclass
class Padding:
    """This call's pad mask ([B, T] bool, None: no pads) and each row's left pads ([B], None: none ever)."""

    pad_mask: Tensor | None
    lead: Tensor | None


def padding(
    attention_mask: Tensor | None, shape: tuple[int, ...], start: int, lead: Tensor | None, decoding: bool
) -> Padding:
    """Check `attention_mask` for a call of `shape` [B, T] starting at position `start` and return its
    `Padding`; `lead` is what the decode state remembers from the prefill, `decoding` whether the call
    carries a decode state."""
    if attention_mask is None:
        return Padding(None, lead)
    batch, length = shape
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ArchiFactoryError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; expected [{batch}, {length}] "
            f"(or [{batch}, {start + length}] covering the cached tokens too)"
        )
    mask = attention_mask[:, -length:].bool()  # [B, T]
    if bool(mask.all()):
        return Padding(None, lead)
    rises = mask[:, 0].long() + (mask[:, 1:] & ~mask[:, :-1]).sum(1)  # runs of real tokens per row
    if bool((rises > 1).any()):
        raise ArchiFactoryError(
            "attention_mask has a hole (a 0 between 1s in a row); pad each row on the left or the right only"
        )
    if decoding and start > 0:
        raise ArchiFactoryError(
            f"attention_mask has pad tokens in a decode step (position {start}); only the first call "
            "(the prefill) may be padded, on the left"
        )
    if decoding and not bool(mask[:, -1].all()):
        raise ArchiFactoryError(
            "attention_mask is right-padded (or a row is empty) in a call with a decode state; "
            "pad prompts on the left for generation (tokenizer.padding_side='left')"
        )
    return Padding(mask, (mask.long().cumsum(1) == 0).sum(1))  # lead: the zeros before the first 1
