"""Parameter matching: size every variant of a sweep to the same non-embedding parameter count.

`model.target_params=N` (an int, `30M`, `3e7`, `1.5B`, `250k`) asks for N non-embedding parameters
(blocks + final norm: `parameter_breakdown()["non_embedding"]`, every MoE expert included) within
`model.match_tolerance` (default ±2%). `model.match` picks the coarse knob:

- `width` (default): the hidden size, on the grid of multiples of `model.num_heads` (head
  divisibility); shapes a component refuses (e.g. mamba2's `expand · hidden % head_dim`) are skipped,
  and FFN widths are counted after their `multiple_of` rounding, because every count comes from
  building the real modules (on PyTorch's meta device: no memory, no init cost).
- `layers`: the depth at the configured hidden size.

When the closest coarse shape misses the tolerance (small models: one grid step can be worth several
percent), a fine knob closes the gap: the mixin's own expansion where it declares one
(`Mixin.match_option`: mamba2's state expansion `d_state`, lstm/rnn `inner_size`, mla
`kv_lora_rank`), re-solved on the coarse shape just below and just above the target, keeping the
one that moves it least; with `match=layers` and no such option, the hidden size near the configured
one. If nothing lands within the tolerance the run stops with one line naming the closest shapes.
The resolved shape is written into the run's config, so a run dir rebuilds exactly what trained.
"""

from __future__ import annotations

import copy
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
from archifactory.model.components import build_positional, component_factory, layer_mixin_factory
from archifactory.model.norms import build_norm
from archifactory.model.positional import PositionContext

MATCH_MODES = ("width", "layers")
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

    def describe(self) -> str:
        extra = "".join(f", mixin.{key}={value}" for key, value in self.mixin_options.items())
        return f"hidden_size={self.hidden_size}, num_layers={self.num_layers}{extra}"


@dataclass
class MatchResult:
    target: int
    achieved: int
    match: str
    shape: Shape
    tolerance: float

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
                **{f"mixin.{k}": v for k, v in self.shape.mixin_options.items()},
            },
        }


Candidate = tuple[Shape, int]  # a shape a component accepts and its non-embedding count


class Counter:
    """Non-embedding parameter counts of one config at any shape, memoised; None = a refused shape.

    Layers are built by the same factories as `build_model` (hybrid patterns included). A grid point
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
        self.num_heads = int(cfg.model.num_heads)
        self._cache: dict[tuple, int | None] = {}
        self._configs: dict[tuple, DictConfig] = {}

    def __call__(self, shape: Shape) -> Candidate | None:
        count = self.count(shape)
        if count is not None or self.head_option is None or self.head_option in shape.mixin_options:
            return None if count is None else (shape, count)
        configured = int(self.mixin_options[self.head_option])
        sizes = range(max(8, configured // 2), 2 * configured + 1, 8)
        for size in sorted(sizes, key=lambda v: (abs(v - configured), -v)):
            retry = Shape(shape.hidden_size, shape.num_layers, shape.mixin_options | {self.head_option: size})
            count = self.count(retry)
            if count is not None:
                return retry, count
        return None

    def _key(self, shape: Shape) -> tuple:
        return shape.hidden_size, shape.num_layers, tuple(sorted(shape.mixin_options.items()))

    def _factories(self, shape: Shape) -> tuple[Callable, Callable]:
        """(mixin factory, FFN factory) at this shape, from a config with the solver's depth and mixin
        options (a hybrid pattern is laid out over `model.num_layers`)."""
        key = (shape.num_layers, tuple(sorted(shape.mixin_options.items())))
        if key not in self._configs:
            cfg = copy.deepcopy(self.cfg)
            with open_dict(cfg):
                cfg.model.num_layers = shape.num_layers
                for option, value in key[1]:
                    cfg.mixin[option] = value
            self._configs[key] = cfg
        cfg = self._configs[key]
        dims = (shape.hidden_size, shape.num_layers, int(cfg.model.max_seq_len))
        return layer_mixin_factory(cfg, *dims), component_factory("ffn", cfg.ffn, *dims)

    def count(self, shape: Shape) -> int | None:
        key = self._key(shape)
        if key not in self._cache:
            self._cache[key] = self._count(shape)
        return self._cache[key]

    def _count(self, shape: Shape) -> int | None:
        hidden, layers = shape.hidden_size, shape.num_layers
        if hidden <= 0 or layers <= 0 or hidden % self.num_heads:
            return None  # build_model refuses a hidden size that is not a multiple of model.num_heads
        model = self.cfg.model
        total = 0
        try:
            mixin, ffn = self._factories(shape)
            with torch.device("meta"):  # shapes only: nothing is allocated or initialised
                for layer_idx in range(layers):
                    parts = mixin(layer_idx=layer_idx), ffn(layer_idx=layer_idx)
                    block = Block(*parts, hidden, model.norm, model.norm_eps)
                    total += sum(p.numel() for p in block.parameters())
                total += sum(p.numel() for p in build_norm(model.norm, hidden, model.norm_eps).parameters())
        except (ArchiFactoryError, ValueError, RuntimeError):
            return None  # a component's divisibility rule refuses this shape
        return total

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
    tolerance = float(model.get("match_tolerance", 0.02))
    if mode not in MATCH_MODES:
        raise ArchiFactoryError(f"model.match={mode!r} is not one of {', '.join(MATCH_MODES)}")
    counter = Counter(cfg)
    for _ in range(16):  # a winner that fails its forward check is dropped and the search runs again
        best, coarse = _solve(counter, target, mode, tolerance)
        if best is None or counter.runs(best[0]):
            break
    if best is None or abs(best[1] / target - 1) > tolerance:
        closest = "; ".join(f"{s.describe()} -> {c:,}" for s, c in filter(None, coarse))
        raise ArchiFactoryError(
            f"model.target_params={target:,}: no shape of {cfg.mixin.name}/{cfg.ffn.name} by model.match={mode} "
            f"lands within ±{tolerance:.0%} (closest: {closest or 'none'}); try the other model.match, "
            "a larger target or model.match_tolerance"
        )
    shape, achieved = best
    return MatchResult(target, achieved, mode, shape, tolerance)


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
    else:
        coarse = list(_closest_pair(lambda n: counter(Shape(hidden, n)), target, 1, 4096))
    best = _pick(target, coarse)
    if within(best):
        return best, coarse
    fine: list[Candidate] = []
    option = counter.match_option
    if option is not None:  # the mixin's own expansion, within half to twice its configured value
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
    return resolved, result
