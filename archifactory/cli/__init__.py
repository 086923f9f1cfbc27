"""The command line: one module per verb, the top-level error guard, the Hydra app. No logic of its own.

`archifactory.cli:main` is the console script's entry point (kept at this path)."""

from archifactory.cli.main import main

__all__ = ["main"]
