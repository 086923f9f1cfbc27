"""Test-only oracles: the token-by-token recurrences the chunked references and the mixins are held to.

Python loops over time, so slow by design; the package never calls them (its decode paths take one
`*_step` per token themselves).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from archifactory.model.mixins.reference.common import compute_dtype
from archifactory.model.mixins.reference.simple_gla import simple_gla_step


def recurrent(step: Callable, *args: Tensor | None, state: Tensor, scale: float | None = None):
    """Run a `*_step` token by token over [B, T, ...] inputs."""
    outputs = []
    for t in range(args[0].shape[1]):
        out, state = step(*(None if x is None else x[:, t] for x in args), state, scale)
        outputs.append(out)
    return torch.stack(outputs, dim=1), state


def recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Simple GLA token by token from `initial_state` (None = zeros), in the compute dtype."""
    batch, _, heads, key_dim = q.shape
    dtype = compute_dtype(q.dtype)
    state = q.new_zeros(batch, heads, key_dim, v.shape[-1], dtype=dtype)
    if initial_state is not None:
        state = initial_state.to(dtype)
    return recurrent(simple_gla_step, q, k, v, g, state=state, scale=scale)


def load_fla_naive(op: str):
    """fla's pure-PyTorch oracle file `fla/ops/<op>/naive.py` (e.g. 'comba', 'mesa_net'), loaded on its own:
    those files import only torch and einops, while `import fla.ops...` pulls in triton and every kernel
    (seconds). Skips the calling test when fla is not installed (shared notes/oracles.md, "Import").
    Imports are local so that this file stays append-only for parallel branches."""
    import importlib.util
    import pathlib

    import pytest

    spec = importlib.util.find_spec("fla")
    if spec is None or spec.origin is None:
        pytest.skip("fla is not installed")
    path = pathlib.Path(spec.origin).parent / "ops" / op / "naive.py"
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{op.replace('/', '_')}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def recurrent_diagonal(x: Tensor, g: Tensor, initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The element-wise recurrence h_t = exp(g_t) ⊙ h_{t-1} + x_t over x, g [B, T, D], token by token in
    the compute dtype (HGRN; Mamba's selective scan with D = d_inner · d_state). Returns (h [B, T, D], h_T)."""
    dtype = compute_dtype(x.dtype)
    state = (
        x.new_zeros(x.shape[0], x.shape[2], dtype=dtype) if initial_state is None else initial_state.to(dtype)
    )
    outputs = []
    for t in range(x.shape[1]):
        state = g[:, t].to(dtype).exp() * state + x[:, t].to(dtype)
        outputs.append(state)
    return torch.stack(outputs, dim=1), state
