"""Padded batches (issue 23): each row of a left-padded batch equals the row run alone.

For every covered mixin (and every positional scheme, a hybrid, and RWKV's token-shift FFN): the logits
of a left-padded batch (pads 0..7 per row, lengths crossing a chunk boundary) at the real tokens, the
decode state after the padded prefill and the logits of a few decode steps without a mask, and the
gradients w.r.t. the real tokens' embeddings and the parameters all equal those of each row alone; pad
tokens get exactly zero gradient from the real outputs. Right padding (scoring) and the one-line refusals
are checked too. Weights are perturbed away from their init so no equality holds vacuously.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import components
from archifactory.model.build import build_model
from archifactory.model.stack import DecodeState, StackedMixinForCausalLM
from tests.helpers import compose_config

VOCAB = 53
LENGTHS = (31, 30, 27, 24, 29)  # pads 0, 1, 4, 7, 2; chunked mixins use chunk 16, so rows cross a boundary
# every registered mixin, through the whole model (positions, FFN, decode); chunked mixins use chunk 16
COVERED = sorted(components("mixin"))
OPTIONS = {
    name: ["mixin.chunk_size=16"]
    for name in COVERED
    if "chunk_size" in inspect.signature(components("mixin")[name]).parameters
} | {
    "swa": ["mixin.window=8"],
    "nsa": ["mixin.block_size=4", "mixin.block_counts=4", "mixin.window=8"],
    "moba": ["mixin.block_size=4"],
}
HYBRID = [
    "mixin=path_attn",
    "mixin.chunk_size=16",
    "model.num_layers=3",
    "model.layer_pattern=[path_attn,{name:swa,window:8},mla]",
]
ATOL = 1e-5


def tiny_model(*overrides: str) -> StackedMixinForCausalLM:
    cfg = compose_config(
        [
            "model.hidden_size=32",
            "model.num_heads=4",
            "model.num_layers=2",
            "model.max_seq_len=64",
            *overrides,
        ]
    )
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB).double()  # fp64: row-vs-batch reduction order stays far below ATOL
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] with random pad tokens on the left, and the mask (1 = token)."""
    width = max(len(r) for r in rows)
    ids = torch.randint(0, VOCAB, (len(rows), width))
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row) :] = row
        mask[b, width - len(row) :] = 1
    return ids, mask


