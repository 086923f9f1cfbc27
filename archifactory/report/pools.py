"""Which runs may share a table: one *pool* per training protocol and dataset.

A validation loss means different things under different protocols — next-token loss on held-out text
(pretraining), loss on assistant tokens of held-out conversations (SFT), loss on the answer positions of a
synthetic probe (MQAR, MAD) — and on different data, so ranking such runs against each other, or pooling
them as seeds, compares nothing. The report therefore puts each (protocol, dataset) pool in its own table
and figures, and says so in one line when a folder holds several.

The protocol and the dataset come from the run's saved config (`.hydra/config.yaml`): `dataset.source`
`synthetic` is a probe, `chat` (or an `init_from`) is SFT, anything else is pretraining; the dataset is its
name plus what tells two corpora of that name apart (path or Hub id, subset, revision, probe task).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from archifactory.report.runs import Run

PROTOCOLS = ("pretrain", "sft", "probe")
_IDENTITY_KEYS = ("task", "path", "hf_config", "revision")


def _dataset_node(run: Run) -> dict[str, Any]:
    node = run.config.get("dataset")
    return node if isinstance(node, dict) else {}


def protocol(run: Run) -> str:
    """pretrain | sft | probe: how the run was trained."""
    source = _dataset_node(run).get("source")
    if source == "synthetic":
        return "probe"
    if source == "chat" or run.config.get("init_from"):
        return "sft"
    return "pretrain"


def dataset_identity(run: Run) -> str | None:
    """The dataset as people name it (`text path=./corpus`, `mqar task=mqar`), from the saved config;
    None for a run without one (a sweep job that failed before Hydra wrote it)."""
    node = _dataset_node(run)
    name = node.get("name")
    if not name:
        return None
    details = [f"{key}={node[key]}" for key in _IDENTITY_KEYS if node.get(key) and node[key] != name]
    return " ".join([str(name), *details])


@dataclass
class Pool:
    """Runs of one protocol on one dataset: what one table and one set of figures compare."""

    protocol: str
    dataset: str
    runs: list[Run]

    @property
    def title(self) -> str:
        return f"{self.protocol} on {self.dataset}"

    def slug(self, index: int) -> str:
        """A file-name-safe tag for this pool's figures (`2-probe-mqar`)."""
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.dataset.split(" ")[0]).strip("_") or "data"
        return f"{index}-{self.protocol}-{name}"


def split_pools(runs: list[Run]) -> list[Pool]:
    """The runs in pools of one (protocol, dataset), pretraining first, then SFT, then probes."""
    configured = {(protocol(run), identity) for run in runs if (identity := dataset_identity(run))}
    named = {("pretrain", str(run.summary["dataset"])) for run in runs if run.summary.get("dataset")}
    pools: dict[tuple[str, str], Pool] = {}
    for run in runs:
        key = _pool_key(run, configured, named)
        pools.setdefault(key, Pool(*key, [])).runs.append(run)
    return sorted(pools.values(), key=lambda pool: PROTOCOLS.index(pool.protocol))


def _pool_key(run: Run, configured: set[tuple[str, str]], named: set[tuple[str, str]]) -> tuple[str, str]:
    """A run's (protocol, dataset). One without a saved config (a sweep job that failed before Hydra wrote
    it) joins the one configured pool on the dataset its summary names, else a pool of that name; one that
    names no dataset joins the only pool there is."""
    identity = dataset_identity(run)
    if identity is not None:
        return protocol(run), identity
    name = run.summary.get("dataset")
    same = {key for key in configured if name is None or key[1].split(" ")[0] == str(name)}
    if len(same) == 1:
        return same.pop()
    if name:
        return "pretrain", str(name)
    every = configured | named
    return every.pop() if len(every) == 1 else ("pretrain", "an unknown dataset")


def pools_warning(pools: list[Pool]) -> str | None:
    """One line when the runs fall into several pools: which, and that they are reported apart."""
    if len(pools) < 2:
        return None
    named = ", ".join(f"{pool.title} ({len(pool.runs)} runs)" for pool in pools)
    return (
        f"the runs are of {len(pools)} protocols/datasets, each reported in its own table and never ranked "
        f"against the others: {named}"
    )
