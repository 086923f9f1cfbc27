"""Multi-node launch: the torchrun command lines and the rendezvous derived from a SLURM environment (no
SLURM here: the environment is a dict), and the per-node entry point's one-line refusal outside SLURM."""

from __future__ import annotations

import subprocess
import sys

import pytest

from archifactory.core.errors import ArchiFactoryError
from archifactory.train.launch import Rendezvous, command, first_host, slurm_rendezvous

SLURM = {
    "SLURM_JOB_NODELIST": "gpu[03-04,07],cpu1",
    "SLURM_NNODES": "3",
    "SLURM_NODEID": "2",
    "SLURM_JOB_ID": "123456",
    "SLURM_GPUS_ON_NODE": "8",
}


@pytest.mark.parametrize(
    "nodelist,host",
    [("gpu[03-04,07],cpu1", "gpu03"), ("node7", "node7"), ("a,b", "a"), ("n[1-2]", "n1"), ("x[5]", "x5")],
)
def test_first_host_of_a_node_list(nodelist: str, host: str) -> None:
    assert first_host(nodelist) == host


def test_rendezvous_from_slurm_environment() -> None:
    rendezvous, gpus = slurm_rendezvous(SLURM)
    assert rendezvous == Rendezvous(
        nnodes=3, node_rank=2, master_addr="gpu03", master_port=20000 + 123456 % 20000
    )
    assert gpus == 8
    rendezvous, gpus = slurm_rendezvous(
        {**SLURM, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:4", "MASTER_PORT": "29500"}
    )
    assert gpus == 4 and rendezvous.master_port == 29500


def test_commands_for_one_process_one_node_and_many_nodes() -> None:
    args = ["train", "experiment=pints_1b"]
    assert command(args) == [sys.executable, "-m", "archifactory", *args]
    assert command(args, 4) == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=4",
        "--standalone",
        "-m",
        "archifactory",
        *args,
    ]
    rendezvous, gpus = slurm_rendezvous(SLURM)
    assert command(args, gpus, rendezvous) == [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8", "--nnodes=3", "--node_rank=2",
        "--master_addr=gpu03", f"--master_port={rendezvous.master_port}", "-m", "archifactory", *args,
    ]  # fmt: skip


def test_outside_slurm_is_one_line() -> None:
    with pytest.raises(ArchiFactoryError, match="not inside a SLURM job step"):
        slurm_rendezvous({})
    result = subprocess.run(
        [sys.executable, "-m", "archifactory.train.launch", "train"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: not inside a SLURM job step")
    assert "Traceback" not in result.stderr
