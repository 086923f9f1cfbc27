"""The contract across chunk boundaries, for every registered mixin (no per-mixin test file needed).

Chunked mixins (an option named `chunk_size`, plus `sub_chunk_size` where there is one) are built with
small chunks and run on sequences longer than two chunks and not a multiple of one, so every
chunk-to-chunk state carry is exercised: the full forward must equal token-by-token decoding (which never
chunks), and a prefill that ends mid-chunk followed by a multi-chunk continuation (a state passed *into*
the chunked path). One fp32 case holds the fp32 path to the same module in fp64. A mixin with its own
chunked kernel must expose its chunk length as `chunk_size` for these cases to reach its boundaries.
"""

from __future__ import annotations

import copy

import pytest
import torch

from archifactory.core.registry import components
from archifactory.model.components import build_positional, component_factory
from archifactory.model.positional import PositionContext
from tests.helpers import compose_config
from tests.model.test_contract import HIDDEN, perturb

MIXINS = sorted(components("mixin"))
CHUNK, SUB_CHUNK = 8, 4
SEQ_LEN = 2 * CHUNK + 5  # > 2 chunks, ends in a partial chunk


def build_chunked(name: str, positional: str = "rope") -> tuple[torch.nn.Module, torch.nn.Module]:
    """The mixin (fp64, perturbed away from its init) with small chunks where it has them, and its scheme."""
    overrides = [
        f"mixin={name}",
        f"positional={positional}",
        f"model.hidden_size={HIDDEN}",
        "model.num_heads=4",
    ]
    cfg = compose_config(overrides)
    if "chunk_size" in cfg.mixin:
        overrides.append(f"mixin.chunk_size={CHUNK}")
    if "sub_chunk_size" in cfg.mixin:
        overrides.append(f"mixin.sub_chunk_size={SUB_CHUNK}")
    cfg = compose_config(overrides)
    mixin = component_factory("mixin", cfg.mixin, HIDDEN)(layer_idx=1).double()
    perturb(mixin)
    return mixin, build_positional(cfg.positional, HIDDEN, max_seq_len=64).double()


def call(mixin, scheme, x, start=0, state=None):
    return mixin(x, PositionContext(scheme, start, x.shape[1]), state)


def decode(mixin, scheme, x: torch.Tensor, prefill: int, step: int) -> torch.Tensor:
    """Outputs of a prefill of `prefill` tokens, then calls of `step` tokens carrying the state."""
    state = mixin.init_state(x.shape[0], x.device, x.dtype)
    outputs = []
    bounds = ([0, prefill] if prefill else [0]) + list(range(prefill + step, x.shape[1], step)) + [x.shape[1]]
    for start, end in zip(bounds[:-1], bounds[1:]):
        out, state = call(mixin, scheme, x[:, start:end], start, state)
        outputs.append(out)
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("name", MIXINS)
def test_full_forward_equals_token_by_token_across_chunks(name: str) -> None:
    mixin, scheme = build_chunked(name)
    x = torch.randn(2, SEQ_LEN, HIDDEN, dtype=torch.float64)
    full = call(mixin, scheme, x)[0]
    torch.testing.assert_close(decode(mixin, scheme, x, prefill=0, step=1), full, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", MIXINS)
def test_state_enters_the_chunked_path_mid_chunk(name: str) -> None:
    """Prefill 11 tokens (one boundary, ends mid-chunk), then 2 * CHUNK + 1 tokens in one call."""
    mixin, scheme = build_chunked(name)
    x = torch.randn(2, 11 + 2 * CHUNK + 1, HIDDEN, dtype=torch.float64)
    full = call(mixin, scheme, x)[0]
    torch.testing.assert_close(
        decode(mixin, scheme, x, prefill=11, step=2 * CHUNK + 1), full, rtol=1e-7, atol=1e-9
    )


@pytest.mark.parametrize("name", MIXINS)
def test_fp32_matches_fp64_across_chunks(name: str) -> None:
    mixin, scheme = build_chunked(name)
    single, single_scheme = copy.deepcopy(mixin).float(), copy.deepcopy(scheme).float()
    x = torch.randn(2, SEQ_LEN, HIDDEN, dtype=torch.float64)
    reference = call(mixin, scheme, x)[0]
    y = call(single, single_scheme, x.float())[0]
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference, rtol=1e-3, atol=1e-4 * reference.abs().max().item())
    state = single.init_state(2, x.device, torch.float32)
    _, state = call(single, single_scheme, x[:, :11].float(), 0, state)
    tail, _ = call(single, single_scheme, x[:, 11:].float(), 11, state)
    torch.testing.assert_close(
        tail.double(), reference[:, 11:], rtol=1e-3, atol=1e-4 * reference.abs().max().item()
    )
