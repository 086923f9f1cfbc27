"""Init roles (docs/architecture.md, "The component contract"): every component declares what writes into the
residual stream and what it initialises itself, and the init scheme follows the declaration, never attribute names.

Parametrized over every registered mixin and FFN, so a new component is checked with no edit here:
- it declares at least one residual projection, and only its own parameters;
- the declaration is complete: zeroing the declared residual writers zeroes the output, so no path into
  the residual stream escapes the depth-scaled init;
- every parameter the scheme would not draw (not in a Linear, Embedding or norm) is declared;
- through the model, residual writers get std/√(2·layers), and declared `keep` parameters are untouched.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from archifactory.core.registry import components
from archifactory.model.components import component_factory
from archifactory.model.ffn.swiglu import SwiGLU
from archifactory.model.init import init_weights
from archifactory.model.mixins.base import Mixin, MixinState
from archifactory.model.norms import RMSNorm
from archifactory.model.positional import PositionContext
from archifactory.model.roles import InitRoles, parameter_ids
from archifactory.model.stack import StackedMixinForCausalLM
from tests.helpers import compose_config
from tests.model.test_contract import HIDDEN, build

NORMS = (RMSNorm, nn.LayerNorm, nn.GroupNorm)
KINDS = [("mixin", name) for name in sorted(components("mixin"))] + [
    ("ffn", name) for name in sorted(components("ffn"))
]


def run(kind: str, module: nn.Module, ctx: PositionContext, x: Tensor) -> Tensor:
    if kind == "mixin":
        return module(x, PositionContext(ctx.scheme, 0, x.shape[1]))[0]
    return module(x)[0]


@pytest.mark.parametrize("kind,name", KINDS)
def test_roles_are_declared_and_belong_to_the_component(kind: str, name: str) -> None:
    module, _ = build(kind, name)
    roles = module.init_roles()
    assert roles.residual, f"{kind}={name} declares no residual projection"
    own = parameter_ids([module])
    for role in ("residual", "matrices", "keep"):
        declared = parameter_ids(getattr(roles, role))
        assert declared <= own, f"{kind}={name}: {role} names parameters it does not own"
    for item in roles.residual:
        assert isinstance(item, (nn.Linear, nn.Parameter)), f"{kind}={name}: residual {type(item).__name__}"


@pytest.mark.parametrize("kind,name", KINDS)
def test_declared_residual_writers_are_the_last_step_of_every_output_path(kind: str, name: str) -> None:
    """The output is linear in the declared writers: scaling them by c scales the output by c (c = 2
    and c = 0). A projection earlier in the component (q/k/v) fails this; so does an undeclared path."""
    module, ctx = build(kind, name)
    x = torch.randn(2, 7, HIDDEN, dtype=torch.float64)
    y = run(kind, module, ctx, x)
    assert y.abs().max() > 0
    writers = [p for p in module.parameters() if id(p) in parameter_ids(module.init_roles().residual)]
    with torch.no_grad():
        for param in writers:  # a Linear stands for its weight and bias
            param.mul_(2.0)
    torch.testing.assert_close(run(kind, module, ctx, x), 2.0 * y, rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        for param in writers:
            param.zero_()
    assert run(kind, module, ctx, x).abs().max() == 0, f"{kind}={name}: an undeclared path reaches the output"


@pytest.mark.parametrize("kind,name", KINDS)
def test_every_parameter_outside_linear_embedding_and_norms_is_declared(kind: str, name: str) -> None:
    module, _ = build(kind, name)
    roles = module.init_roles()
    declared = parameter_ids(roles.residual) | parameter_ids(roles.matrices) | parameter_ids(roles.keep)
    for sub_name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Embedding, *NORMS)):
            continue
        for param_name, param in sub.named_parameters(recurse=False):
            assert id(param) in declared, (
                f"{kind}={name}: {sub_name}.{param_name} is initialised by nobody: declare it in init_roles"
            )


@pytest.mark.parametrize("kind,name", KINDS)
def test_the_model_init_follows_the_declaration(kind: str, name: str) -> None:
    cfg = compose_config([f"{kind}={name}", f"model.hidden_size={HIDDEN}", "model.num_heads=4"])
    module = component_factory(kind, cfg[kind], HIDDEN)(layer_idx=1)
    roles = module.init_roles()
    kept = {id(p): p.detach().clone() for p in module.parameters() if id(p) in parameter_ids(roles.keep)}
    init_weights(module, initializer_range=0.02, num_layers=8)
    for param in module.parameters():
        if id(param) in kept:
            assert torch.equal(param, kept[id(param)]), f"{kind}={name}: a kept parameter was re-drawn"
    residual = [p for p in module.parameters() if id(p) in parameter_ids(roles.residual)]
    weights = [p for p in residual if p.dim() >= 2 and id(p) not in kept]
    for weight in weights:
        assert weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.15), f"{kind}={name}"


class RenamedAttention(Mixin):
    """A toy mixin whose output projection is called `o_proj` (the Hugging Face name): it gets the
    depth-scaled init because it declares it, not because of its name."""

    def __init__(self, hidden_size: int, layer_idx: int) -> None:
        super().__init__(hidden_size, layer_idx)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def init_roles(self) -> InitRoles:
        return InitRoles(residual=(self.o_proj,))

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> MixinState:
        return {}

    def forward(self, x: Tensor, ctx: PositionContext, state: MixinState | None = None):
        return self.o_proj(self.v_proj(x).cumsum(1)), state

    def flops_per_token(self, seq_len: int) -> float:
        return 4.0 * self.hidden_size**2

    def state_size(self, seq_len: int) -> int:
        return 0


def test_a_renamed_output_projection_is_depth_scaled() -> None:
    model = StackedMixinForCausalLM(
        num_layers=8,
        hidden_size=256,
        vocab_size=64,
        mixin_module=lambda layer_idx: RenamedAttention(256, layer_idx),
        ffn_module=lambda layer_idx: SwiGLU(256, layer_idx),
    )
    block = model.blocks[3]
    assert block.mixin.o_proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.mixin.v_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_a_component_without_a_declaration_cannot_be_built() -> None:
    class Undeclared(Mixin):
        def init_state(self, batch_size, device, dtype):
            return {}

        def forward(self, x, ctx, state=None):
            return x, state

        def flops_per_token(self, seq_len):
            return 0.0

        def state_size(self, seq_len):
            return 0

    with pytest.raises(TypeError, match="init_roles"):
        Undeclared(16, 0)
