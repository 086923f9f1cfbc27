"""The mixin kit (`model/mixins/kit.py`): each shared piece against an independent torch computation, and
the fla loader's three outcomes (not installed, installed but failing to import, present)."""

from __future__ import annotations

import inspect
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import get_component
from archifactory.model.mixins import kit
from archifactory.model.mixins.deltanet import DeltaRuleMixin
from archifactory.model.mixins.kit import (
    HeadDecay,
    KernelImport,
    ShortConvolution,
    append_cache,
    fla_backend,
    grouped_heads,
    head_group_norm,
    head_rms_norm,
    import_kernel,
    scaled_width,
    token_shift,
)
from archifactory.model.mixins.reference.short_conv import BLOCK_ROWS
from archifactory.model.roles import parameter_ids


def test_import_kernel_tells_a_missing_package_from_a_broken_one(tmp_path, monkeypatch) -> None:
    missing = import_kernel("no_such_package_af.ops", "kernel")
    assert missing.kernel is None and missing.reason.startswith("no_such_package_af is not installed")

    broken = tmp_path / "broken_package_af"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('triton failed to initialise: no GPU driver')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    failed = import_kernel("broken_package_af.ops", "kernel")
    assert failed.kernel is None
    assert "broken_package_af is installed but importing broken_package_af.ops failed" in failed.reason
    assert "triton failed to initialise: no GPU driver" in failed.reason

    (broken / "__init__.py").write_text("")
    (broken / "ops.py").write_text("def other():\n    return 1\n")
    assert "broken_package_af is installed but has no broken_package_af.nope" in (
        import_kernel("broken_package_af.nope", "kernel").reason
    )
    assert (
        import_kernel("broken_package_af.ops", "kernel").reason
        == "broken_package_af.ops has no kernel (upgrade broken_package_af)"
    )
    assert import_kernel("broken_package_af.ops", "other").kernel() == 1


def test_import_kernel_finds_a_present_fla_op_that_runs_on_cpu() -> None:
    found = import_kernel("fla.ops.gla.naive", "naive_recurrent_gla")
    assert found.reason == "" and callable(found.kernel)
    q, k, v = torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 4), torch.randn(1, 5, 2, 3)
    g = -torch.rand(1, 5, 2, 4)
    out, _ = found.kernel(q, k, v, g)
    assert out.shape == (1, 5, 2, 3) and torch.isfinite(out).all()


def test_fla_import_logs_why_once_per_op_and_caches(caplog) -> None:
    kit.fla_import.cache_clear()
    with caplog.at_level(logging.WARNING, logger=kit.__name__):
        first = kit.fla_import("no_such_module_af", "kernel")
        second = kit.fla_import("no_such_module_af", "kernel")
    assert first is second and first.kernel is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1, lines
    assert "fla.ops.no_such_module_af.kernel unavailable" in lines[0]
    assert "fla is installed but has no fla.ops.no_such_module_af" in lines[0]
    kit.fla_import.cache_clear()


def test_fla_backend_refuses_fused_naming_why(monkeypatch) -> None:
    cpu = torch.zeros(1)
    assert fla_backend("auto", cpu, ("gla", "chunk_gla"), "mixin=x") == "reference"
    with pytest.raises(ArchiFactoryError, match="backend=fused needs CUDA"):
        fla_backend("fused", cpu, ("gla", "chunk_gla"), "mixin=x")
    monkeypatch.setattr(kit, "fla_import", lambda *op: KernelImport(None, "fla is not installed (pip)"))
    on_cuda = types.SimpleNamespace(is_cuda=True)
    assert fla_backend("auto", on_cuda, ("gla", "chunk_gla"), "mixin=x") == "reference"
    with pytest.raises(
        ArchiFactoryError, match=r"mixin=x: backend=fused is unavailable: fla is not installed"
    ):
        fla_backend("fused", on_cuda, ("gla", "chunk_gla"), "mixin=x")


