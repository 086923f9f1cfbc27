"""Shared test setup: offline, deterministic, CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models run fastest (and reproducibly) on one intra-op thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `slow` run first (in their collected order): under pytest-xdist each worker starts on a
    long end-to-end test and the many short ones fill in at the end, instead of one worker running a
    three-minute study alone after the other has finished."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
