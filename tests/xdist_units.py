"""The pytest-xdist scheduler of `tests/conftest.py`: small files whole, large files test by test."""

from __future__ import annotations

from collections import Counter

import pytest
from xdist.scheduler import LoadScopeScheduling


class FileUnitScheduling(LoadScopeScheduling):
    """xdist's `loadscope` with a file of at most `small_file` tests as one unit and any other test as its
    own unit, the units in collection order (no reordering by size)."""

    def __init__(self, config: pytest.Config, log: object, small_file: int) -> None:
        super().__init__(config, log)
        self.small_file = small_file
        self.sizes: Counter[str] | None = None

    def schedule(self) -> None:
        self.config.option.loadscopereorder = False  # keep the collection's order: slow files first
        super().schedule()

    def _split_scope(self, nodeid: str) -> str:
        path = nodeid.split("::")[0]
        if self.sizes is None:
            self.sizes = Counter(other.split("::")[0] for other in self.collection or [])
        return path if self.sizes[path] <= self.small_file else nodeid
