"""Launch commands for multi-process training: one machine (`hydra/launcher=gpus`) or SLURM nodes.

One helper builds every command line: `command(args, nproc_per_node, rendezvous)` is a plain
`python -m archifactory …` for one process, `torch.distributed.run --standalone` for several processes on
one machine, and `torch.distributed.run --nnodes … --node_rank … --master_addr …` across nodes. The gpus
launcher calls it for a job of `hydra.launcher.gpus_per_job` GPUs; the per-node entry point below calls it
with the rendezvous it derives from the SLURM environment:

    srun --ntasks-per-node=1 python -m archifactory.train.launch train experiment=pints_1b …

SLURM sets, in each node's task: SLURM_JOB_NODELIST (compressed, e.g. `gpu[03-04,07]`; its first host
is the master), SLURM_NNODES, SLURM_NODEID (this node's rank), SLURM_GPUS_ON_NODE (GPUs per node; else
SLURM_GPUS_PER_NODE, else 1) and SLURM_JOB_ID (the master port is derived from it, so two jobs sharing a
node do not collide; MASTER_PORT overrides it). docs/distributed.md has a sample sbatch script.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from archifactory.core.errors import ArchiFactoryError

PORT_BASE = 20000  # master ports are PORT_BASE + job id mod PORT_SPAN: unprivileged, below ephemeral
PORT_SPAN = 20000


@dataclass(frozen=True)
class Rendezvous:
    """Where this node's processes meet the others'."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: `gpu[03-04,07],cpu1` -> `gpu03`, `a,b` -> `a`."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise ArchiFactoryError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    return prefix if ranges is None else prefix + ranges.split(",")[0].split("-")[0]


def _gpus_per_node(env: Mapping[str, str]) -> int:
    raw = env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE") or "1"
    count = raw.split(":")[-1].split("(")[0]  # SLURM_GPUS_PER_NODE may read `h100:4`
    if not count.isdigit() or int(count) < 1:
        raise ArchiFactoryError(f"cannot read the GPU count {raw!r} from the SLURM environment")
    return int(count)


def slurm_rendezvous(env: Mapping[str, str]) -> tuple[Rendezvous, int]:
    """(rendezvous, processes per node) of this node's task, from SLURM's variables."""
    missing = [v for v in ("SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_ID") if v not in env]
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if missing or not nodelist:
        names = ", ".join(missing + ([] if nodelist else ["SLURM_JOB_NODELIST"]))
        raise ArchiFactoryError(
            f"not inside a SLURM job step ({names} unset); run it with `srun --ntasks-per-node=1` in an sbatch "
            "script, or use torchrun directly"
        )
    port = int(env.get("MASTER_PORT") or PORT_BASE + int(env["SLURM_JOB_ID"]) % PORT_SPAN)
    rendezvous = Rendezvous(
        nnodes=int(env["SLURM_NNODES"]),
        node_rank=int(env["SLURM_NODEID"]),
        master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
        master_port=port,
    )
    return rendezvous, _gpus_per_node(env)


def command(args: Sequence[str], nproc_per_node: int = 1, rendezvous: Rendezvous | None = None) -> list[str]:
    """The command line that runs `archifactory <args>` as `nproc_per_node` processes (on every node)."""
    if nproc_per_node == 1 and (rendezvous is None or rendezvous.nnodes == 1):
        return [sys.executable, "-m", "archifactory", *args]
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"]
    if rendezvous is None or rendezvous.nnodes == 1:
        run.append("--standalone")
    else:
        run += [
            f"--nnodes={rendezvous.nnodes}",
            f"--node_rank={rendezvous.node_rank}",
            f"--master_addr={rendezvous.master_addr}",
            f"--master_port={rendezvous.master_port}",
        ]
    return [*run, "-m", "archifactory", *args]


def main(argv: Sequence[str] | None = None) -> int:
    """Per-node entry point: replace this process with torchrun for this node of the SLURM job."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rendezvous, gpus = slurm_rendezvous(os.environ)
    except ArchiFactoryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    line = command(args, gpus, rendezvous)
    os.execv(line[0], line)
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
