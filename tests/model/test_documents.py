"""Document-aware packing: a packed window with the layout == each document run on its own, every mixin."""

from __future__ import annotations

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.model.build import build_model
from archifactory.model.documents import DocumentLayout
from tests.helpers import compose_config

EOS, VOCAB = 0, 37


def test_layout_by_hand() -> None:
    ids = torch.tensor([[5, 6, EOS, 7, 8, 9, EOS, 1], [EOS, 2, 3, 4, 5, EOS, 6, 7]])
    layout = DocumentLayout.from_ids(ids, EOS)
    assert (layout.num_documents, layout.length) == (6, 5)
    assert layout.offsets.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 0, 1]]
    x = torch.arange(16.0).view(2, 8, 1)
    rows = layout.unpack(x)[..., 0].tolist()
    assert rows == [
        [0, 1, 2, 0, 0],
        [3, 4, 5, 6, 0],
        [7, 0, 0, 0, 0],
        [8, 0, 0, 0, 0],
        [9, 10, 11, 12, 13],
        [14, 15, 0, 0, 0],
    ]
    assert torch.equal(layout.pack(layout.unpack(x), x), x)


def documents() -> list[torch.Tensor]:
    """Three documents ending in EOS, of lengths that cross small chunk sizes, and a cut-off fourth."""
    generator = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, VOCAB, (n,), generator=generator) for n in (6, 11, 4, 5)]
    return [torch.cat([d, torch.tensor([EOS])]) for d in docs[:3]] + [docs[3]]


def model_for(overrides: list[str]) -> torch.nn.Module:
    cfg = compose_config(
        ["model.hidden_size=32", "model.num_heads=4", "model.num_layers=2", "trainer.seq_len=64", *overrides]
    )
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def check_packed_equals_separate(model: torch.nn.Module) -> None:
    docs = documents()
    packed = torch.cat(docs)[None]  # [1, 29]: four documents in one window
    order = [2, 0, 1, 3]  # the same documents in another order (the cut-off one stays last): a second row
    second_row = torch.cat([docs[i] for i in order])[None]
    ids = torch.cat([packed, second_row])
    layout = DocumentLayout.from_ids(ids, EOS)
    masked = model(ids, documents=layout).logits
    alone = [model(doc[None]).logits[0] for doc in docs]
    torch.testing.assert_close(masked[0], torch.cat(alone), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(masked[1], torch.cat([alone[i] for i in order]), rtol=1e-7, atol=1e-9)
    unmasked = model(ids).logits  # without the layout, later documents see earlier ones: it differs
    first = len(docs[0])
    assert not torch.allclose(unmasked[0, first:], masked[0, first:], atol=1e-6)
    torch.testing.assert_close(unmasked[0, :first], masked[0, :first], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(components("mixin")))
def test_every_mixin_keeps_documents_apart(name: str) -> None:
    extra = {"mamba2": ["mixin.chunk_size=4", "mixin.head_dim=16"]}.get(name, [])
    small_chunks = ["mixin.chunk_size=4"] if "chunk_size" in compose_config([f"mixin={name}"]).mixin else []
    check_packed_equals_separate(model_for([f"mixin={name}", *small_chunks, *extra]))


@pytest.mark.parametrize("positional", ["learned", "sinusoidal", "alibi", "none"])
def test_positions_restart_at_each_document(positional: str) -> None:
    check_packed_equals_separate(model_for(["mixin=gqa", f"positional={positional}"]))


def test_token_shifted_ffn_and_hybrid_keep_documents_apart() -> None:
    check_packed_equals_separate(model_for(["mixin=rwkv7", "ffn=rwkv_cmix", "mixin.chunk_size=4"]))
    check_packed_equals_separate(
        model_for(["model.layer_pattern=[gated_deltanet,gqa]", "model.num_layers=2"])
    )


def test_decoding_with_documents_is_refused() -> None:
    model = model_for(["mixin=gqa"])
    ids = torch.tensor([[3, EOS, 4]])
    with pytest.raises(ArchiFactoryError, match="not to decoding"):
        model(ids, state=model.init_state(1), documents=DocumentLayout.from_ids(ids, EOS))
