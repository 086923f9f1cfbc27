"""The mixin kit: what several mixins need, written once.

- head checks: `check_divisible` (head size of `num_heads` heads), `grouped_heads` (query heads sharing
  `num_kv_heads` key/value heads), `key_head_size` (an explicit `head_dim` or the hidden size's share),
  `value_heads` (value heads grouped on key heads, fla's GVA) and `scaled_width` (an `expand_*` width in
  whole heads), with one-line errors naming the options;
- per-head norms: `head_rms_norm` (ungated, gated after the norm as fla's `FusedRMSNormGated`, or gated
  before it as Mamba2's), `optional_head_norm` (an attention mixer's optional q/k norm) and
  `head_group_norm` (RWKV's per-head GroupNorm with a per-channel affine);
- `ShortConvolution`: the short causal depthwise convolution + SiLU with an explicit decode buffer;
- `HeadDecay`: Mamba2's per-head log-decay g = −exp(A_log)·softplus(a_proj x + dt_bias) of the gated
  delta-rule family, with its init (A ~ U[a_min, a_max], dt ~ log-U[0.001, 0.1] as softplus⁻¹) in one
  place (`inverse_softplus_dt`), and `low_rank_gate`, the low-rank output-gate projection;
- `append_cache`: the KV cache of the attention mixers (new keys appended to the cached ones);
- `token_shift`: RWKV's previous-token input, continuing from a decode buffer;
- padding: `zero_pads` / `fill_pads` make every pad position of a padded batch (`ctx.pad_mask`) an identity
  step of a recurrence — zero key/value/input contribution, zero log-decay (or a gate of 1), a zero input
  to every short convolution and token shift — so a left-padded row ends in exactly the state of the row
  run alone, and a right-padded row's real outputs are untouched;
- the fla loader: `fla_op` imports `fla.ops.<module>.<name>` once, and when it cannot it says why (fla
  not installed, or installed but failing to import, e.g. a broken triton) in one log line per op;
  `fla_backend` turns a `backend` option into the path a layer takes.

The norms take the gain (and bias) as tensors, not modules, so each mixin keeps its parameter names
(`norm_weight`, `norm_bias`) and its checkpoints load unchanged. Everything runs in at least fp32.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.mixins.base import resolve_backend
from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.short_conv import causal_depthwise_conv
from archifactory.model.positional import PositionContext

log = logging.getLogger(__name__)

GATE_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"swish": F.silu, "sigmoid": torch.sigmoid}


def check_divisible(hidden_size: int, num_heads: int, name: str) -> int:
    """Head size for `num_heads` heads, or a one-line error naming both numbers."""
    if num_heads <= 0 or hidden_size % num_heads:
        raise ArchiFactoryError(
            f"{name}: model.hidden_size={hidden_size} is not divisible by num_heads={num_heads}; "
            "choose a hidden size that is a multiple of the head count"
        )
    return hidden_size // num_heads


def grouped_heads(hidden_size: int, num_heads: int, num_kv_heads: int | None, name: str) -> tuple[int, int]:
    """(head size, key/value heads) for grouped-query attention: `num_kv_heads` None means one K/V head per
    query head (MHA), and it must divide `num_heads` (GQA; 1 is MQA)."""
    head_dim = check_divisible(hidden_size, num_heads, name)
    kv_heads = num_kv_heads or num_heads
    if num_heads % kv_heads:
        raise ArchiFactoryError(
            f"{name}: num_heads={num_heads} is not divisible by num_kv_heads={kv_heads}; "
            "pick num_kv_heads among the divisors of num_heads"
        )
    return head_dim, kv_heads


def scaled_width(hidden_size: int, expand: float, num_heads: int, name: str, what: str) -> int:
    """hidden_size · expand (a key or value width), checked to be a whole number of heads."""
    width = hidden_size * expand
    if not float(width).is_integer() or int(width) % num_heads or width < num_heads:
        raise ArchiFactoryError(
            f"{name}: {what}={expand} gives {width} channels for model.hidden_size={hidden_size}, not a whole "
            f"multiple of num_heads={num_heads}; pick {what} so that hidden_size·{what} divides into the heads"
        )
    return int(width)


def key_head_size(hidden_size: int, num_heads: int, head_dim: int | None, name: str) -> int:
    """d_k: `head_dim` when given (independent of the hidden size, as fla's and Qwen3-Next's layers),
    else hidden_size / num_heads."""
    if head_dim is None:
        return check_divisible(hidden_size, num_heads, name)
    if head_dim < 1 or num_heads < 1:
        raise ArchiFactoryError(
            f"{name}: head_dim={head_dim} with num_heads={num_heads}; use a positive head_dim and num_heads "
            "(or head_dim=null for hidden_size / num_heads)"
        )
    return head_dim


def value_heads(num_heads: int, num_v_heads: int | None, name: str) -> int:
    """H_v: `num_v_heads` (None: num_heads), a multiple of num_heads so each key head serves a whole group."""
    heads = num_heads if num_v_heads is None else num_v_heads
    if heads < num_heads or heads % num_heads:
        raise ArchiFactoryError(
            f"{name}: num_v_heads={heads} is not a multiple of num_heads={num_heads}; pick num_v_heads among "
            f"the multiples of num_heads ({num_heads}, {2 * num_heads}, ...) or null for one value head per "
            "key head"
        )
    return heads


def optional_head_norm(x: Tensor, weight: Tensor | None, eps: float) -> Tensor:
    """x [..., H, D] through an optional per-head RMSNorm (the q/k norms of the attention mixers; None: x
    itself), in x's shape and dtype."""
    return x if weight is None else head_rms_norm(x, weight, eps).view(x.shape).to(x.dtype)


