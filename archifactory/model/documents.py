"""Document-aware packing: run every token mixer on each document of a packed window on its own.

A packed training window holds several EOS-separated documents. With `dataset.document_mask=true` the
model must not let one document see another: attention would attend across the boundary and a recurrent
state would carry over it. Instead of teaching every mixin a mask or a state reset, the model regroups
the tokens before each mixin: the window's documents become the rows of a right-padded batch [N, L, D]
(N documents, L the longest), the mixin runs on that batch, and the outputs go back to their packed
places. Because every mixin is causal, right padding never reaches a real token, so each document's
output is exactly what it would be alone — for every registered mixin (attention, linear, recurrent,
LSTM/RNN) and any FFN that reads earlier tokens (RWKV's channel mix), with no per-mixin code. The cost
is the padding (rows × longest document instead of the window) and two gathers per layer.

Positions restart at each document: rotary/ALiBi mixins see offsets within the document, and additive
position embeddings (learned, sinusoidal) are taken at those offsets too. A document starts at the first
token of a window and after every EOS; the EOS closes its document (the loss at the EOS, predicting the
next document's first token, is kept, as in unmasked packing).

The layout is computed from the input ids on the host, before the batch moves to the device, so the
forward never syncs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class DocumentLayout:
    """Where each token of a packed [B, T] batch sits in the per-document [N, L] batch, and back."""

    gather: Tensor  # [N·L] index into the packed tokens B·T; padding slots point at B·T (a zero row)
    scatter: Tensor  # [B·T] index of each packed token in the flattened per-document batch N·L
    offsets: Tensor  # [B, T] each token's position within its document
    num_documents: int
    length: int  # L, the longest document (a Python int: no host sync in forward)

    @classmethod
    def from_ids(cls, input_ids: Tensor, eos_id: int) -> DocumentLayout:
        """Split each row of input_ids [B, T] (on the host) after every EOS token."""
        ids = input_ids.cpu()
        batch, seq_len = ids.shape
        starts = torch.zeros_like(ids, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = ids[:, :-1] == eos_id  # a document starts after each EOS
        flat_starts = starts.flatten()
        doc_of_token = flat_starts.cumsum(0) - 1  # [B·T] document index of each packed token
        first = torch.nonzero(flat_starts).squeeze(1)  # [N] packed index of each document's first token
        positions = torch.arange(batch * seq_len)
        offsets = positions - first[doc_of_token]  # [B·T]
        num_documents = int(first.numel())
        length = int(offsets.max()) + 1
        gather = torch.full((num_documents * length,), batch * seq_len, dtype=torch.long)
        scatter = doc_of_token * length + offsets
        gather[scatter] = positions
        return cls(gather, scatter, offsets.view(batch, seq_len), num_documents, length)

    def to(self, device: torch.device) -> DocumentLayout:
        move = {"non_blocking": True}
        return DocumentLayout(
            self.gather.to(device, **move),
            self.scatter.to(device, **move),
            self.offsets.to(device, **move),
            self.num_documents,
            self.length,
        )

    def unpack(self, x: Tensor) -> Tensor:
        """Packed x [B, T, D] -> per-document [N, L, D], zero padded on the right."""
        flat = x.reshape(-1, x.shape[-1])
        padded = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])  # the padding slots read row B·T
        return padded.index_select(0, self.gather).view(self.num_documents, self.length, -1)

    def pack(self, y: Tensor, like: Tensor) -> Tensor:
        """Per-document y [N, L, D] -> packed [B, T, D] shaped like `like`."""
        return y.reshape(-1, y.shape[-1]).index_select(0, self.scatter).view(like.shape[:-1] + (-1,))


def documents_for(input_ids: Tensor, eos_id: int | None, device: torch.device) -> DocumentLayout | None:
    """The layout of a host batch, moved to `device`; None when documents may see each other (eos_id None)."""
    if eos_id is None:
        return None
    return DocumentLayout.from_ids(input_ids, eos_id).to(device)