@pytest.mark.parametrize("shared", [True, False])
def test_head_rms_norm_equals_torch_per_head(shared: bool) -> None:
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    weight = torch.randn(4 if shared else 12, dtype=torch.float64)
    per_head = weight.expand(3, 4) if shared else weight.view(3, 4)
    expected = (F.rms_norm(x, (4,), eps=1e-5) * per_head).flatten(-2)
    torch.testing.assert_close(head_rms_norm(x, weight, 1e-5), expected)
    gate = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(head_rms_norm(x, weight, 1e-5, gate), expected * F.silu(gate))
    torch.testing.assert_close(head_rms_norm(x, weight, 1e-5, gate, "sigmoid"), expected * gate.sigmoid())
    before = F.rms_norm(x * F.silu(gate).view(x.shape), (4,), eps=1e-5) * per_head
    torch.testing.assert_close(head_rms_norm(x, weight, 1e-5, gate, gate_first=True), before.flatten(-2))


def test_head_norms_compute_in_fp32_for_bf16_inputs() -> None:
    x = torch.randn(2, 3, 2, 8).bfloat16()
    weight = torch.ones(8)
    assert head_rms_norm(x, weight, 1e-5).dtype == torch.float32
    assert head_group_norm(x, torch.ones(16), torch.zeros(16), 1e-5).dtype == torch.float32


def test_head_group_norm_equals_torch_group_norm() -> None:
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    weight, bias = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    expected = F.group_norm(x.reshape(10, 12), 3, weight, bias, eps=1e-5).view(2, 5, 12)
    torch.testing.assert_close(head_group_norm(x, weight, bias, 1e-5), expected)


@pytest.mark.parametrize("bias", [False, True])
def test_short_convolution_is_a_causal_conv1d_with_exact_decoding(bias: bool) -> None:
    torch.manual_seed(0)
    conv = ShortConvolution(6, 4, bias=bias).double()
    torch.manual_seed(0)
    reference = nn.Conv1d(6, 6, 4, groups=6, bias=bias, padding=3).double()
    assert torch.equal(conv.weight, reference.weight), "init is nn.Conv1d's default"
    if bias:
        assert torch.equal(conv.bias, reference.bias)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    full, none = conv(x)
    assert none is None
    expected = F.silu(reference(x.transpose(1, 2))[..., :9]).transpose(1, 2)
    torch.testing.assert_close(full, expected)
    buffer = conv.init_state(2, x.device, torch.float64)
    pieces = []
    for chunk in (x[:, :5], x[:, 5:6], x[:, 6:7], x[:, 7:]):
        out, buffer = conv(chunk, buffer)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, 1), full)
    assert buffer.shape == (2, 6, 3) and conv.state_size() == 18 and conv.flops_per_token() == 48


