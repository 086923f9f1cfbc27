"""StackedMixinForCausalLM: loss, freezing, tying, accounting, chunked CE, checkpointing, decoding."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archifactory.core.registry import components
from archifactory.model.build import build_model
from archifactory.model.ffn.swiglu import SwiGLU
from archifactory.model.loss import lm_cross_entropy
from archifactory.model.mixins.attention import GroupedQueryAttention
from archifactory.model.positional import RotaryPositional
from archifactory.model.stack import StackedMixinForCausalLM
from tests.helpers import compose_config

V, D = 50, 32


def make(**kwargs) -> StackedMixinForCausalLM:
    return StackedMixinForCausalLM(
        num_layers=2,
        hidden_size=D,
        vocab_size=V,
        mixin_module=functools.partial(GroupedQueryAttention, hidden_size=D, num_heads=4, num_kv_heads=2),
        ffn_module=functools.partial(SwiGLU, hidden_size=D),
        positional_module=RotaryPositional(D, 64),
        **kwargs,
    )


def test_loss_ignores_padding_targets() -> None:
    model = make()
    ids = torch.randint(0, V, (2, 12))
    targets = ids.roll(-1, 1)
    targets[:, 8:] = -100
    out = model(ids, targets=targets)
    expected = F.cross_entropy(out.logits[:, :8].reshape(-1, V), targets[:, :8].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_chunked_cross_entropy_equals_full() -> None:
    hidden = torch.randn(37, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    targets = torch.randint(0, V, (37,))
    targets[5] = -100
    full = lm_cross_entropy(hidden, weight, targets, chunk_size=0)
    grads_full = torch.autograd.grad(full, (hidden, weight))
    chunked = lm_cross_entropy(hidden, weight, targets, chunk_size=8)
    grads_chunked = torch.autograd.grad(chunked, (hidden, weight))
    torch.testing.assert_close(chunked, full)
    for a, b in zip(grads_chunked, grads_full):
        torch.testing.assert_close(a, b)


def test_freeze_only_passed_in_modules() -> None:
    pretrained_embedding = nn.Embedding(V, D)  # N(0, 1): far from the init scheme's N(0, 0.02^2)
    pretrained = pretrained_embedding.weight.detach().clone()  # a copy: the model holds the same object
    model = make(embedding_module=pretrained_embedding, freeze_lm_modules=True)
    assert model.embedding is pretrained_embedding
    assert not model.embedding.weight.requires_grad
    assert model.lm_head.weight.requires_grad, "a fresh head is never frozen"
    assert model.final_norm.weight.requires_grad
    assert torch.equal(model.embedding.weight, pretrained), "passed-in weights are not re-initialised"


def test_tied_embeddings_share_one_matrix() -> None:
    model = make(tie_embeddings=True)
    assert model.lm_head is None
    breakdown = model.parameter_breakdown()
    assert breakdown["head"] == 0 and breakdown["total"] == sum(p.numel() for p in model.parameters())
    captured = {}
    model.final_norm.register_forward_hook(lambda module, args, output: captured.update(hidden=output))
    out = model(torch.randint(0, V, (1, 5)))
    torch.testing.assert_close(out.logits, captured["hidden"] @ model.embedding.weight.t())


def test_parameter_breakdown_adds_up() -> None:
    model = make()
    b = model.parameter_breakdown()
    assert b["total"] == sum(p.numel() for p in model.parameters())
    assert b["embedding"] == b["head"] == V * D
    assert b["non_embedding"] == b["mixin"] + b["ffn"] + b["norms"]
    assert b["active"] == b["total"]


def test_flops_per_token_counts_head_and_grows_with_context() -> None:
    model = make()
    assert model.flops_per_token(128) > model.flops_per_token(16) > 2 * V * D


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    model = make()
    ids = torch.randint(0, V, (2, 10))
    model(ids, targets=ids.roll(-1, 1)).loss.backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for block in model.blocks:
        block.activation_checkpointing = True
    model(ids, targets=ids.roll(-1, 1)).loss.backward()
    for a, b in zip(plain, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("positional", ["none", "learned", "sinusoidal", "rope", "alibi"])
def test_model_forward_equals_prefill_plus_decode(positional: str) -> None:
    cfg = compose_config(
        [f"positional={positional}", "model.hidden_size=32", "model.num_layers=2", "trainer.seq_len=32"]
    )
    model = build_model(cfg, vocab_size=V).double()
    ids = torch.randint(0, V, (2, 11))
    full = model(ids).logits
    state = model.init_state(2)
    out = model(ids[:, :4], state=state)
    pieces = [out.logits]
    for t in range(4, 11):
        out = model(ids[:, t : t + 1], state=out.state)
        pieces.append(out.logits)
    assert out.state.position == 11
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_init_scheme_scales_residual_projections() -> None:
    model = StackedMixinForCausalLM(
        num_layers=8,
        hidden_size=256,
        vocab_size=V,
        mixin_module=functools.partial(GroupedQueryAttention, hidden_size=256, num_heads=4),
        ffn_module=functools.partial(SwiGLU, hidden_size=256),
        initializer_range=0.02,
    )
    block = model.blocks[0]
    assert block.mixin.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mixin.out_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.equal(block.mixin_norm.weight, torch.ones(256))


@pytest.mark.parametrize("ffn", sorted(components("ffn")))
def test_model_decode_with_every_ffn(ffn: str) -> None:
    """Stateful FFNs (token-shift channel-mix) carry their state; position-wise ones need none."""
    cfg = compose_config([f"ffn={ffn}", "model.hidden_size=64", "model.num_layers=2", "trainer.seq_len=32"])
    model = build_model(cfg, vocab_size=V).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, V, (2, 9))
    full = model(ids).logits
    out = model(ids[:, :3], state=model.init_state(2))
    pieces = [out.logits]
    for t in range(3, 9):
        out = model(ids[:, t : t + 1], state=out.state)
        pieces.append(out.logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)
    state_elements = sum(
        t[0].numel() for layer in out.state.layers for t in (*layer.mixin.values(), *layer.ffn.values())
    )
    assert state_elements == model.decode_state_size(9)


def test_init_scheme_reaches_stacked_expert_weights() -> None:
    cfg = compose_config(["ffn=moe", "model.hidden_size=256", "model.num_layers=8", "ffn.dispatch=loop"])
    model = build_model(cfg, vocab_size=V)
    moe = model.blocks[0].ffn
    assert moe.w_in.std().item() == pytest.approx(0.02, rel=0.05)
    assert moe.w_out.std().item() == pytest.approx(0.02 / 4, rel=0.05)
