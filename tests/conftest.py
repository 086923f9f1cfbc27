"""Shared test setup: offline, deterministic, CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# every process a test starts (CLI runs, torchrun ranks, launchers) on one intra-op thread, as the workers: two
# xdist workers already fill the 2-core CI box, and a child running torch's default threads oversubscribes it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from archifactory.cli.main import collect_garbage_less_often  # noqa: E402
from tests.helpers import share_compositions  # noqa: E402

# Tiny test models run fastest (and reproducibly) on one intra-op thread.
torch.set_num_threads(1)
# the thresholds of every `archifactory` command (cli/main.py): a test process composes configs and builds
# modules by the thousand, and at Python's defaults the collector took ~8% of a worker's time
collect_garbage_less_often()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _compositions_shared_by_workers(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Under pytest-xdist the workers share their compositions (tests/helpers.py) through the session's
    temporary folder (pytest prunes it with the others): the registry suites of two files, run on two
    workers, compose each `mixin=<m>` once, not once per worker."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        share_compositions(tmp_path_factory.getbasetemp().parent / "compositions")


SMALL_FILE = 30  # tests: a file of at most this many goes to one xdist worker as a whole


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files holding a `slow` test run first, each file's tests together and in their own order: under
    pytest-xdist the long end-to-end tests start at once and the many short ones fill in at the end, so no
    worker is left running a three-minute study alone after the other has finished."""
    slow = {item.path for item in items if item.get_closest_marker("slow") is not None}
    order = {id(item): index for index, item in enumerate(items)}
    items.sort(key=lambda item: (item.path not in slow, order[id(item)]))


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent without pytest-xdist
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`-n N` (xdist's `load`): a small file is one unit of work, so its module-scoped fixtures (a trained
    run, a corpus and its tokenizer) are built once, not once per worker; a large parametrised file is spread
    test by test. Units are sent in collection order (slow files first, above). Another `--dist` is xdist's.
    (xdist's own `xdist_group` does not take effect under pytest 9: it renames `item._nodeid`.)"""
    if config.getvalue("dist") != "load":
        return None
    from tests.xdist_units import FileUnitScheduling

    return FileUnitScheduling(config, log, SMALL_FILE)
