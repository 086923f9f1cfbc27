"""Native Sparse Attention: the reference == fla's naive NSA (compressed + selected branches: outputs and
gradients, GQA groups of 16 through `naive_nsa` and of 2 through its branch functions, odd lengths across
block boundaries), on the explicit-softmax and the SDPA paths; the sliding branch == swa's reference;
KV-cache decoding == the full forward with small blocks; fused == reference on GPU. (Left padding with
small blocks, which start at the first real token: tests/model/test_padding.py.)"""

from __future__ import annotations

import functools
import importlib.util
import pathlib

import pytest
import torch

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.nsa import NativeSparseAttention
from archifactory.model.mixins.reference.nsa import native_sparse_attention
from archifactory.model.mixins.swa import sliding_window_attention
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.parity import relative_error

HIDDEN = 32
SMALL = ("mixin.block_size=4", "mixin.block_counts=4", "mixin.window=5")


def cpu_mean_pooling(x: torch.Tensor, chunk_size: int, cu_seqlens=None) -> torch.Tensor:
    """fla's `mean_pooling` (a Triton kernel) in PyTorch: the mean of each block of `chunk_size` steps of
    x [B, T, H, D], the last block over the steps it has."""
    return torch.stack([c.mean(1) for c in x.split(chunk_size, dim=1)], dim=1)


@functools.cache
def fla_nsa_oracle() -> dict:
    """fla's `ops/nsa/naive.py`, run with `cpu_mean_pooling` in place of its Triton pooling; its two fla
    imports (Triton kernels, seconds to import, unused here) are left out."""
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.origin is None:
        pytest.skip("fla is not installed")
    path = pathlib.Path(spec.origin).parent / "ops" / "nsa" / "naive.py"
    source = path.read_text()
    for line in (
        "from fla.ops.utils import prepare_chunk_offsets\n",
        "from fla.ops.utils.pooling import mean_pooling\n",
    ):
        assert line in source
        source = source.replace(line, "")
    namespace = {"mean_pooling": cpu_mean_pooling, "__name__": "fla_naive_nsa"}
    exec(compile(source, str(path), "exec"), namespace)
    return namespace


def random_inputs(seq_len: int, heads: int, kv_heads: int, dim: int = 8):
    torch.manual_seed(seq_len + heads)
    q = (2 * torch.randn(1, seq_len, heads, dim)).requires_grad_()  # sharp compressed scores
    k = torch.randn(1, seq_len, kv_heads, dim, requires_grad=True)
    v = torch.randn(1, seq_len, kv_heads, dim, requires_grad=True)
    gates = torch.rand(1, seq_len, heads, 3, requires_grad=True)
    return q, k, v, gates


def ours(q, k, v, gates, block_size: int, block_counts: int, window: int, backend: str = "reference"):
    """The reference on fla's [B, T, H, D] layout."""
    options = (block_size, block_counts, window)
    bhtd = (t.transpose(1, 2) for t in (q, k, v, gates))
    return native_sparse_attention(*bhtd, 0, options, None, None, backend).transpose(1, 2)


