"""`archifactory list [--params key=value …]`: every option of every config group, with its description;
`--params` prints the matched shape of every mixin x FFN (nothing trained)."""

from __future__ import annotations

from archifactory.config.compose import GROUPS, group_options
from archifactory.core.errors import ArchiFactoryError
from archifactory.model.params_list import list_params


def list_options(args: list[str]) -> int:
    if args and args[0] == "--params":  # the matched shape of every mixin x FFN, nothing trained
        return list_params(args[1:])
    if args:
        raise ArchiFactoryError(f"usage: archifactory list [--params key=value ...]; got {' '.join(args)}")
    for group in GROUPS:
        options = group_options(group)
        width = max(len(f"{group}={name}") for name in options)
        print(f"{group}:")
        for name, description in options.items():
            print(f"  {f'{group}={name}':<{width}}  {description}")
    return 0
