"""Padded batches through the recurrent and linear mixins (issue 23): a pad is an identity step.

Parametrized over every registered mixin outside the attention family, so a newly registered recurrent
mixin is covered with no edit here (and fails until it handles `ctx.pad_mask`). Each mixin is built from
its own YAML at hidden 64 / 4 heads with chunk sizes of 4 (the real lengths, 8..15, cross several chunk
boundaries), its parameters perturbed away from their init, in fp64. A batch of 8 rows with 0..7 pads:
- left padding: each row's real outputs, its final decode state (forward with `state=init_state`, and
  from a warm state: see `start_state`), the next decoded token from that state, and the gradients
  w.r.t. its real inputs and the parameters equal the row run alone; the gradient of the real outputs
  w.r.t. every pad input is exactly 0;
- right padding: the real outputs equal the row alone (causality).
On CUDA (`gpu` marker) the same left-padding check runs on the fused path of each mixin that has one.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from archifactory.core.registry import components
from archifactory.model.components import build_positional, component_factory
from archifactory.model.positional import PositionContext
from tests.helpers import compose_config

HIDDEN, T, ROWS = 64, 15, 8  # row b: b pads and T - b real tokens (15, 14, ..., 8)
# the attention family masks keys instead (tested with the model plumbing); every other mixin is recurrent
ATTENTION = {
    "gqa",
    "swa",
    "mla",
    "fox",
    "path_attn",
    "stickbreaking_attn",
    "nsa",
    "moba",
    "deltaformer",
    "parallax",
    "wall_attn",
    "bitattn",
}
RECURRENT = sorted(set(components("mixin")) - ATTENTION)
TOKEN_BUFFERS = {"conv", "shift"}  # state entries holding past inputs (short conv, token shift)
SMALL_CHUNKS = {"chunk_size": 4, "sub_chunk_size": 2}  # where the mixin has the option
# options off by default that change the padded path: also run them
GVA = ("mixin.num_v_heads=8", "mixin.head_dim=12")  # grouped value heads, a key head size of its own
VARIANTS = [
    ("gla", ("mixin.use_short_conv=true",)),
    ("lstm", ("mixin.rnn_layers=2",)),
    ("deltanet", GVA),
    ("gated_deltanet", GVA),
]
CASES = [(name, ()) for name in RECURRENT] + VARIANTS
OPTIONS = {name: inspect.signature(components("mixin")[name]).parameters for name in RECURRENT}


def build(name: str, overrides: tuple[str, ...], device: str, dtype: torch.dtype, backend: str | None):
    """The mixin from its YAML with small chunks, perturbed, and a position context factory."""
    options = [f"mixin.{key}={value}" for key, value in SMALL_CHUNKS.items() if key in OPTIONS[name]]
    if backend is not None:
        options.append(f"mixin.backend={backend}")
    cfg = compose_config(
        [
            f"mixin={name}",
            "positional=none",
            f"model.hidden_size={HIDDEN}",
            "model.num_heads=4",
            *options,
            *overrides,
        ]
    )
    torch.manual_seed(0)
    mixin = component_factory("mixin", cfg.mixin, HIDDEN)(layer_idx=1).to(device, dtype)
    with torch.no_grad():
        for p in mixin.parameters():
            p.add_(0.05 * torch.randn_like(p))
    scheme = build_positional(cfg.positional, HIDDEN, max_seq_len=64).to(device, dtype)

    def ctx(length: int, pad_mask: torch.Tensor | None = None, start: int = 0) -> PositionContext:
        return PositionContext(scheme, start, length, torch.device(device), pad_mask=pad_mask)

    return mixin, ctx


def left_mask(device: str) -> torch.Tensor:
    """[ROWS, T]: row b has b pads, then real tokens."""
    return torch.arange(T, device=device)[None, :] >= torch.arange(ROWS, device=device)[:, None]


def start_state(mixin, ctx, warm: bool, device: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The empty state, or (`warm`) the state after a prefix of real tokens with empty token buffers: the
    pads must then also hold a non-zero recurrent state (no decay, no erasure), which a zero state hides.
    (A pad feeds the short convolution / token shift a zero, like the start of a sequence, so the buffers
    are emptied for the padded batch and the rows alone alike.)"""
    state = mixin.init_state(ROWS, torch.device(device), dtype)
    if not warm:
        return state
    with torch.no_grad():
        _, state = mixin(torch.randn(ROWS, 5, HIDDEN, device=device, dtype=dtype), ctx(5), state)
    return {key: torch.zeros_like(t) if key in TOKEN_BUFFERS else t for key, t in state.items()}


