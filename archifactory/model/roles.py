"""Init roles: how a component tells the model's init scheme (`model/init.py`) what its weights are.

Every mixin and FFN implements `init_roles()` (abstract in both base classes), so nothing is found by
attribute name: a mixin whose output projection is called `o_proj` declares it and gets the depth-scaled
init; one that declares nothing cannot be instantiated, and the contract suite checks that the
declaration is complete and true (`tests/model/test_init_roles.py`: zeroing the writers zeroes the output;
`tests/model/test_residual_writers.py`: the writers' outputs are what the component returns).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class InitRoles:
    """A component's init declaration.

    residual: what writes into the residual stream: `nn.Linear` modules (weight ~ N(0, (std/√(2·layers))²),
        bias 0) or plain parameters (stacked expert output weights [..., D], same std). Every path from
        the component's input to its output ends in one of them, channel for channel: zeroing output
        channel c of every writer (a module's forward output; a parameter's last dim; the rows of a Linear
        used as a weight generator, out_features laid out [..., D]) zeroes channel c of the output and
        nothing else, so nothing after the writers mixes or adds channels (an element-wise gate may
        follow, as RWKV channel-mix's receptance).
    matrices: plain parameters drawn like Linear weights, N(0, std²) (stacked expert input weights).
    keep: modules or parameters the component initialises itself (decays, gates, LoRA factors, convs,
        torch RNNs, zero-initialised adapters); the scheme never re-draws them, not even an `nn.Linear`.
        `keep` wins over `residual` (a zero-initialised adapter output is both).
    Linear and Embedding weights not named here get N(0, std²), biases 0; norm layers keep their ones
    and zeros. Any other parameter must be declared (the contract suite checks it).
    """

    residual: tuple[nn.Module | nn.Parameter, ...]
    matrices: tuple[nn.Parameter, ...] = ()
    keep: tuple[nn.Module | nn.Parameter, ...] = ()


def parameter_ids(items: Iterable[nn.Module | nn.Parameter]) -> set[int]:
    """ids of the parameters named by `items` (a module stands for all of its parameters)."""
    ids: set[int] = set()
    for item in items:
        if isinstance(item, nn.Parameter):
            ids.add(id(item))
        else:
            ids.update(id(p) for p in item.parameters())
    return ids


def own_parameters(module: nn.Module) -> tuple[nn.Parameter, ...]:
    """The parameters registered directly on `module` (not on its submodules): for components whose
    constructor draws each of its raw parameters itself (RWKV's mixes and decays, Mamba2's A_log, ...)."""
    return tuple(module.parameters(recurse=False))
