"""`archifactory plan [overrides…] [plan.world_size=N] [plan.mfu=F]`: the table of a run before it runs.

The overrides are `train`'s: the config is composed and checked as `train` does (group choices, value
ranges, parameter matching, `model.pretrained_from`'s config), then `archifactory.train.plan` builds the
model on the meta device and prints one table — parameters (trainable and frozen), FLOPs, tokens, memory
per GPU, wall time — without reading data or touching a GPU.
`plan.world_size` (default: torchrun's WORLD_SIZE, else 1) and `plan.mfu` (default 0.4) are the plan's
own options, not config keys.
"""

from __future__ import annotations

import os

from archifactory.cli.hydra_app import check_group_choices
from archifactory.config.compose import compose
from archifactory.config.validation import validate_config
from archifactory.core.errors import ArchiFactoryError
from archifactory.hf.pretrained import apply_pretrained
from archifactory.model.match import apply_match
from archifactory.train.plan import DEFAULT_MFU, build_plan, render_plan

PLAN_OPTIONS = {"plan.world_size": int, "plan.mfu": float}


def split_plan_options(args: list[str]) -> tuple[dict[str, float], list[str]]:
    """(`plan.*` options, the config overrides); flags are refused: `plan` takes overrides only."""
    options: dict[str, float] = {}
    overrides: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if arg.startswith("-"):
            raise ArchiFactoryError(f"archifactory plan takes key=value overrides only, not {arg!r}")
        if key.startswith("plan."):
            if key not in PLAN_OPTIONS or not sep:
                raise ArchiFactoryError(
                    f"unknown plan option {arg!r}; use plan.world_size=<N> or plan.mfu=<0-1>"
                )
            try:
                options[key] = PLAN_OPTIONS[key](value)
            except ValueError:
                raise ArchiFactoryError(f"{arg}: {key} takes a {PLAN_OPTIONS[key].__name__}") from None
        else:
            overrides.append(arg)
    return options, overrides


def plan_main(args: list[str]) -> int:
    options, overrides = split_plan_options(args)
    cfg = compose(check_group_choices(overrides))
    validate_config(cfg)
    cfg, _ = apply_match(cfg)
    cfg = apply_pretrained(cfg)  # model.pretrained_from: the source's vocabulary and norm eps (its config)
    world_size = int(options.get("plan.world_size", int(os.environ.get("WORLD_SIZE", "1"))))
    plan = build_plan(cfg, world_size, float(options.get("plan.mfu", DEFAULT_MFU)))
    print(render_plan(plan), end="")
    return 0