def check_left_padding(
    name, overrides, warm=False, device="cpu", dtype=torch.float64, backend=None, tol=1e-8
):
    mixin, ctx = build(name, overrides, device, dtype, backend)
    mask = left_mask(device)
    start = start_state(mixin, ctx, warm, device, dtype)
    x = torch.randn(ROWS, T, HIDDEN, device=device, dtype=dtype, requires_grad=True)
    weights = torch.randn(ROWS, T, HIDDEN, device=device, dtype=dtype)  # a loss over the real outputs only
    nxt = torch.randn(ROWS, 1, HIDDEN, device=device, dtype=dtype)  # one decoded token after the prefill

    y, state = mixin(x, ctx(T, mask), start)
    (y * weights * mask[..., None]).sum().backward()
    y_next, _ = mixin(nxt, ctx(1, start=T), state)
    grads = {n: p.grad.clone() for n, p in mixin.named_parameters() if p.grad is not None}
    mixin.zero_grad()
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask])), f"{name}: gradient reaches a pad"

    for b in range(ROWS):
        real = x.detach()[b : b + 1, b:].clone().requires_grad_(True)
        y_b, state_b = mixin(real, ctx(T - b), {key: t[b : b + 1] for key, t in start.items()})
        (y_b * weights[b : b + 1, b:]).sum().backward()
        torch.testing.assert_close(y[b, b:], y_b[0], atol=tol, rtol=tol, msg=f"{name}: row {b} outputs")
        for key, value in state_b.items():
            torch.testing.assert_close(
                state[key][b], value[0], atol=tol, rtol=tol, msg=f"{name}: row {b} {key}"
            )
        torch.testing.assert_close(
            x.grad[b, b:], real.grad[0], atol=tol, rtol=tol, msg=f"{name}: row {b} grad"
        )
        y_next_b, _ = mixin(nxt[b : b + 1], ctx(1, start=T - b), state_b)
        torch.testing.assert_close(y_next[b], y_next_b[0], atol=tol, rtol=tol, msg=f"{name}: row {b} decode")
    for n, p in mixin.named_parameters():  # the rows' losses add up: so do their parameter gradients
        if p.grad is not None:
            torch.testing.assert_close(grads[n], p.grad, atol=tol, rtol=tol, msg=f"{name}: {n} gradient")


@pytest.mark.parametrize("warm", [False, True], ids=["empty", "warm"])
@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_left_padding_is_exact(name: str, overrides: tuple[str, ...], warm: bool) -> None:
    check_left_padding(name, overrides, warm)


@pytest.mark.parametrize(("name", "overrides"), CASES)
def test_right_padding_leaves_real_outputs(name: str, overrides: tuple[str, ...]) -> None:
    mixin, ctx = build(name, overrides, "cpu", torch.float64, None)
    mask = left_mask("cpu").flip(1)  # row b: T - b real tokens, then b pads
    x = torch.randn(ROWS, T, HIDDEN, dtype=torch.float64)
    with torch.no_grad():
        y, _ = mixin(x, ctx(T, mask))
        for b in range(ROWS):
            y_b, _ = mixin(x[b : b + 1, : T - b], ctx(T - b))
            torch.testing.assert_close(y[b, : T - b], y_b[0], atol=1e-8, rtol=1e-8, msg=f"{name}: row {b}")


def test_the_list_covers_the_recurrent_family() -> None:
    assert {"deltanet", "mamba", "lstm", "rwkv7", "linear_attention"} <= set(RECURRENT)
    assert not ATTENTION & set(RECURRENT)


# the CUDA path of each mixin: fla's kernel (`backend=fused`), or cuDNN for those without the option
CUDA_PATHS = [(name, "fused" if "backend" in OPTIONS[name] else None) for name in RECURRENT]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("name", "backend"), CUDA_PATHS)
def test_left_padding_is_exact_on_the_fused_path(name: str, backend: str | None) -> None:
    """fp32 on CUDA: the tolerance of fp32 chunked kernels (each row has its own chunk alignment)."""
    check_left_padding(name, (), True, "cuda", torch.float32, backend, tol=2e-3)