def assert_same_with_gradients(a: torch.Tensor, b: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(a)
    grads = [torch.autograd.grad((o * upstream).sum(), inputs, retain_graph=True) for o in (a, b)]
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seq_len,block_size,block_counts", [(19, 4, 3), (23, 4, 4), (37, 4, 5), (9, 8, 3)])
def test_reference_matches_fla_naive_nsa(seq_len: int, block_size: int, block_counts: int) -> None:
    """Group of 16 query heads per key head (fla's oracle requires it); no sliding branch (fla's needs
    flash-attn)."""
    oracle = fla_nsa_oracle()["naive_nsa"]
    q, k, v, gates = random_inputs(seq_len, 16, 1)
    g = gates * torch.tensor([1.0, 1.0, 0.0])  # the sliding gate off
    mine = ours(q, k, v, g, block_size, block_counts, 0)
    theirs = oracle(
        q, k, v, g_cmp=g[..., 0], g_slc=g[..., 1], block_counts=block_counts, block_size=block_size
    )
    assert_same_with_gradients(mine, theirs, [q, k, v, gates])


@pytest.mark.parametrize("seq_len,backend", [(21, "reference"), (8, "reference"), (21, "sdpa")])
def test_branches_match_fla_naive_functions_with_small_groups(seq_len: int, backend: str) -> None:
    """G = 2 through fla's branch functions: compression, top-k selection, selected attention."""
    oracle = fla_nsa_oracle()
    q, k, v, gates = random_inputs(seq_len, 4, 2)
    block_size, block_counts, scale = 4, 3, 8**-0.5
    k_cmp, v_cmp = cpu_mean_pooling(k, block_size), cpu_mean_pooling(v, block_size)
    o_cmp, _ = oracle["naive_nsa_compression"](q, k_cmp, v_cmp, block_size, scale)
    indices = oracle["naive_nsa_topk"](q, k_cmp, block_counts, block_size, scale)
    o_slc = oracle["naive_nsa_selection"](q, k, v, indices, block_size, scale)
    theirs = o_cmp * gates[..., 0:1] + o_slc * gates[..., 1:2]
    mine = ours(q, k, v, gates * torch.tensor([1.0, 1.0, 0.0]), block_size, block_counts, 0, backend)
    assert_same_with_gradients(mine, theirs, [q, k, v, gates])


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_sliding_branch_matches_swa_reference(backend: str) -> None:
    q, k, v, gates = random_inputs(13, 4, 2)
    only_swa = gates * torch.tensor([0.0, 0.0, 1.0])
    mine = ours(q, k, v, only_swa, 4, 3, 5, backend)
    window = sliding_window_attention(*(t.transpose(1, 2) for t in (q, k, v)), 0, 5, None, "reference")
    theirs = window.transpose(1, 2) * gates[..., 2:]
    assert_same_with_gradients(mine, theirs, [q, k, v, gates])


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=nsa", "positional=rope", f"model.hidden_size={HIDDEN}", "model.num_heads=4", *overrides]
    )


def build(*overrides: str) -> NativeSparseAttention:
    layer = component_factory("mixin", compose(*SMALL, *overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))  # sharp compressed scores: the selection matters
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    from archifactory.model.components import build_positional

    scheme = build_positional(compose().positional, HIDDEN, max_seq_len=64).double()
    return PositionContext(scheme, start, length, pad_mask=pad_mask)


@pytest.mark.parametrize(
    "prefill,overrides",
    [(1, ("mixin.num_kv_heads=2",)), (6, ("mixin.num_kv_heads=2",)), (13, ("mixin.window=0",))],
)
def test_prefill_then_decode_equals_full(prefill: int, overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 19))
    state = layer.init_state(2, x.device, x.dtype)
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces = [out]
    for t in range(prefill, 19):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s.numel() for s in state.values()) == 2 * layer.state_size(19)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="block_counts"):
        NativeSparseAttention(HIDDEN, 0, block_counts=2)
    with pytest.raises(ArchiFactoryError, match="window"):
        NativeSparseAttention(HIDDEN, 0, window=-1)
    with pytest.raises(ArchiFactoryError, match="num_kv_heads"):
        NativeSparseAttention(HIDDEN, 0, num_heads=4, num_kv_heads=3)
    with pytest.raises(ArchiFactoryError, match="backend"):
        NativeSparseAttention(HIDDEN, 0, backend="flash")
    layer = NativeSparseAttention(HIDDEN, 0)
    assert layer.backend_name() == "sdpa"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), PositionContext(NoPositional(HIDDEN, 64), 0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = NativeSparseAttention(
        512, 0, num_heads=16, num_kv_heads=1, block_size=32, block_counts=4, window=64
    )
    layer = layer.cuda()
    assert layer._kernel_fits()
    context = PositionContext(NoPositional(512, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 512, device="cuda", requires_grad=True)
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, context)
        grads = torch.autograd.grad(
            y.float().square().mean(), [x, layer.qkv_proj.weight, layer.g_proj.weight]
        )
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(y_f, y_r) < 3e-2
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 6e-2
