"""Parameter matching: size every variant of a sweep to the same non-embedding parameter count.

`model.target_params=N` (an int, `30M`, `3e7`, `1.5B`, `250k`) asks for N non-embedding parameters
(blocks + final norm: `parameter_breakdown()["non_embedding"]`, every MoE expert included) within
`model.match_tolerance` (default ±1%). `model.match` picks the coarse knob:

- `width` (default): the hidden size, on the grid of multiples of `model.num_heads` (head
  divisibility); shapes a component refuses (e.g. mamba2's `expand · hidden % head_dim`) are skipped,
  and FFN widths are counted after their `multiple_of` rounding, because every count comes from
  building the real modules (on PyTorch's meta device: no memory, no init cost).
- `layers`: the depth at the configured hidden size.

When the closest coarse shape misses the tolerance (small models: one grid step can be worth several
percent), a fine knob closes the gap, as Llama's `multiple_of` does: the FFN's hidden size (MoE: each
expert's), in steps of `model.match_multiple_of` (default 16), between half and twice its configured
width, re-solved on the coarse shapes around the target (the bracket and two grid steps either side,
since one step of the FFN can be worth more than the tolerance). Among the shapes that land, the one
whose FFN moves least wins. The FFN's width is written as `ffn.multiple_of=<step>` and an
`ffn.intermediate_multiplier` that rounds up to exactly that width (every FFN sizes itself as
multiplier x hidden rounded up to `multiple_of`), so a saved config rebuilds it. Failing that, the
mixin's own expansion where it declares one (`Mixin.match_option`: mamba2's `d_state`, lstm/rnn
`inner_size`, mla `kv_lora_rank`); with `match=layers`, the hidden size near the configured one. If
nothing lands within the tolerance the run stops with one line naming the closest shapes.
The resolved shape is written into the run's config, so a run dir rebuilds exactly what trained.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from archifactory.config.hybrid import pattern_entries
from archifactory.config.schema import component_options
from archifactory.core.errors import ArchiFactoryError
from archifactory.core.registry import get_component
from archifactory.model.block import Block
from archifactory.model.components import (
    ComponentSpec,
    build_positional,
    component_factory,
    component_spec,
    layer_mixin_specs,
    layers_factory,
)
from archifactory.model.ffn.base import intermediate_size
from archifactory.model.hyper_weights import DepthRecurrence, generated_weights, per_layer
from archifactory.model.norms import build_norm
from archifactory.model.positional import PositionContext
from archifactory.model.stack import hyper_options, residual_config
from archifactory.model.value_residual import attach_value_residual

MATCH_MODES = ("width", "layers")
# FFN parameter counts by (FFN config, sequence length, hypernetwork, hidden size, depth, FFN width): the same
# for every mixin, so `list --params` (every mixin x FFN) and the variants of a sweep count each FFN shape
# once per process (the FFN's builds were ~40% of matching every mixin with moe)
_FFN_COUNTS: dict[tuple, int | None] = {}
# The mixins' counts by (every layer's mixin class and options, sequence length, value residual, hypernetwork,
# hidden size, depth): the same under every FFN, so the FFNs of `list --params` and of a sweep share them
_MIXIN_COUNTS: dict[tuple, int | None] = {}
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


def parse_count(value: int | float | str) -> int:
    """`30M` / `3e7` / `1.5B` / `250k` / 30000000 -> an int; anything else is a one-line error."""
    if isinstance(value, bool):
        raise ArchiFactoryError(f"model.target_params={value!r} is not a parameter count")
    if isinstance(value, (int, float)):
        count = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbg]?)\s*", str(value).lower())
        if not match:
            raise ArchiFactoryError(
                f"model.target_params={value!r} is not a parameter count; write e.g. 30M, 3e7 or 30000000"
            )
        count = float(match.group(1)) * _SUFFIXES.get(match.group(2), 1.0)
    if count < 1:
        raise ArchiFactoryError(f"model.target_params={value!r} must be a positive parameter count")
    return int(round(count))


@dataclass
class Shape:
    """One candidate: hidden size, depth and the mixin options the solver set."""

    hidden_size: int
    num_layers: int
    mixin_options: dict[str, int] = field(default_factory=dict)
    ffn_hidden: int | None = None  # the FFN's (MoE: each expert's) hidden size; None = as configured
    ffn_step: int = 16  # the multiple of which `ffn_hidden` is (the FFN's `multiple_of` then)

    def describe(self) -> str:
        extra = "".join(f", mixin.{key}={value}" for key, value in self.mixin_options.items())
        ffn = "" if self.ffn_hidden is None else f", ffn hidden={self.ffn_hidden} (step {self.ffn_step})"
        return f"hidden_size={self.hidden_size}, num_layers={self.num_layers}{extra}{ffn}"


@dataclass
class MatchResult:
    target: int
    achieved: int
    match: str
    shape: Shape
    tolerance: float
    ffn_hidden_size: int | None = None  # the FFN's (MoE: each expert's) hidden size in the solved shape

    @property
    def error(self) -> float:
        """Relative error of the achieved count: achieved / target - 1."""
        return self.achieved / self.target - 1.0

    def summary(self) -> dict[str, Any]:
        """The keys a run's summary.json records."""
        return {
            "target_params": self.target,
            "params_match": {
                "match": self.match,
                "achieved": self.achieved,
                "error": self.error,
                "tolerance": self.tolerance,
                "hidden_size": self.shape.hidden_size,
                "num_layers": self.shape.num_layers,
                "ffn_hidden_size": self.ffn_hidden_size,
                **{f"mixin.{k}": v for k, v in self.shape.mixin_options.items()},
            },
        }


