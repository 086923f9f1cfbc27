"""Mamba-3 (SISO): fla's layer needs mamba_ssm's kernels and has no naive form, so the layer is held to
fla's `Mamba3` written out here around the token-by-token trapezoidal recurrence of mamba_ssm's step
reference (outputs, gradients, every piece of the final state), at odd lengths across chunk boundaries
and from a warm state; fused == reference on GPU. (Decoding and padding, cold and warm: the registry
suites, tests/model/test_contract*.py and test_padding_mixins.py.)"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.components import component_factory
from archifactory.model.mixins.mamba3 import Mamba3
from archifactory.model.positional import NoPositional, PositionContext
from tests.helpers import compose_config
from tests.model.parity import assert_fused_matches_reference

HIDDEN = 32
SMALL = ("mixin.d_state=8", "mixin.head_dim=16", "mixin.chunk_size=4")


@functools.cache
def compose(*overrides: str):
    return compose_config(["mixin=mamba3", "positional=none", f"model.hidden_size={HIDDEN}", *overrides])


def build(*overrides: str) -> Mamba3:
    layer = component_factory("mixin", compose(*SMALL, *overrides).mixin, HIDDEN)(layer_idx=0).double()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
        layer.in_proj.weight.mul_(8.0)  # large steps and angles: every term of the recurrence matters
    return layer


def ctx(start: int, length: int, pad_mask: torch.Tensor | None = None) -> PositionContext:
    return PositionContext(NoPositional(HIDDEN, 128), start, length, pad_mask=pad_mask)


def layer_by_hand(layer: Mamba3, x: torch.Tensor, state: dict | None = None):
    """fla's Mamba3 (SISO) token by token: split in_proj; RMSNorm B, C per group (+ per-head bias);
    Δ = softplus(dd_dt + dt_bias), A = min(−softplus(dd_A), −A_floor), λ = sigmoid(trap); the angle
    φ += Δ·π·tanh θ (mod 2π) turns pairs (2i, 2i+1) of B and C; h = α h + (1−λ)Δα k_prev v_prevᵀ + λΔ k vᵀ;
    y = hᵀq + D v, gated by SiLU(z) (or RMSNorm per head then the gate); out_proj. Returns (y, state)."""
    batch, seq_len, _ = x.shape
    heads, n, p, a_count = layer.num_heads, layer.d_state, layer.head_dim, layer.num_angles
    z, xs, b, c, dd_dt, dd_a, trap, theta = (x @ layer.in_proj.weight.T).split(layer.widths, dim=-1)
    if state is None:
        state = layer.init_state(batch, x.device, x.dtype)
    h, angle, k_prev, v_prev = (state[key].clone() for key in ("ssm", "angle", "k", "v"))

    def norm(t, weight):  # [B, G·N] -> [B, H, N]
        t = t.view(batch, layer.n_groups, n)
        t = t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + layer.norm_eps) * weight
        return t.repeat_interleave(heads // layer.n_groups, dim=1)

    def turn(t, phi):
        out = t.clone()
        for i in range(a_count):
            e, o = t[..., 2 * i], t[..., 2 * i + 1]
            out[..., 2 * i] = e * phi[..., i].cos() - o * phi[..., i].sin()
            out[..., 2 * i + 1] = e * phi[..., i].sin() + o * phi[..., i].cos()
        return out

    outputs = []
    for t in range(seq_len):
        dt = F.softplus(dd_dt[:, t] + layer.dt_bias)  # [B, H]
        big_a = torch.clamp(-F.softplus(dd_a[:, t]), max=-layer.A_floor)
        lam = torch.sigmoid(trap[:, t])
        angle = angle + (torch.tanh(theta[:, t]) * math.pi)[:, None, :] * dt[..., None]
        angle = angle - 2 * math.pi * torch.floor(angle / (2 * math.pi))
        k = turn(norm(b[:, t], layer.B_norm_weight) + layer.B_bias, angle)
        q = turn(norm(c[:, t], layer.C_norm_weight) + layer.C_bias, angle)
        v = xs[:, t].view(batch, heads, p)
        alpha = (big_a * dt).exp()
        h = alpha[..., None, None] * h
        h = h + ((1 - lam) * dt * alpha)[..., None, None] * k_prev[..., :, None] * v_prev[..., None, :]
        h = h + (lam * dt)[..., None, None] * k[..., :, None] * v[..., None, :]
        y = (q[..., :, None] * h).sum(-2) + layer.D[:, None] * v  # [B, H, P]
        gate = z[:, t].view(batch, heads, p)
        if layer.norm_weight is None:
            y = y * F.silu(gate)
        else:
            y = y / torch.sqrt(y.pow(2).mean(-1, keepdim=True) + layer.norm_eps)
            y = y * layer.norm_weight.view(heads, p) * F.silu(gate)
        outputs.append(y.reshape(batch, heads * p))
        k_prev, v_prev = k, v
    y = torch.stack(outputs, 1) @ layer.out_proj.weight.T
    return y, {"ssm": h, "angle": angle, "k": k_prev, "v": v_prev}


def warm_state(layer: Mamba3, batch: int) -> dict:
    torch.manual_seed(3)
    return {key: torch.randn_like(t) for key, t in layer.init_state(batch, "cpu", torch.float64).items()}


@pytest.mark.parametrize(
    "seq_len,overrides,warm",
    [
        (19, (), False),
        (13, ("mixin.n_groups=2", "mixin.rope_fraction=1.0", "mixin.chunk_size=5"), True),
        (7, ("mixin.is_outproj_norm=true", "mixin.chunk_size=16"), True),
    ],
)
def test_layer_matches_the_token_by_token_recurrence(seq_len: int, overrides: tuple, warm: bool) -> None:
    layer = build(*overrides)
    x = torch.randn(2, seq_len, HIDDEN, dtype=torch.float64, requires_grad=True)
    start = warm_state(layer, 2) if warm else layer.init_state(2, x.device, x.dtype)
    y, state = layer(x, ctx(0, seq_len), start)
    expected, final = layer_by_hand(layer, x, start)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    for key in ("ssm", "k", "v", "angle"):
        torch.testing.assert_close(state[key], final[key], rtol=1e-10, atol=1e-11)
    upstream = torch.randn_like(y)
    params = [x, *layer.parameters()]
    ours = torch.autograd.grad((y * upstream).sum(), params)
    theirs = torch.autograd.grad((expected * upstream).sum(), params)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_bad_options_and_cpu_backend() -> None:
    with pytest.raises(ArchiFactoryError, match="rope_fraction"):
        Mamba3(HIDDEN, 0, d_state=8, head_dim=16, rope_fraction=0.25)
    with pytest.raises(ArchiFactoryError, match="head_dim"):
        Mamba3(HIDDEN, 0, head_dim=24)
    assert Mamba3(HIDDEN, 0, d_state=10, head_dim=16).num_angles == 2  # fla: int(10·0.5) made even, halved
    layer = Mamba3(HIDDEN, 0, d_state=8, head_dim=16)
    assert layer.backend_name() == "reference"
    layer.backend = "fused"
    with pytest.raises(ArchiFactoryError, match="backend=fused"):
        layer(torch.randn(1, 3, HIDDEN), ctx(0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_matches_reference_on_gpu() -> None:
    pytest.importorskip("fla")
    torch.manual_seed(0)
    layer = Mamba3(256, 0, backend="fused").cuda()
    context = PositionContext(NoPositional(256, 512), 0, 300, torch.device("cuda"))
    x = torch.randn(2, 300, 256, device="cuda", requires_grad=True)
    assert_fused_matches_reference(layer, x, context, [x, layer.in_proj.weight, layer.B_bias], 2e-2, 5e-2)
