"""Log-linear Mamba2: the chunked reference against fla's naive log-linear attention (outputs, gradients)
and against the Fenwick buckets written from their definition (final state), at odd lengths across chunk
boundaries; the per-row reference (padded calls, decode states) against it row by row; the layer against
fla's LogLinearMamba2 written out around that oracle; decoding == the full forward; a padded row == the
row alone; decode steps compile clean; options; fused == reference on GPU."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.build import build_model
from archifactory.model.components import component_factory
from archifactory.model.mixins.log_linear_mamba2 import LogLinearMamba2
from archifactory.model.mixins.reference.log_linear import chunk_log_linear
from archifactory.model.mixins.reference.log_linear_rows import chunk_log_linear_rows
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.oracles import load_fla_naive
from tests.model.parity import relative_error

HIDDEN = 32
SMALL = ("mixin.d_state=8", "mixin.head_dim=16", "mixin.chunk_size=4", "mixin.num_levels=8")


@functools.cache
def compose(*overrides: str):
    return compose_config(
        ["mixin=log_linear_mamba2", "positional=none", f"model.hidden_size={HIDDEN}", *overrides]
    )


def build(*overrides: str) -> LogLinearMamba2:
    layer = component_factory("mixin", compose(*SMALL, *overrides).mixin, HIDDEN)(layer_idx=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 256), start, length, pad_mask=pad_mask)


def inputs(batch: int, seq_len: int, groups: int, heads: int, levels: int = 8):
    torch.manual_seed(0)
    q = torch.randn(batch, seq_len, groups, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(batch, seq_len, groups, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(batch, seq_len, heads, 6, dtype=torch.float64, requires_grad=True)
    g = (-0.3 * torch.rand(batch, seq_len, heads, dtype=torch.float64)).requires_grad_()
    lam = torch.rand(batch, seq_len, heads, levels, dtype=torch.float64).requires_grad_()
    return q, k, v, g, lam


def buckets_by_definition(k, v, g, end: int, slots: int) -> torch.Tensor:
    """Slot b of [0, end): Σ_j exp(G_{end−1} − G_j) k_jᵀ v_j over j in [r_b, r_b + 2^b) for each set bit b
    of `end` (r_b = end with bits 0..b cleared), zero for clear bits; k [B, T, H, K] (heads expanded)."""
    gc = g.cumsum(1)  # [B, T, H]
    out = torch.zeros(k.shape[0], k.shape[2], slots, k.shape[3], v.shape[3], dtype=k.dtype)
    for b in range(slots):
        if end >> b & 1:
            first = (end >> (b + 1)) << (b + 1)
            rows = slice(first, first + (1 << b))
            weight = (gc[:, end - 1 : end] - gc[:, rows]).exp()  # [B, n, H]
            out[:, :, b] = torch.einsum("bnhk,bnh,bnhv->bhkv", k[:, rows], weight, v[:, rows])
    return out


@pytest.mark.parametrize("seq_len,chunk,groups", [(37, 8, 1), (21, 4, 2), (19, 64, 1), (23, 5, 1)])
def test_reference_matches_fla_naive_oracle(seq_len: int, chunk: int, groups: int) -> None:
    naive = load_fla_naive("log_linear_attn").naive_log_linear_attn
    q, k, v, g, lam = inputs(2, seq_len, groups, 4)
    slots = torch.zeros(2, 4, 7, 8, 6, dtype=torch.float64)
    out, state = chunk_log_linear(q, k, v, g, lam, 0, slots, chunk)
    expected = naive(q, k, v, g, lam, scale=1.0)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(out)
    ours = torch.autograd.grad((out * upstream).sum(), [q, k, v, g, lam])
    theirs = torch.autograd.grad((expected * upstream).sum(), [q, k, v, g, lam])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    k_heads = k.repeat_interleave(4 // groups, dim=2)
    torch.testing.assert_close(
        state, buckets_by_definition(k_heads, v, g, seq_len, 7), rtol=1e-10, atol=1e-12
    )


@pytest.mark.parametrize("split", [1, 5, 8, 13])
def test_reference_continues_from_a_state_mid_chunk(split: int) -> None:
    q, k, v, g, lam = inputs(1, 29, 1, 2)
    empty = torch.zeros(1, 2, 7, 8, 6, dtype=torch.float64)
    full, final = chunk_log_linear(q, k, v, g, lam, 0, empty, 8)
    first, state = chunk_log_linear(*(t[:, :split] for t in (q, k, v, g, lam)), 0, empty, 8)
    second, state = chunk_log_linear(*(t[:, split:] for t in (q, k, v, g, lam)), split, state, 8)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, final, rtol=1e-12, atol=1e-12)


def fla_layer_by_hand(layer: LogLinearMamba2, x: torch.Tensor) -> torch.Tensor:
    """fla's LogLinearMamba2 forward: in_proj -> (z, xBC, dt, dl); causal conv + SiLU; x·dt, A·dt,
    λ = softplus(L·dl); naive log-linear attention (q = C, k = B, scale 1); + D·x; RMSNorm(y ⊙ SiLU(z))
    per group; out_proj."""
    naive = load_fla_naive("log_linear_attn").naive_log_linear_attn
    batch, seq_len, _ = x.shape
    heads, groups, n = layer.num_heads, layer.n_groups, layer.d_state
    z, xbc, dt, dl = (x @ layer.in_proj.weight.T).split(layer.widths, dim=-1)
    kernel = layer.conv1d.kernel_size
    windows = torch.cat([xbc.new_zeros(batch, kernel - 1, xbc.shape[-1]), xbc], 1).unfold(1, kernel, 1)
    xbc = F.silu((windows * layer.conv1d.weight[:, 0]).sum(-1) + layer.conv1d.bias)
    xs, b, c = xbc.split([layer.inner_dim, groups * n, groups * n], dim=-1)
    xs = xs.view(batch, seq_len, heads, -1)
    dt = F.softplus(dt + layer.dt_bias)
    lam = F.softplus(layer.L * dl.view(batch, seq_len, heads, -1))
    y = naive(
        c.view(batch, seq_len, groups, n), b.view(batch, seq_len, groups, n), xs * dt[..., None],
        -torch.exp(layer.A_log) * dt, lam, scale=1.0,
    )  # fmt: skip
    y = y + xs * layer.D[:, None]
    gated = y.reshape(batch, seq_len, groups, -1) * F.silu(z).view(batch, seq_len, groups, -1)
    normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + layer.norm_eps)
    return (normed.flatten(-2) * layer.norm_weight) @ layer.out_proj.weight.T


@pytest.mark.parametrize("overrides", [(), ("mixin.n_groups=2",)])
def test_layer_matches_fla_layer_by_hand(overrides: tuple[str, ...]) -> None:
    layer = build(*overrides)
    x = torch.randn(2, 19, HIDDEN, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x, ctx(0, 19))
    expected = fla_layer_by_hand(layer, x)
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-11)
    upstream = torch.randn_like(y)
    params = [x, layer.L, layer.A_log, layer.dt_bias, layer.in_proj.weight]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("prefill", [1, 4, 9])  # mid-chunk, on a boundary, past one
def test_prefill_then_decode_equals_full(prefill: int) -> None:
    layer = build("mixin.n_groups=2")
    x = torch.randn(2, 17, HIDDEN, dtype=torch.float64)
    full, _ = layer(x, ctx(0, 17))
    state = layer.init_state(2, x.device, x.dtype)
    pieces = []
    out, state = layer(x[:, :prefill], ctx(0, prefill), state)
    pieces.append(out)
    for t in range(prefill, 17):
        out, state = layer(x[:, t : t + 1], ctx(t, 1), state)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-10, atol=1e-12)
    assert sum(s.numel() for s in state.values()) == 2 * layer.state_size(17)


def test_padded_row_equals_the_row_alone() -> None:
    """A pad is an identity step that does not advance the row's position: a left- or right-padded row
    gets the outputs, buckets and position of the row run alone (the conv buffer too, for left pads)."""
    layer = build()
    x = torch.randn(1, 11, HIDDEN, dtype=torch.float64)
    alone, state_alone = layer(x, ctx(0, 11), layer.init_state(1, x.device, x.dtype))
    pads = torch.randn(1, 4, HIDDEN, dtype=torch.float64)
    for padded, mask, real, keys in [
        (torch.cat([pads, x], 1), [False] * 4 + [True] * 11, slice(4, 15), ("levels", "position", "conv")),
        (torch.cat([x, pads], 1), [True] * 11 + [False] * 4, slice(0, 11), ("levels", "position")),
    ]:
        pad_mask = torch.tensor([mask])
        out, state = layer(padded, ctx(0, 15, pad_mask), layer.init_state(1, x.device, x.dtype))
        torch.testing.assert_close(out[:, real], alone, rtol=1e-12, atol=1e-12)
        for key in keys:
            torch.testing.assert_close(state[key], state_alone[key], rtol=1e-12, atol=1e-12, msg=key)
        assert state["position"].tolist() == [11]
        without_state, _ = layer(padded, ctx(0, 15, pad_mask))
        torch.testing.assert_close(without_state, out, rtol=1e-12, atol=1e-12)


def test_padded_prefill_and_decode_run_under_autocast() -> None:
    """The per-row path under bf16 autocast (matmuls in bf16, slots kept in fp32): runs, close to fp32."""
    layer = build().float()
    x = torch.randn(2, 9, HIDDEN)
    pad_mask = torch.arange(9)[None, :] >= torch.tensor([[0], [3]])
    results = []
    for enabled in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            pre, state = layer(x, ctx(0, 9, pad_mask), layer.init_state(2, x.device, x.dtype))
            step, state = layer(x[:, :1], ctx(9, 1), state)
        assert state["levels"].dtype == torch.float32
        results.append(torch.cat([pre[pad_mask], step.flatten(0, 1)]))  # the real outputs, then the step
    assert relative_error(*results) < 5e-2


def slots_after(prefix: int, heads: int) -> torch.Tensor:
    """The buckets [1, H, 7, 8, 6] after `prefix` random tokens (a state as decoding makes it)."""
    empty = torch.zeros(1, heads, 7, 8, 6, dtype=torch.float64)
    if prefix == 0:
        return empty
    return chunk_log_linear(*(t.detach() for t in inputs(1, prefix, 1, heads)), 0, empty, 8)[1]


@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_rows_reference_equals_each_row_at_its_own_position(chunk: int) -> None:
    """`chunk_log_linear_rows` (a position and buckets per row; pads zeroed as the mixin zeroes them) ==
    `chunk_log_linear` of each row's real tokens alone from its position: outputs, buckets, positions,
    gradients (inputs and incoming buckets); real outputs send exactly no gradient to a pad."""
    batch, seq_len, groups, heads = 5, 13, 2, 4
    q, k, v, g, lam = inputs(batch, seq_len, groups, heads)
    starts = torch.tensor([0, 5, 8, 19, 11])  # row 3: 19 -> 26 passes 20 and 24 (slots merge)
    real = torch.ones(batch, seq_len, dtype=torch.bool)
    real[1, :3] = False  # left pads
    real[2, 9:] = False  # right pads
    real[3, :6] = False
    real[4] = False  # no real token: the row keeps its buckets and position
    slots = torch.cat([slots_after(int(s), heads) for s in starts])
    clear = (starts[:, None] >> torch.arange(7) & 1) == 0  # [B, S]: the slots that hold no bucket
    slots = (slots + clear[:, None, :, None, None] * torch.randn_like(slots)).requires_grad_()  # junk there
    v_in = torch.where(real[..., None, None], v, 0.0)  # the caller's identity steps: v = 0, g = 0
    g_in = torch.where(real[..., None], g, 0.0)
    out, new, position = chunk_log_linear_rows(q, k, v_in, g_in, lam, starts, real, slots, chunk)
    assert position.tolist() == (starts + real.sum(1)).tolist()
    upstream = torch.randn_like(out) * real[..., None, None]
    leaves = [q, k, v, g, lam, slots]
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    for grad in grads[:5]:
        assert torch.equal(grad[~real], torch.zeros_like(grad[~real])), "a pad got gradient"
    kept = slots[4] * ~clear[4, None, :, None, None]  # the row without real tokens: its buckets, no junk
    torch.testing.assert_close(new[4], kept, rtol=0, atol=0)
    for row in range(batch - 1):
        mask = real[row]
        cut = [t[row : row + 1, mask] for t in (q, k, v, g, lam)]
        before = slots[row : row + 1]
        alone, final = chunk_log_linear(*cut, int(starts[row]), before, chunk)
        torch.testing.assert_close(out[row : row + 1, mask], alone, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(new[row : row + 1], final, rtol=1e-10, atol=1e-12)
        loss = (alone * upstream[row : row + 1, mask]).sum()
        theirs = torch.autograd.grad(loss, [*cut, before], allow_unused=True)  # no bucket before position 0
        mine = [grad[row : row + 1, mask] for grad in grads[:5]] + [grads[5][row : row + 1]]
        for ours, expected in zip(mine, theirs):
            expected = torch.zeros_like(ours) if expected is None else expected
            torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)


def test_decode_after_a_padded_prefill_compiles_clean() -> None:
    """Rows at different positions read them from the state, never the host: no graph break."""
    shape = ["model.hidden_size=32", "model.num_heads=2", "model.num_layers=1", "model.max_seq_len=64"]
    model = build_model(compose_config(["mixin=log_linear_mamba2", "mixin.chunk_size=16", *shape]), 64).eval()
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        state = model(torch.randint(0, 64, (2, 5)), state=model.init_state(2), attention_mask=mask).state
        torch._dynamo.reset()
        try:
            result = torch._dynamo.explain(model)(torch.randint(0, 64, (2, 1)), state=state)
        finally:
            torch._dynamo.reset()
    assert result.graph_break_count == 0, [str(b.reason) for b in result.break_reasons]


def test_bad_options_positions_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="num_levels"):
        LogLinearMamba2(HIDDEN, 0, num_levels=1)
    with pytest.raises(ArchiFactoryError, match="head_dim"):
        LogLinearMamba2(HIDDEN, 0, head_dim=24)
    layer = LogLinearMamba2(HIDDEN, 0, d_state=64, head_dim=16, num_levels=4)
    with pytest.raises(ArchiFactoryError, match="raise mixin.num_levels"):
        layer(torch.randn(1, 9, HIDDEN), ctx(0, 9))
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused needs CUDA"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))
    layer = LogLinearMamba2(HIDDEN, 0, d_state=8, head_dim=16, backend="fused")
    with pytest.raises(ArchiFactoryError, match="multiple of 64"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = LogLinearMamba2(256, 0, d_state=64, head_dim=64, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    results = {}
    for backend in ("fused", "reference"):
        layer.backend = backend
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, _ = layer(x, context)
        grads = torch.autograd.grad(
            y.float().square().mean(), [x, layer.L, layer.A_log, layer.in_proj.weight]
        )
        results[backend] = (y, grads)
        assert layer.backend_name() == backend
    (y_f, grads_f), (y_r, grads_r) = results["fused"], results["reference"]
    assert relative_error(y_f, y_r) < 2e-2
    for a, b in zip(grads_f, grads_r):
        assert relative_error(a, b) < 5e-2