def ffn_options(shape: Shape) -> dict[str, Any]:
    """The FFN options that size it `shape.ffn_hidden` wide: `multiple_of` = its step and a multiplier
    half a step below that width, so that `multiplier x hidden` rounded up to the step is exactly it (the
    half step keeps float rounding away from the boundary). Empty when the shape keeps the FFN as set."""
    if shape.ffn_hidden is None:
        return {}
    step = shape.ffn_step
    return {"multiple_of": step, "intermediate_multiplier": (shape.ffn_hidden - step / 2) / shape.hidden_size}


Candidate = tuple[Shape, int]  # a shape a component accepts and its non-embedding count


class Counter:
    """Non-embedding parameter counts of one config at any shape, memoised; None = a refused shape.

    Layers are built by the same factories as `build_model` (hybrid patterns included); a shape's
    `ffn_hidden` reaches the FFN as the options `ffn_options` returns. A grid point
    that the mixin refuses only because of its per-head size (mamba2: `expand · hidden` must be a
    multiple of `head_dim`) is retried with the nearest per-head sizes (multiples of 8 within half to
    twice the configured one), as attention's head size follows the hidden size. Hybrid stacks get no
    per-mixin knobs: only the hidden size or the depth moves.
    """

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        hybrid = pattern_entries(cfg) is not None
        mixin_cls = get_component("mixin", cfg.mixin.name)
        self.match_option: str | None = None if hybrid else mixin_cls.match_option
        self.head_option: str | None = None if hybrid else mixin_cls.match_head_option
        self.mixin_options = component_options(cfg.mixin)
        ffn = cfg.ffn
        sized = "intermediate_multiplier" in ffn and "multiple_of" in ffn
        self.ffn_rule: tuple[float, int] | None = (
            (float(ffn.intermediate_multiplier), int(ffn.multiple_of)) if sized else None
        )
        self.ffn_step = int(cfg.model.get("match_multiple_of", 16))
        self.num_heads = int(cfg.model.num_heads)
        # model.weights=hyper: (embed_dim, hidden) of the hypernetwork; None = every layer stores its weights
        hyper = hyper_options(cfg.model)
        generated = str(cfg.model.get("weights", "standard")) == "hyper"
        self.hyper = (hyper["hyper_embed_dim"], hyper["hyper_hidden"]) if generated else None
        self.value_residual = bool(cfg.model.get("value_residual", False))
        self._cache: dict[tuple, int | None] = {}
        # ("residual", hidden, layers) -> the residual connections' count
        self._parts: dict[tuple, int | None] = {}
        # (depth, mixin options) -> what the mixins' count (`_MIXIN_COUNTS`) depends on besides the width
        self._mixin_identities: dict[tuple, tuple] = {}
        self._configs: dict[tuple, DictConfig] = {}
        self._spec_cache: dict[tuple, tuple[list[ComponentSpec], ComponentSpec]] = {}
        self.max_seq_len = int(cfg.model.max_seq_len)
        # what else an FFN's count (`_FFN_COUNTS`) depends on: its name and options, the length, the hypernetwork
        self._ffn_identity = (
            ffn.name,
            repr(sorted(component_options(ffn).items())),
            self.max_seq_len,
            self.hyper,
        )

    def __call__(self, shape: Shape) -> Candidate | None:
        count = self.count(shape)
        if count is not None or self.head_option is None or self.head_option in shape.mixin_options:
            return None if count is None else (shape, count)
        configured = int(self.mixin_options[self.head_option])
        sizes = range(max(8, configured // 2), 2 * configured + 1, 8)
        for size in sorted(sizes, key=lambda v: (abs(v - configured), -v)):
            options = shape.mixin_options | {self.head_option: size}
            retry = Shape(shape.hidden_size, shape.num_layers, options, shape.ffn_hidden, shape.ffn_step)
            count = self.count(retry)
            if count is not None:
                return retry, count
        return None

    def _key(self, shape: Shape) -> tuple:
        return (
            shape.hidden_size,
            shape.num_layers,
            tuple(sorted(shape.mixin_options.items())),
            shape.ffn_hidden,
        )

    def configured_ffn_hidden(self, hidden_size: int) -> int | None:
        """The FFN's hidden size at this width by its own rule (None: the FFN has no such rule)."""
        if self.ffn_rule is None:
            return None
        return intermediate_size(hidden_size, *self.ffn_rule)

    def _layer_config(self, shape: Shape) -> DictConfig:
        """The config with the solver's depth and mixin options (a hybrid pattern is laid out over
        `model.num_layers`), memoised."""
        key = (shape.num_layers, tuple(sorted(shape.mixin_options.items())))
        if key not in self._configs:
            cfg = copy.deepcopy(self.cfg)
            with open_dict(cfg):
                cfg.model.num_layers = shape.num_layers
                for option, value in key[1]:
                    cfg.mixin[option] = value
            self._configs[key] = cfg
        return self._configs[key]

    def _specs(self, shape: Shape) -> tuple[list[ComponentSpec], ComponentSpec]:
        """Each layer's mixin and the FFN under the shape's depth and mixin options, read from the config
        once per such pair (the widths tried share them)."""
        key = (shape.num_layers, tuple(sorted(shape.mixin_options.items())))
        if key not in self._spec_cache:
            cfg = self._layer_config(shape)
            self._spec_cache[key] = (layer_mixin_specs(cfg), component_spec("ffn", cfg.ffn))
        return self._spec_cache[key]

    def _factories(self, shape: Shape, kinds: tuple[int, ...] = (0, 1)) -> list[Callable]:
        """The mixin (kind 0) and FFN (kind 1) factories at this shape; the FFN's at the shape's width."""
        mixins, ffn = self._specs(shape)
        dims = (shape.hidden_size, shape.num_layers, self.max_seq_len)
        factories: list[Callable] = []
        for kind in kinds:
            if kind == 0:
                factories.append(layers_factory(mixins, *dims))
            else:
                factories.append(functools.partial(ffn.factory(*dims), **ffn_options(shape)))
        return factories

    def count(self, shape: Shape) -> int | None:
        key = self._key(shape)
        if key not in self._cache:
            self._cache[key] = self._count(shape)
        return self._cache[key]

    def _count(self, shape: Shape) -> int | None:
        """Blocks (mixin + FFN + the two pre-norms) and the final norm. The mixins and the FFNs are counted
        apart and memoised apart, so the FFN knob rebuilds only FFNs."""
        hidden, layers = shape.hidden_size, shape.num_layers
        if hidden <= 0 or layers <= 0 or hidden % self.num_heads:
            return None  # build_model refuses a hidden size that is not a multiple of model.num_heads
        mixin_key = (*self._mixin_identity(shape), hidden, layers)
        ffn_key = (*self._ffn_identity, hidden, layers, shape.ffn_hidden)
        for parts, key, kind in ((_MIXIN_COUNTS, mixin_key, 0), (_FFN_COUNTS, ffn_key, 1)):
            if key not in parts:
                parts[key] = self._count_part(shape, kind)
        mixins, ffns = _MIXIN_COUNTS[mixin_key], _FFN_COUNTS[ffn_key]
        if mixins is None or ffns is None:
            return None
        model = self.cfg.model
        with torch.device("meta"):
            norm = sum(p.numel() for p in build_norm(model.norm, hidden, model.norm_eps).parameters())
        total = mixins + ffns + (2 * layers + 1) * norm + self._residual_count(hidden, layers)
        return total + self._hyper_count(layers)

    def _mixin_identity(self, shape: Shape) -> tuple:
        """Every layer's mixin class and options at the shape's depth and mixin options (a hybrid pattern laid
        out), the length, the value residual and the hypernetwork: with the width, all a mixin count reads."""
        key = (shape.num_layers, tuple(sorted(shape.mixin_options.items())))
        if key not in self._mixin_identities:
            mixins, _ = self._specs(shape)
            layers = repr([(spec.cls, sorted(spec.options.items())) for spec in mixins])
            self._mixin_identities[key] = (layers, self.max_seq_len, self.value_residual, self.hyper)
        return self._mixin_identities[key]

    def _count_part(self, shape: Shape, kind: int) -> int | None:
        """Parameters of every layer's mixin (kind 0, with its value-residual gate under
        model.value_residual) or FFN (kind 1); None = the component refuses. Under model.weights=hyper
        layer 0's are the shared base, the other layers keep only their gates, and the hypernetwork's
        heads add hidden × (rows of every generated weight)."""
        try:
            (factory,) = self._factories(shape, (kind,))
            with torch.device("meta"):  # shapes only: nothing is allocated or initialised
                modules = [factory(layer_idx=i) for i in range(shape.num_layers)]
        except (ArchiFactoryError, ValueError, RuntimeError):
            return None  # a component's divisibility rule refuses this shape
        if kind == 0 and self.value_residual:
            with torch.device("meta"):  # a model with no value-declaring layer is refused here in one line
                attach_value_residual(modules, [m.registry_name for m in modules])
        if self.hyper is None:
            return sum(p.numel() for m in modules for p in m.parameters())
        heads = self.hyper[1] * sum(w.rows for w in generated_weights(modules[0], "part"))
        base = sum(p.numel() for p in modules[0].parameters())
        return base + sum(p.numel() for m in modules[1:] for p in per_layer(m)) + heads

    def _hyper_count(self, layers: int) -> int:
        """The hypernetwork's embeddings and GRU under model.weights=hyper (its heads are counted with the
        parts they scale), as `param_breakdown` counts them; 0 otherwise."""
        if self.hyper is None:
            return 0
        with torch.device("meta"):
            return sum(p.numel() for p in DepthRecurrence(layers, *self.hyper).parameters())

    def _residual_count(self, hidden: int, layers: int) -> int:
        """The residual connections around every block's mixin and FFN (hyper-connections' and mHC's
        weights; 0 for the standard residual), as `StackedMixinForCausalLM.param_breakdown` counts them."""
        key = ("residual", hidden, layers)
        if key not in self._parts:
            factory = component_factory("residual", residual_config(self.cfg), hidden)
            with torch.device("meta"):
                self._parts[key] = sum(
                    p.numel()
                    for i in range(layers)
                    for j in (0, 1)
                    for p in factory(layer_idx=i, sublayer=j).parameters()
                )
        return self._parts[key]

    def runs(self, shape: Shape) -> bool:
        """Some rules are checked only in forward (rope needs an even head size): one meta-device forward
        of two tokens through each distinct first block. A refused shape is dropped from the counts, so
        the next search skips it. Ops that cannot run on meta (data-dependent MoE routing) do not refuse
        a shape."""
        hidden, model = shape.hidden_size, self.cfg.model
        try:
            mixin, ffn = self._factories(shape)
            with torch.device("meta"):
                positional = build_positional(self.cfg.positional, hidden, int(model.max_seq_len))
                seen = set()
                for layer_idx in range(shape.num_layers):
                    block = Block(
                        mixin(layer_idx=layer_idx), ffn(layer_idx=layer_idx), hidden, model.norm, 1e-5
                    )
                    kind = (type(block.mixin), type(block.ffn))
                    if kind in seen:
                        continue
                    seen.add(kind)
                    block(torch.empty(1, 2, hidden), PositionContext(positional, 0, 2, torch.device("meta")))
        except ArchiFactoryError:
            self._cache[self._key(shape)] = None
            return False
        except Exception:  # noqa: BLE001  unverifiable on the meta device, not refused
            return True
        return True


def _closest_pair(
    at: Callable[[int], Candidate | None], target: int, lo: int, hi: int
) -> tuple[Candidate | None, Candidate | None]:
    """Over integer knob values k in [lo, hi] whose counts never decrease with k (refused values are
    skipped): the last accepted candidate below the target and the first at or above it."""

    def first_valid(start: int, stop: int) -> tuple[int, Candidate] | None:
        # components refuse some grid points (divisibility): scan up to the next accepted one
        for k in range(max(start, lo), min(stop, hi + 1)):
            candidate = at(k)
            if candidate is not None:
                return k, candidate
        return None

    below: tuple[int, Candidate] | None = None
    k = lo
    while True:  # exponential search for a value at or above the target
        probe = first_valid(k, k + 256)
        if probe is None:
            return (below[1] if below else None), None
        if probe[1][1] >= target:
            above = probe
            break
        below = probe
        k = max(probe[0] + 1, probe[0] * 2)
    low, upper = (below[0] if below else lo - 1), above[0]
    while upper - low > 1:  # bisect (low, upper): nothing accepted lies in [upper, above)
        mid = (low + upper) // 2
        probe = first_valid(mid, upper)
        if probe is None:
            upper = mid
        elif probe[1][1] < target:
            below, low = probe, probe[0]
        else:
            above, upper = probe, probe[0]
    return (below[1] if below else None), above[1]


def _pick(target: int, candidates: list[Candidate | None]) -> Candidate | None:
    found = [c for c in candidates if c is not None]
    return min(found, key=lambda c: abs(c[1] / target - 1)) if found else None


def match_params(cfg: DictConfig) -> MatchResult:
    """Solve the shape of `cfg`'s variant for `cfg.model.target_params` (see the module docstring)."""
    model = cfg.model
    target = parse_count(model.target_params)
    mode = model.get("match", "width")
    tolerance = float(model.get("match_tolerance", 0.01))
    if mode not in MATCH_MODES:
        raise ArchiFactoryError(f"model.match={mode!r} is not one of {', '.join(MATCH_MODES)}")
    step = int(model.get("match_multiple_of", 16))
    if step < 1:
        raise ArchiFactoryError(f"model.match_multiple_of={step} must be a positive FFN width step, e.g. 16")
    counter = Counter(cfg)
    for _ in range(16):  # a winner that fails its forward check is dropped and the search runs again
        best, coarse = _solve(counter, target, mode, tolerance)
        if best is None or counter.runs(best[0]):
            break
    if best is None or abs(best[1] / target - 1) > tolerance:
        closest = "; ".join(f"{s.describe()} -> {c:,}" for s, c in filter(None, coarse))
        raise ArchiFactoryError(
            f"model.target_params={target:,}: no shape of {cfg.mixin.name}/{cfg.ffn.name} by model.match={mode} "
            f"lands within ±{tolerance * 100:g}% (closest: {closest or 'none'}); try the other model.match, "
            "a larger target, a finer model.match_multiple_of or a wider model.match_tolerance"
        )
    shape, achieved = best
    ffn_hidden = (
        shape.ffn_hidden if shape.ffn_hidden is not None else counter.configured_ffn_hidden(shape.hidden_size)
    )
    return MatchResult(target, achieved, mode, shape, tolerance, ffn_hidden)


def _solve(
    counter: Counter, target: int, mode: str, tolerance: float
) -> tuple[Candidate | None, list[Candidate | None]]:
    """The best candidate (the coarse knob, then a fine knob when needed) and the coarse bracket."""
    model = counter.cfg.model
    heads, hidden, layers = counter.num_heads, int(model.hidden_size), int(model.num_layers)

    def within(candidate: Candidate | None) -> bool:
        return candidate is not None and abs(candidate[1] / target - 1) <= tolerance

    def widths(n: int, options: dict[str, int]) -> list[Candidate | None]:
        return list(_closest_pair(lambda k: counter(Shape(k * heads, n, options)), target, 1, 1 << 16))

    if mode == "width":
        coarse = widths(layers, {})
        neighbours = _grid_neighbours(lambda k: counter(Shape(k * heads, layers)), coarse, heads, 2)
    else:
        coarse = list(_closest_pair(lambda n: counter(Shape(hidden, n)), target, 1, 4096))
        neighbours = _grid_neighbours(lambda n: counter(Shape(hidden, n)), coarse, 0, 2)
    best = _pick(target, coarse)
    if within(best):
        return best, coarse
    fine: list[Candidate] = []
    step = counter.ffn_step
    while not fine and step >= max(1, counter.ffn_step // 4):  # the step, then halved (MoE: E experts a step)
        fine = [c for c in _ffn_fits(counter, target, neighbours, step) if within(c)]
        step //= 2
    option = counter.match_option
    if (
        not fine and option is not None
    ):  # the mixin's own expansion, within half to twice its configured value
        default = int(counter.mixin_options.get(option) or 0) or hidden
        for base in (c[0] for c in coarse if c is not None):

            def at(v: int, b: Shape = base) -> Candidate | None:
                return counter(Shape(b.hidden_size, b.num_layers, b.mixin_options | {option: v}))

            fine += [c for c in _closest_pair(at, target, max(1, default // 2), 2 * default) if within(c)]
        fine.sort(key=lambda c: abs(c[0].mixin_options[option] / default - 1))  # the least change wins
    if not fine and mode == "layers":  # then the hidden size nearest the configured one
        for candidate in filter(None, coarse):
            fine += [c for c in widths(candidate[0].num_layers, {}) if within(c)]
        fine.sort(key=lambda c: abs(c[0].hidden_size / hidden - 1))
    return (fine[0] if fine else best), coarse


def _grid_neighbours(
    at: Callable[[int], Candidate | None], coarse: list[Candidate | None], per: int, extra: int
) -> list[Shape]:
    """The coarse bracket's shapes plus up to `extra` accepted grid points beyond each side (the knob is the
    hidden size / `per` in width mode, the depth when `per` is 0)."""

    def knob(shape: Shape) -> int:
        return shape.hidden_size // per if per else shape.num_layers

    found = [c for c in coarse if c is not None]
    if not found:
        return []
    shapes = [c[0] for c in found]
    low, high = min(knob(s) for s in shapes), max(knob(s) for s in shapes)
    for direction, start in ((-1, low), (1, high)):
        k, added = start + direction, 0
        while added < extra and 1 <= k <= start + 64 * extra and k >= start - 64 * extra:
            candidate = at(k)
            if candidate is not None:
                shapes.append(candidate[0])
                added += 1
            k += direction
    return shapes


def _ffn_fits(counter: Counter, target: int, bases: list[Shape], step: int) -> list[Candidate]:
    """Each base shape with the FFN hidden size (multiples of `step`, half to twice its configured width)
    just below and just above the target, the least FFN change first."""
    fits = []
    for base in bases:
        default = counter.configured_ffn_hidden(base.hidden_size)
        if default is None:
            return []

        def at(k: int, b: Shape = base) -> Candidate | None:
            return counter(Shape(b.hidden_size, b.num_layers, b.mixin_options, k * step, step))

        lo, hi = max(1, -(-default // (2 * step))), max(1, 2 * default // step)
        fits += [(c, default) for c in _closest_pair(at, target, lo, hi) if c is not None]
    fits.sort(key=lambda f: (abs(f[0][0].ffn_hidden / f[1] - 1), abs(f[0][1] / target - 1)))
    return [candidate for candidate, _ in fits]


def apply_match(cfg: DictConfig) -> tuple[DictConfig, MatchResult | None]:
    """A copy of `cfg` with the solved shape written in (the input when no target is set)."""
    if cfg.model.get("target_params") in (None, ""):
        return cfg, None
    result = match_params(cfg)
    resolved = copy.deepcopy(cfg)
    with open_dict(resolved):
        resolved.model.hidden_size = result.shape.hidden_size
        resolved.model.num_layers = result.shape.num_layers
        for key, value in result.shape.mixin_options.items():
            resolved.mixin[key] = value
        for key, value in ffn_options(result.shape).items():
            resolved.ffn[key] = value
    return resolved, result
