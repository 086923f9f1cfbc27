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


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Order and group the suite for pytest-xdist (`--dist loadgroup`, pyproject's addopts).

    A module with a module-scoped fixture of its own (a trained run, a corpus and its tokenizer) runs on one
    worker, so that fixture is built once rather than once per worker. Tests marked `slow` go first, then
    those groups, then the many short tests, which fill in at the end: no worker is left running a
    three-minute study alone after the other has finished. A module moves as a whole, in its own order.
    """
    for item in items:
        if _has_own_module_fixture(item):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # a module keeps its tests together (its fixtures are built once without xdist too), at its best rank
    rank: dict[str, int] = {}
    for item in items:
        rank[item.path.as_posix()] = min(rank.get(item.path.as_posix(), 2), _dispatch_rank(item))
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (rank[item.path.as_posix()], order[id(item)]))


def _has_own_module_fixture(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    infos = getattr(item, "_fixtureinfo", None)
    if module is None or infos is None:
        return False
    return any(
        definition.scope == "module" and definition.baseid == item.nodeid.split("::")[0]  # not a conftest's
        for definitions in infos.name2fixturedefs.values()
        for definition in definitions
    )


def _dispatch_rank(item: pytest.Item) -> int:
    if item.get_closest_marker("slow") is not None:
        return 0
    return 1 if item.get_closest_marker("xdist_group") is not None else 2
