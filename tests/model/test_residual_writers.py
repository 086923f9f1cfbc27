"""The declared residual writers are what the component returns (`model/roles.py`).

The linearity check of `test_init_roles.py` cannot tell the output projection from an earlier projection
the output is also linear in (attention is linear in `v_proj`). This check looks at the writers' outputs
instead, with forward hooks: zero a set of output channels of every declared writer (a module's forward
output; a parameter writer — stacked expert output weights [..., D] — in its last dimension) and the
component's output must be zero in exactly those channels and unchanged in the others. So every path into
the residual stream ends in a declared writer, channel for channel, and nothing after the writers mixes
channels or adds to them; an element-wise factor of the input (RWKV channel-mix's receptance gate,
r ⊙ out_proj(k)) is allowed, as it keeps the writer's zeros. A `v_proj` declared in place of the output
projection fails: its zeroed channels are mixed back into every output channel by the real one.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from archifactory.model.ffn.moe import MoE
from archifactory.model.mixins.base import Mixin, MixinState
from archifactory.model.positional import NoPositional, PositionContext
from archifactory.model.roles import InitRoles
from tests.model.test_contract import HIDDEN, build, perturb
from tests.model.test_init_roles import KINDS, run


def writers_masked(kind: str, module: nn.Module, ctx: PositionContext, x: Tensor, channels: Tensor) -> Tensor:
    """The output of a copy of `module` whose declared residual writers have `channels` zeroed: a module's
    forward output through a hook; a parameter in its last dimension; a Linear that is never called as a
    module (a hypernetwork generator whose weight is reshaped into the output matrix, hyper_moe's `gen_up`)
    in the rows of its output features laid out [..., D]."""
    module = copy.deepcopy(module)
    width = module.hidden_size
    writers = module.init_roles().residual
    called: set[int] = set()

    def mask(writer: nn.Module, _inputs: object, out: Tensor) -> Tensor:
        called.add(id(writer))
        return out.index_fill(-1, channels, 0.0)

    hooks = [w.register_forward_hook(mask) for w in writers if not isinstance(w, nn.Parameter)]
    with torch.no_grad():
        for writer in writers:
            if isinstance(writer, nn.Parameter):
                assert writer.shape[-1] == width, "a parameter writer's last dim is the output width"
                writer[..., channels] = 0.0
    try:
        y = run(kind, module, ctx, x)
        generators = [w for w in writers if not isinstance(w, nn.Parameter) and id(w) not in called]
        if not generators:
            return y
        with torch.no_grad():
            for writer in generators:
                assert isinstance(writer, nn.Linear) and writer.out_features % width == 0, (
                    f"declared residual writer {writer} is never called and is not a generator Linear"
                )
                rows = torch.arange(writer.out_features) % width
                selected = torch.isin(rows, channels)
                writer.weight[selected] = 0.0
                if writer.bias is not None:
                    writer.bias[selected] = 0.0
        return run(kind, module, ctx, x)
    finally:
        for hook in hooks:
            hook.remove()


def check_writers_are_the_output(kind: str, module: nn.Module, ctx: PositionContext) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 7, module.hidden_size, dtype=torch.float64)
    y = run(kind, module, ctx, x)
    masked, kept = torch.arange(0, module.hidden_size, 2), torch.arange(1, module.hidden_size, 2)
    # every masked channel is non-zero somewhere (a stick-breaking first token outputs exactly 0 by design)
    assert y[..., masked].abs().amax(dim=(0, 1)).min() > 0, "a masked channel is zero already (vacuous check)"
    y_masked = writers_masked(kind, module, ctx, x, masked)
    assert y_masked[..., masked].abs().max() == 0, (
        f"{kind}={module.registry_name}: zeroing channels of the declared residual writers' outputs leaves "
        "those channels of the output non-zero: the declared writers are not what the component returns"
    )
    torch.testing.assert_close(y_masked[..., kept], y[..., kept], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind,name", KINDS)
def test_declared_residual_writers_produce_the_output(kind: str, name: str) -> None:
    module, ctx = build(kind, name)
    check_writers_are_the_output(kind, module, ctx)


@pytest.mark.parametrize("options", [{"moe_every": 2}, {"num_shared_experts": 1}], ids=["dense", "shared"])
def test_moe_writers_in_its_dense_layers_and_with_shared_experts(options: dict[str, int]) -> None:
    """Module and parameter writers together (shared experts), and the dense layers of an interleaved MoE."""
    module = MoE(HIDDEN, layer_idx=0, num_experts=4, **options).double()
    perturb(module)
    check_writers_are_the_output("ffn", module, PositionContext(NoPositional(HIDDEN, 64), 0, 0))


class MisdeclaredAttention(Mixin):
    """A toy mixer whose output projection is renamed and whose `v_proj` is declared the residual writer
    (`declared` names it). The output is linear in `v_proj`, so the linearity check of
    test_init_roles.py passes it."""

    declared = "v_proj"

    def __init__(self, hidden_size: int, layer_idx: int) -> None:
        super().__init__(hidden_size, layer_idx)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(getattr(self, self.declared),))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        return {}

    def forward(self, x: Tensor, ctx: PositionContext, state: MixinState | None = None):
        return self.o_proj(self.v_proj(x).cumsum(1)), state

    def flops_per_token(self, seq_len: int) -> float:
        return 4.0 * self.hidden_size**2

    def state_size(self, seq_len: int) -> int:
        return 0


def test_a_misdeclared_value_projection_fails_the_check() -> None:
    module = MisdeclaredAttention(HIDDEN, 0).double()
    ctx = PositionContext(NoPositional(HIDDEN, 64), 0, 0)
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    y = run("mixin", module, ctx, x)
    with torch.no_grad():
        module.v_proj.weight.mul_(2.0)
    torch.testing.assert_close(run("mixin", module, ctx, x), 2 * y)  # the linearity check is fooled
    with pytest.raises(AssertionError, match="the declared writers are not what the component returns"):
        check_writers_are_the_output("mixin", module, ctx)
    module.declared = "o_proj"  # declared right, it passes
    check_writers_are_the_output("mixin", module, ctx)