def _per_head(weight: Tensor, x: Tensor) -> Tensor:
    """A gain of one head's width [V] or of every head's [H·V], shaped to broadcast over x [..., H, V]."""
    return weight.view(x.shape[-2:]) if weight.numel() != x.shape[-1] else weight


def head_rms_norm(
    x: Tensor,
    weight: Tensor,
    eps: float,
    gate: Tensor | None = None,
    gate_activation: str = "swish",
    gate_first: bool = False,
) -> Tensor:
    """RMSNorm of each head of x [..., H, V] (one group: pass [..., 1, D]) times `weight` ([V], shared by
    the heads, or [H·V]); with `gate` [..., H·V], times act(gate) after the norm, or with `gate_first`
    norm(x ⊙ act(gate)) (Mamba2's norm_before_gate=False). Returns [..., H·V] in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    x = x.to(dtype)
    act = None if gate is None else GATE_ACTIVATIONS[gate_activation](gate.to(dtype))
    if act is not None and gate_first:
        x = x * act.view(x.shape)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * _per_head(weight.to(dtype), x)
    normed = normed.flatten(-2)
    return normed * act if act is not None and not gate_first else normed


def head_group_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """GroupNorm with one group per head over x [..., H, V] (mean and variance per head), then the per-
    channel affine `weight`, `bias` ([H·V] or [V]). Returns [..., H·V] in the compute dtype."""
    dtype = compute_dtype(x.dtype)
    x = x.to(dtype)
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    normed = (x - mean) * torch.rsqrt(var + eps)
    return (normed * _per_head(weight.to(dtype), x) + _per_head(bias.to(dtype), x)).flatten(-2)


def append_cache(
    state: dict[str, Tensor] | None, dim: int, **fresh: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """Each of this call's tensors after its cached past along `dim` (the time axis): returns (the full
    tensors, the new state — the same tensors — or None without a state, the training path)."""
    if state is None:
        return fresh, None
    full = {name: torch.cat([state[name], tensor], dim=dim) for name, tensor in fresh.items()}
    return full, dict(full)


def _pad_mask_like(x: Tensor, ctx: PositionContext) -> Tensor | None:
    """ctx.pad_mask [B, T] shaped to broadcast over x [B, T, ...] (None: no padding in this call)."""
    if ctx.pad_mask is None:
        return None
    mask = ctx.pad_mask
    return mask.view(*mask.shape, *([1] * (x.dim() - mask.dim())))


def zero_pads(x: Tensor, ctx: PositionContext) -> Tensor:
    """x [B, T, ...] with every pad position set to 0 and no gradient through it: the identity input of a
    recurrence for keys, values, input gates, log-decays, short-convolution and token-shift inputs.
    Unchanged when the call has no padding."""
    mask = _pad_mask_like(x, ctx)
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def fill_pads(x: Tensor, ctx: PositionContext, value: float) -> Tensor:
    """x [B, T, ...] with every pad position set to `value` (e.g. a multiplicative decay gate of 1, a
    Mamba step size of 0); unchanged when the call has no padding."""
    mask = _pad_mask_like(x, ctx)
    return x if mask is None else torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))


def token_shift(x: Tensor, last: Tensor | None) -> Tensor:
    """x_{t-1} for every t of x [B, T, D]: before t = 0 the previous call's last token `last` [B, D]
    (decoding), or zeros (no state)."""
    prev = x.new_zeros(x.shape[0], x.shape[2]) if last is None else last.to(x.dtype)
    return torch.cat([prev[:, None], x[:, :-1]], dim=1)  # [B, T, D]


class ShortConvolution(nn.Module):
    """Causal depthwise conv1d (kernel `kernel_size`, optional bias) followed by SiLU, over x [B, T, C]:
    the q/k/v conv of the delta-rule and GLA layers, and Mamba2's conv over (x, B, C). `silu=False`
    leaves the convolution linear (fla's `activation=None`, e.g. CyFA's q/k/v convs).

    The decode buffer is the last `kernel_size - 1` raw inputs [B, C, kernel_size - 1] (zeros at the
    start), so conv(prefill) then conv(token) ... equals conv(whole sequence). Init: nn.Conv1d's default
    (weight Kaiming-uniform with a = √5, i.e. U(±1/√k) up to rounding; bias U(±1/√k)), which the model's
    init scheme keeps (declare the module in `init_roles().keep`)."""

    def __init__(self, channels: int, kernel_size: int, *, bias: bool = False, silu: bool = True) -> None:
        super().__init__()
        self.channels, self.kernel_size, self.silu = channels, kernel_size, silu
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # as nn.Conv1d.reset_parameters
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(kernel_size), 1 / math.sqrt(kernel_size))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The empty decode buffer [B, C, kernel_size - 1]."""
        return torch.zeros(batch_size, self.channels, self.kernel_size - 1, device=device, dtype=dtype)

    def forward(self, x: Tensor, buffer: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x [B, T, C] -> (SiLU(conv(x)) [B, T, C] (conv(x) without `silu`), the new buffer, or None when
        none was given)."""
        width = self.kernel_size - 1
        if buffer is None:
            past = x.new_zeros(x.shape[0], width, self.channels)
        else:
            past = buffer.transpose(1, 2).to(x.dtype)  # [B, width, C]
        out = causal_depthwise_conv(x, past, self.weight[:, 0], self.bias, self.silu)
        if buffer is None:
            return out, None
        recent = torch.cat([past, x[:, -width:]], dim=1)[:, -width:]  # the last `width` raw inputs
        return out, recent.transpose(1, 2).to(buffer.dtype)

    def flops_per_token(self) -> int:
        """Forward FLOPs per token (multiply-add = 2)."""
        return 2 * self.channels * self.kernel_size

    def state_size(self) -> int:
        """Elements of one sequence's buffer."""
        return self.channels * (self.kernel_size - 1)


def inverse_softplus_dt(size: int, dt_min: float = 0.001, dt_max: float = 0.1) -> Tensor:
    """Mamba's dt_bias init: dt ~ log-U[dt_min, dt_max] (floored at 1e-4), stored as softplus⁻¹(dt)."""
    dt = torch.exp(torch.rand(size) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(
        min=1e-4
    )
    return dt + torch.log(-torch.expm1(-dt))


class HeadDecay(nn.Module):
    """One scalar log-decay per head, Mamba2-parameterised (Gated DeltaNet and its relatives):
        g_t = −exp(A_log) · softplus(a_proj x_t + dt_bias)  ≤ 0,   α_t = exp(g_t).
    Init: A ~ U[a_range] per head (the papers' and fla's U[0, 16]; some layers use U[1, 16]),
    dt ~ log-U[0.001, 0.1] stored as softplus⁻¹(dt). `a_proj` is a plain Linear the model's init scheme
    draws; the owner keeps A_log and dt_bias through `init_keep` in its init roles."""

    def __init__(self, hidden_size: int, num_heads: int, a_range: tuple[float, float] = (0.0, 16.0)) -> None:
        super().__init__()
        self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
        self.A_log = nn.Parameter(torch.empty(num_heads).uniform_(*a_range).log())
        self.dt_bias = nn.Parameter(inverse_softplus_dt(num_heads))

    def init_keep(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(A_log, dt_bias): drawn here, for the owner's `InitRoles.keep`."""
        return self.A_log, self.dt_bias

    def forward(self, x: Tensor) -> Tensor:
        """x [B, T, D] -> g [B, T, H] in the compute dtype."""
        dtype = compute_dtype(x.dtype)
        dt = F.softplus(self.a_proj(x).to(dtype) + self.dt_bias.to(dtype))  # [B, T, H]
        return -torch.exp(self.A_log.to(dtype)) * dt


def low_rank_gate(hidden_size: int, rank: int, width: int) -> nn.Sequential:
    """A low-rank output-gate projection d -> rank (no bias) -> width (with a bias): KDA's and CyFA's."""
    return nn.Sequential(nn.Linear(hidden_size, rank, bias=False), nn.Linear(rank, width, bias=True))


@dataclass(frozen=True)
class KernelImport:
    """The outcome of importing one kernel: the callable, or None and why not."""

    kernel: Callable | None
    reason: str = ""


def import_kernel(module: str, name: str) -> KernelImport:
    """`module.name`, telling apart: the top-level package is not installed; it is installed but lacks
    `module` or `name` (an older version); importing it raises (a broken install, triton failing to
    initialise) — with the exception's text."""
    package = module.split(".")[0]
    if importlib.util.find_spec(package) is None:
        return KernelImport(None, f"{package} is not installed (pip install 'archifactory[fla]')")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing != package and (module + ".").startswith(missing + "."):  # fla.ops.kda in an older fla
            return KernelImport(None, f"{package} is installed but has no {missing} (upgrade {package})")
        return KernelImport(None, f"{package} is installed but importing {module} failed: {exc!r}")
    except Exception as exc:  # triton failing to initialise raises RuntimeError and friends
        return KernelImport(None, f"{package} is installed but importing {module} failed: {exc!r}")
    kernel = getattr(loaded, name, None)
    if kernel is None:
        return KernelImport(None, f"{module} has no {name} (upgrade {package})")
    return KernelImport(kernel)


@functools.cache
def fla_import(module: str, name: str) -> KernelImport:
    """fla's `fla.ops.<module>.<name>`, imported on first use (importing fla takes seconds and needs
    triton) and cached; when it cannot be had, one log line says why the fused path is unavailable."""
    result = import_kernel(f"fla.ops.{module}", name)
    if result.kernel is None:
        log.warning("fla.ops.%s.%s unavailable, the fused path is off: %s", module, name, result.reason)
    return result


def fla_op(module: str, name: str) -> Callable | None:
    """fla's kernel `fla.ops.<module>.<name>`, or None when it cannot be imported (see `fla_import`)."""
    return fla_import(module, name).kernel


def fla_backend(requested: str, weight: Tensor, op: tuple[str, str], name: str) -> str:
    """The path a layer whose parameters live where `weight` does takes for its `backend` option: the
    fused fla kernel `op` = (module, name) when `weight` is on CUDA and the kernel imports, else the
    reference (`backend=fused` refuses, naming why). fla is never imported for CPU layers."""
    fused_ok = weight.is_cuda and fla_op(*op) is not None
    if requested == "fused" and weight.is_cuda and not fused_ok:
        reason = fla_import(*op).reason
        raise ArchiFactoryError(
            f"{name}: backend=fused is unavailable: {reason}; use mixin.backend=reference"
        )
    return resolve_backend(requested, fused_ok, name)