def embedding_grads(model: StackedMixinForCausalLM, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `run()` (returns a scalar), backprop; the gradient at the embedding output and per parameter."""
    captured = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        captured["out"] = output

    handle = model.embedding.register_forward_hook(keep)
    model.zero_grad()
    run().backward()
    handle.remove()
    return captured["out"].grad, {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


def assert_state_rows(padded: DecodeState, alone: DecodeState, row: int, pads: int) -> None:
    """The padded batch's state of `row` equals the row's own; a cache that grows with the sequence holds
    `pads` extra (pad) entries first along its time axis, which the real entries follow."""
    for layer_p, layer_a in zip(padded.layers, alone.layers):
        for part_p, part_a in ((layer_p.mixin, layer_a.mixin), (layer_p.ffn, layer_a.ffn)):
            assert part_p.keys() == part_a.keys()
            for name, tensor in part_p.items():
                mine, theirs = tensor[row : row + 1], part_a[name]
                if mine.shape != theirs.shape:
                    (dim,) = [d for d in range(mine.dim()) if mine.shape[d] != theirs.shape[d]]
                    assert mine.shape[dim] - theirs.shape[dim] == pads, name
                    mine = mine.narrow(dim, pads, theirs.shape[dim])
                torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=ATOL, msg=name)


def check_padded_equals_alone(model: StackedMixinForCausalLM) -> None:
    torch.manual_seed(1)
    rows = [torch.randint(0, VOCAB, (n,)) for n in LENGTHS]
    ids, mask = left_padded(rows)
    width = ids.shape[1]
    weights = torch.randn(
        width, VOCAB, dtype=torch.float64
    )  # a loss that weighs every real position's logits

    def padded_loss():
        logits = model(ids, attention_mask=mask).logits
        return sum((logits[b, width - len(r) :] * weights[-len(r) :]).sum() for b, r in enumerate(rows))

    grad_padded, params_padded = embedding_grads(model, padded_loss)
    params_alone: dict[str, torch.Tensor] = {}
    steps = torch.randint(0, VOCAB, (len(rows), 3))
    state = model.init_state(len(rows))
    with torch.no_grad():
        out = model(ids, state=state, attention_mask=mask)
        decoded = [out.logits[:, -1]]
        state = out.state
        for t in range(steps.shape[1]):
            out = model(steps[:, t : t + 1], state=state)
            decoded.append(out.logits[:, -1])
            state = out.state
        prefill_state = model(ids, state=model.init_state(len(rows)), attention_mask=mask).state
    for b, row in enumerate(rows):
        pads = width - len(row)
        grad_alone, params = embedding_grads(
            model, lambda row=row: (model(row[None]).logits[0] * weights[-len(row) :]).sum()
        )
        for name, g in params.items():
            params_alone[name] = params_alone.get(name, 0) + g
        torch.testing.assert_close(grad_padded[b, pads:], grad_alone[0], atol=ATOL, rtol=ATOL)
        assert (grad_padded[b, :pads] == 0).all(), "a pad token got gradient from the real outputs"
        with torch.no_grad():
            logits = model(row[None]).logits[0]
            torch.testing.assert_close(
                model(ids, attention_mask=mask).logits[b, pads:], logits, atol=ATOL, rtol=ATOL
            )
            alone = model(row[None], state=model.init_state(1))
            assert_state_rows(prefill_state, alone.state, b, pads)
            row_state = alone.state
            torch.testing.assert_close(decoded[0][b], alone.logits[0, -1], atol=ATOL, rtol=ATOL)
            for t in range(steps.shape[1]):
                step = model(steps[b : b + 1, t : t + 1], state=row_state)
                row_state = step.state
                torch.testing.assert_close(decoded[t + 1][b], step.logits[0, -1], atol=ATOL, rtol=ATOL)
    for name, grad in params_padded.items():
        torch.testing.assert_close(grad, params_alone[name], atol=ATOL, rtol=ATOL, msg=name)


@pytest.mark.parametrize("name", COVERED)
def test_left_padded_rows_equal_each_row_alone(name: str) -> None:
    check_padded_equals_alone(tiny_model(f"mixin={name}", *OPTIONS.get(name, [])))


SCHEMES = ("none", "learned", "sinusoidal", "rope", "alibi")
# every scheme with gqa and mla (its own decoupled rope); swa's and fox's bias / additive paths
POSITIONAL_CASES = [(n, s) for n in ("gqa", "mla") for s in SCHEMES] + [
    ("swa", "alibi"), ("swa", "learned"), ("fox", "alibi"), ("fox", "sinusoidal"),
]  # fmt: skip


@pytest.mark.parametrize("name, scheme", POSITIONAL_CASES)
def test_every_positional_scheme_counts_real_tokens_only(name: str, scheme: str) -> None:
    check_padded_equals_alone(tiny_model(f"mixin={name}", f"positional={scheme}", *OPTIONS.get(name, [])))


def test_hybrid_pattern() -> None:
    check_padded_equals_alone(tiny_model(*HYBRID))


@pytest.mark.parametrize("name", ["gqa", "gated_deltanet", "rwkv7"])
def test_value_residual_keeps_pads_out(name: str) -> None:
    """model.value_residual mixes the first layer's values (pads included) into later layers' values."""
    check_padded_equals_alone(
        tiny_model(f"mixin={name}", "model.value_residual=true", *OPTIONS.get(name, []))
    )


def test_rwkv_channel_mix_token_shift_skips_pads() -> None:
    check_padded_equals_alone(tiny_model("mixin=gqa", "ffn=rwkv_cmix", "positional=learned"))


def test_unpadded_mask_keeps_the_fast_path_and_right_padding_scores_exactly() -> None:
    model = tiny_model("mixin=swa", "mixin.window=8", "ffn=rwkv_cmix")
    ids = torch.randint(0, VOCAB, (2, 21))
    with torch.no_grad():
        plain = model(ids).logits
        ones = model(ids, attention_mask=torch.ones_like(ids)).logits
        assert torch.equal(plain, ones)  # an all-ones mask is no mask at all
        mask = torch.ones_like(ids)
        mask[1, 13:] = 0  # right padding: row 1 holds 13 tokens
        right = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(right[1, :13], model(ids[1:, :13]).logits[0], atol=ATOL, rtol=ATOL)
        assert torch.isfinite(right).all()
        all_pads = torch.zeros_like(ids)
        all_pads[0] = 1
        assert torch.isfinite(model(ids, attention_mask=all_pads).logits).all()  # a row of pads only


@pytest.mark.parametrize(
    "case, message",
    [
        ("hole", "has a hole"),
        ("right_decode", "right-padded"),
        ("pads_after_prefill", "only the first call"),
        ("shape", "expected [2, 6]"),
        ("documents", "cannot be combined with document masking"),
    ],
)
def test_one_line_refusals(case: str, message: str) -> None:
    model = tiny_model("mixin=gqa")
    ids = torch.randint(0, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    kwargs: dict = {}
    if case == "hole":
        mask[0, 2] = 0
    elif case == "right_decode":
        mask[0, -1] = 0
        kwargs["state"] = model.init_state(2)
    elif case == "pads_after_prefill":
        kwargs["state"] = model(ids, state=model.init_state(2)).state
        mask[0, 0] = 0
    elif case == "shape":
        mask = mask[:, :3]
    elif case == "documents":
        from archifactory.model.documents import DocumentLayout

        kwargs["documents"] = DocumentLayout.from_ids(ids, eos_id=0)
    with pytest.raises(ArchiFactoryError, match=message.replace("[", r"\[")) as error:
        model(ids, attention_mask=mask, **kwargs)
    assert "\n" not in str(error.value)