@pytest.mark.parametrize(("bias", "silu"), [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("seq_len", [1, 2, 7, BLOCK_ROWS + 5])
def test_short_convolution_gradients_match_conv1d(bias: bool, silu: bool, seq_len: int) -> None:
    """The hand-written backward (reference/short_conv.py) against autograd through F.conv1d, fp64: the
    input, the weight, the bias and a decode buffer's past inputs; sequences shorter than the kernel (every
    row reads the past) and longer than one block of the weight gradient."""
    torch.manual_seed(1)
    conv = ShortConvolution(5, 4, bias=bias, silu=silu).double()
    x = torch.randn(2, seq_len, 5, dtype=torch.float64, requires_grad=True)
    past = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)  # [B, C, kernel − 1]
    out, _ = conv(x, past)
    full = torch.cat([past, x.transpose(1, 2)], dim=2)
    expected = F.conv1d(full, conv.weight, conv.bias, groups=5)
    expected = (F.silu(expected) if silu else expected).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(out)
    leaves = [x, past, conv.weight, *([conv.bias] if bias else [])]
    have = torch.autograd.grad((out * weights).sum(), leaves)
    want = torch.autograd.grad((expected * weights).sum(), leaves)
    for a, b in zip(have, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_head_checks_name_the_options() -> None:
    assert grouped_heads(64, 8, None, "mixin=t") == (8, 8)
    assert grouped_heads(64, 8, 2, "mixin=t") == (8, 2)
    with pytest.raises(ArchiFactoryError, match="mixin=t: num_heads=8 is not divisible by num_kv_heads=3"):
        grouped_heads(64, 8, 3, "mixin=t")
    with pytest.raises(ArchiFactoryError, match="hidden_size=64 is not divisible by num_heads=6"):
        grouped_heads(64, 6, None, "mixin=t")
    assert scaled_width(64, 0.5, 4, "mixin=t", "expand_k") == 32
    with pytest.raises(ArchiFactoryError, match="mixin=t: expand_v=0.3 gives"):
        scaled_width(64, 0.3, 4, "mixin=t", "expand_v")


def test_the_delta_rule_base_takes_keywords_only() -> None:
    params = list(inspect.signature(DeltaRuleMixin.__init__).parameters.values())[1:]
    assert params and all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)


def test_append_cache_grows_the_state_only_when_there_is_one() -> None:
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    full, new = append_cache(None, 2, k=k, v=v)
    assert new is None and full["k"] is k and full["v"] is v
    past = {"k": torch.randn(2, 3, 6, 5), "v": torch.randn(2, 3, 6, 5)}
    full, new = append_cache(past, 2, k=k, v=v)
    assert torch.equal(full["k"], torch.cat([past["k"], k], 2)) and torch.equal(new["v"], full["v"])
    assert new["k"].shape == (2, 3, 10, 5)


def test_token_shift_continues_from_the_previous_call() -> None:
    x = torch.randn(2, 5, 3)
    shifted = token_shift(x, None)
    assert torch.equal(shifted[:, 0], torch.zeros(2, 3)) and torch.equal(shifted[:, 1:], x[:, :-1])
    tail = token_shift(x[:, 3:], x[:, 2])
    assert torch.equal(tail, x[:, 2:4])


def test_head_decay_is_mamba2s_decay_with_its_init() -> None:
    """g = −exp(A_log)·softplus(a_proj x + dt_bias) by hand; A ~ U[a_range], softplus(dt_bias) in
    [0.001, 0.1]; the owner keeps exactly (A_log, dt_bias), a_proj is left to the model's scheme."""
    torch.manual_seed(0)
    decay = HeadDecay(16, 256, (1.0, 16.0)).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = -decay.A_log.exp() * F.softplus(x @ decay.a_proj.weight.T + decay.dt_bias)
    torch.testing.assert_close(decay(x), expected)
    a, dt = decay.A_log.exp(), F.softplus(decay.dt_bias)
    assert 1.0 <= a.min() < 2.0 and 15.0 < a.max() <= 16.0
    assert 0.001 - 1e-9 <= dt.min() < 0.002 and 0.05 < dt.max() <= 0.1 + 1e-9
    assert [id(p) for p in decay.init_keep()] == [id(decay.A_log), id(decay.dt_bias)]


@pytest.mark.parametrize(
    "name,decays",
    [
        ("gated_deltanet", ("head_decay",)),
        ("comba", ("head_decay",)),
        ("gated_deltaproduct", ("head_decay",)),
        ("cyfa", ("head_decay",)),
        ("precond_gated_deltanet", ("head_decay", "atk_decay")),
        ("momentum_deltanet", ("head_decay", "mu_decay")),
    ],
)
def test_gated_delta_family_shares_the_head_decay(name: str, decays: tuple[str, ...]) -> None:
    """Each of these layers owns the kit's HeadDecay (one init, one formula) and keeps its A_log/dt_bias."""
    layer = get_component("mixin", name)(32, 0, num_heads=2)
    keep = parameter_ids(layer.init_roles().keep)
    for attr in decays:
        decay = getattr(layer, attr)
        assert isinstance(decay, HeadDecay)
        assert {id(decay.A_log), id(decay.dt_bias)} <= keep and id(decay.a_proj.weight) not in keep
