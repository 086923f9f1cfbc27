"""Generated layer weights (`model.weights=hyper`): the "Recurrent Hyper Transformer".

The seed plans a "Recurrent Hyper Transformer" but its design was never published; this module is our
interpretation, built on HyperNetworks (Ha, Dai & Le, "HyperNetworks", 2016, arXiv:1609.09106): a small
recurrent network runs over depth and generates each layer's weights from one shared set, as Ha et al.'s
HyperRNN generates an RNN's weights step by step (their weight-scaling form, §3.2: the generated weight
is a learned row scaling of a static one).

- All layers share one set of base parameters: layer 0's mixin and FFN (every layer must have the same
  mixin and FFN config; a hybrid stack is refused). The blocks' norms, residual connections and
  value-residual gates stay per layer.
- A GRU (Cho et al. 2014; `nn.GRUCell`) runs over depth: its input at layer l is a learned embedding
  e_l (`model.hyper.embed_dim`), its state h_l (`model.hyper.hidden`), h_0 = GRU(e_0, 0).
- For every `nn.Linear` weight W [out, in] of the mixin and the FFN (projections, LoRA factors, the
  router; not convolutions, decays, norms or stacked expert tensors, which are shared as they are)
  a linear head P_W emits a per-row scaling d_l = P_W h_l [out], and layer l computes with

      W_l = diag(1 + d_l) · W_base

  P_W is initialised to zero, so at init every layer computes with the base weights exactly (a model
  whose every layer holds layer 0's mixin and FFN).
- The scalings are generated once per model forward (one GRU pass over the L layers, in fp32), not per
  token; every layer then runs with its weights swapped in (`torch.func.functional_call`, which Dynamo
  traces). Decoding regenerates them at every call: the same weights, so decode == full forward.
  Masking and padding are untouched (only weights change).

Parameters (`parameter_breakdown()["hyper"]`): the embeddings L·E, the GRU 3H(E + H) + 6H and the heads
H · Σ out (over the generated weights); the base is counted once, in `mixin` and `ffn`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.value_residual import ValueResidual

SUBLAYERS = ("mixin", "ffn")
EMBED_DIM, HIDDEN = 16, 64  # model.hyper's defaults (config/schema.py HyperConfig)


@dataclass(frozen=True)
class GeneratedWeight:
    """One generated weight: its name in a block (`mixin.q_proj.weight`) and its shape [out, in]."""

    name: str
    rows: int
    columns: int


def per_layer(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of a mixin or FFN that stay per layer under sharing: the value-residual gates."""
    return [p for sub in module.modules() if isinstance(sub, ValueResidual) for p in sub.parameters()]


def generated_weights(module: nn.Module, prefix: str) -> list[GeneratedWeight]:
    """Every `nn.Linear` weight of a mixin or FFN (`prefix`: its name in the block), outside the
    value-residual gates: the weights the hypernetwork scales."""
    skip = {id(p) for p in per_layer(module)}
    return [
        GeneratedWeight(f"{prefix}.{name}.weight", sub.out_features, sub.in_features)
        for name, sub in module.named_modules()
        if isinstance(sub, nn.Linear) and id(sub.weight) not in skip
    ]


def shared_names(block: nn.Module) -> list[str]:
    """Names (in the block) of the mixin's and FFN's parameters every layer shares: all but the gates."""
    names = []
    for prefix in SUBLAYERS:
        module = getattr(block, prefix)
        skip = {id(p) for p in per_layer(module)}
        names += [f"{prefix}.{name}" for name, p in module.named_parameters() if id(p) not in skip]
    return names


class DepthRecurrence(nn.Module):
    """The GRU over depth: a learned embedding e_l per layer (N(0, 1)) in, the state h_l [hidden] out."""

    def __init__(self, num_layers: int, embed_dim: int, hidden: int) -> None:
        super().__init__()
        if embed_dim < 1 or hidden < 1:
            raise ValueError(
                f"model.hyper.embed_dim={embed_dim} and model.hyper.hidden={hidden} must be >= 1"
            )
        self.hidden = hidden
        self.embeddings = nn.Parameter(torch.randn(num_layers, embed_dim))
        self.cell = nn.GRUCell(embed_dim, hidden)  # torch's init: U(±1/√hidden)

    def forward(self) -> Tensor:
        """h_l for every layer, [L, hidden]."""
        h = self.embeddings.new_zeros(self.hidden)
        states = []
        for e in self.embeddings.unbind(0):  # L is a Python int: unrolled under compile
            h = self.cell(e, h)
            states.append(h)
        return torch.stack(states)

    def flops(self) -> float:
        """Forward FLOPs of one pass over depth: the six gate projections per layer (not the element-wise
        gate arithmetic)."""
        layers, embed = self.embeddings.shape
        return float(layers * 2 * 3 * self.hidden * (embed + self.hidden))


class HyperWeights(nn.Module):
    """`model.weights=hyper` (module docstring): generates every layer's weights from `blocks[0]`'s.

    Built after the model's init; it checks that every block's mixin and FFN have layer 0's parameter
    names and shapes, removes the shared ones from blocks 1…L−1 (they live once, in block 0), and at each
    forward `layer_weights(blocks[0])` returns, per layer, the tensors that stand in for the block's
    parameters of those names.
    """

    def __init__(self, blocks: nn.ModuleList, embed_dim: int = EMBED_DIM, hidden: int = HIDDEN) -> None:
        super().__init__()
        check_uniform(blocks)
        template = blocks[0]
        self.generated = [
            w for prefix in SUBLAYERS for w in generated_weights(getattr(template, prefix), prefix)
        ]
        names = {w.name for w in self.generated}
        self.shared = [name for name in shared_names(template) if name not in names]
        self.depth = DepthRecurrence(len(blocks), embed_dim, hidden)
        self.heads = nn.Linear(hidden, sum(w.rows for w in self.generated), bias=False)  # [P_W; …]
        nn.init.zeros_(self.heads.weight)  # every layer starts as the base
        for block in list(blocks)[1:]:
            for name in shared_names(block):
                path, _, leaf = name.rpartition(".")
                del block.get_submodule(path)._parameters[leaf]

    def scales(self) -> Tensor:
        """d_l for every layer, [L, Σ rows] (the generated weights' rows in order), in fp32."""
        device = self.heads.weight.device.type
        # autocast off (a bf16 run still generates in fp32); the meta device (plan, matching) has none
        fp32 = (
            torch.autocast(device, enabled=False)
            if torch.amp.is_autocast_available(device)
            else nullcontext()
        )
        with fp32:
            return self.heads(self.depth())

    def layer_weights(self, base: nn.Module) -> list[dict[str, Tensor]]:
        """Per layer, the tensors (by parameter name in a block) it computes with: W_l = diag(1 + d_l) W
        for the generated weights, the shared base parameters for the rest (layer 0 holds those)."""
        params = dict(base.named_parameters())
        layers = []
        for index, row in enumerate(self.scales().unbind(0)):
            weights = {} if index == 0 else {name: params[name] for name in self.shared}
            for spec, scale in zip(self.generated, row.split([w.rows for w in self.generated])):
                weight = params[spec.name]
                weights[spec.name] = (1 + scale).to(weight.dtype).unsqueeze(-1) * weight  # [out, in]
            layers.append(weights)
        return layers

    def flops(self) -> float:
        """Forward FLOPs of one generation: the GRU pass, the heads and the row scalings of every layer."""
        layers = self.depth.embeddings.shape[0]
        rows = sum(w.rows for w in self.generated)
        scaled = sum(w.rows * w.columns for w in self.generated)
        return self.depth.flops() + layers * (2 * self.depth.hidden * rows + scaled)


def check_uniform(blocks: nn.ModuleList) -> None:
    """Refuse (one line) a stack whose layers do not all have layer 0's mixin and FFN parameters."""

    def layout(block: nn.Module) -> list[tuple]:
        kinds = [type(getattr(block, prefix)).__name__ for prefix in SUBLAYERS]
        shapes = {name: tuple(p.shape) for name, p in block.named_parameters()}
        return [*kinds, *((name, shapes[name]) for name in shared_names(block))]

    first = layout(blocks[0])
    for index, block in enumerate(blocks):
        if layout(block) != first:
            raise ArchiFactoryError(
                f"model.weights=hyper generates every layer's weights from layer 0's mixin and FFN, but layer "
                f"{index} ({block.mixin.registry_name}/{block.ffn.registry_name}) differs from layer 0 "
                f"({blocks[0].mixin.registry_name}/{blocks[0].ffn.registry_name}); use one mixin and FFN config "
                "for every layer (no model.layer_pattern / model.attention_every) or model.weights=standard"
            )
