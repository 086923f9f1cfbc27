"""A small Hydra launcher that runs a sweep's jobs side by side on one machine.

`hydra/launcher=gpus` runs one job per GPU: as many jobs at a time as there are GPUs (the visible ones,
or `hydra.launcher.gpus=[0,1,…]`), each a separate `archifactory` process that sees only its own GPU
(`CUDA_VISIBLE_DEVICES`); the next job starts on a GPU as soon as it is free. `hydra/launcher=parallel`
runs `hydra.launcher.jobs` CPU jobs at a time with `hydra.launcher.threads_per_job` threads each.

Why not submitit's local executor (`hydra/launcher=local_jobs`): it starts every job at once and shows
each one the same first GPUs, so an 8-job sweep on 4 GPUs would put all 8 on GPUs 0..n. Each job here is
the same command a user would type for that variant (`archifactory train <its overrides>
hydra.run.dir=<its sweep subdir>`), so its run dir is exactly a single run's. A failed job is recorded in
its run dir (`status: failed`) and the others go on; the sweep exits non-zero at the end, naming it.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module outside sys.modules, where
# dataclasses cannot resolve string annotations.
import logging
import os
import queue
import shlex
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional  # noqa: UP035  OmegaConf validates typing.Optional/List fields

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
_TARGET = "hydra_plugins.archifactory_launcher.parallel_launcher.ParallelLauncher"


@dataclass
class GpusLauncherConf:
    _target_: str = _TARGET
    gpus: Optional[List[int]] = None  # None: every visible GPU (torch.cuda.device_count())
    jobs: Optional[int] = None  # None: one per GPU (per gpus_per_job GPUs)
    threads_per_job: Optional[int] = None
    gpus_per_job: int = 1  # >1: each job is a torchrun of that many processes (trainer.strategy=ddp|fsdp)


@dataclass
class ParallelLauncherConf:
    _target_: str = _TARGET
    gpus: Optional[List[int]] = field(default_factory=list)  # []: CPU jobs, no GPU
    jobs: Optional[int] = 2
    threads_per_job: Optional[int] = 1


ConfigStore.instance().store(
    group="hydra/launcher", name="gpus", node=GpusLauncherConf, provider="archifactory"
)
ConfigStore.instance().store(
    group="hydra/launcher", name="parallel", node=ParallelLauncherConf, provider="archifactory"
)


def visible_gpus() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count()))


class ParallelLauncher(Launcher):
    def __init__(
        self,
        gpus: list[int] | None = None,
        jobs: int | None = None,
        threads_per_job: int | None = None,
        gpus_per_job: int = 1,
    ) -> None:
        self.gpus = visible_gpus() if gpus is None else list(gpus)
        if gpus is None and not self.gpus:
            raise RuntimeError(
                "hydra/launcher=gpus: no CUDA device is visible (use hydra/launcher=parallel on CPU)"
            )
        self.gpus_per_job = max(1, gpus_per_job)
        if self.gpus and len(self.gpus) < self.gpus_per_job:
            raise RuntimeError(
                f"hydra.launcher.gpus_per_job={gpus_per_job} but only GPUs {self.gpus} are available"
            )
        # a job holds one group of gpus_per_job GPUs while it runs
        self.groups = [
            self.gpus[i : i + self.gpus_per_job]
            for i in range(0, len(self.gpus) - self.gpus_per_job + 1, self.gpus_per_job)
        ]
        self.jobs = jobs or max(1, len(self.groups))
        self.threads_per_job = threads_per_job
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        where = (
            f"GPUs {self.gpus}" if self.gpus else f"CPU, {self.threads_per_job or 'default'} thread(s) each"
        )
        log.info(f"Launching {len(job_overrides)} jobs, {self.jobs} at a time ({where})")
        devices: queue.Queue[list[int] | None] = queue.Queue()
        for slot in range(self.jobs):  # a job holds one device slot (a group of GPUs) while it runs
            devices.put(self.groups[slot % len(self.groups)] if self.groups else None)
        jobs = [self._prepare(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            return list(pool.map(lambda job: self._run(job, devices), jobs))

    def _prepare(self, idx: int, overrides: list[str]) -> dict[str, Any]:
        assert self.config is not None and self.hydra_context is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)  # resolves ${hydra.job.num} in the subdir
        run_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        return {"idx": idx, "overrides": overrides, "run_dir": run_dir, "config": sweep_config}

    def _run(self, job: dict[str, Any], devices: queue.Queue) -> JobReturn:
        from archifactory.cli.sweep import FAILED_JOBS, write_failed_record

        verb = sys.argv[0].split()[1:] or ["train"]  # run_hydra names the verb in argv[0]
        run_dir: Path = job["run_dir"]
        from archifactory.train.launch import command as launch_command

        device = devices.get()
        args = [*verb, *job["overrides"], f"hydra.run.dir={run_dir}"]
        command = launch_command(args, nproc_per_node=len(device) if device else 1)
        env = dict(os.environ)
        if device is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, device))
        if self.threads_per_job:
            env["OMP_NUM_THREADS"] = str(self.threads_per_job)
            command.append(f"trainer.num_threads={self.threads_per_job}")
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            with (run_dir / "launcher.log").open("w") as output:
                output.write(shlex.join(command) + "\n")
                output.flush()
                code = subprocess.call(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        finally:
            devices.put(device)
        result = JobReturn(overrides=job["overrides"], working_dir=str(run_dir), task_name="archifactory")
        result.status = JobStatus.COMPLETED  # a failure is reported by the CLI after the sweep, not raised
        result.return_value = None
        if code != 0:
            lines = (run_dir / "launcher.log").read_text().strip().splitlines()
            message = next((ln for ln in reversed(lines) if ln.startswith("error:")), f"exit status {code}")
            message = message.removeprefix("error: ")
            FAILED_JOBS.append((f"#{job['idx']} {' '.join(job['overrides'])}", message))
            write_failed_record(run_dir, job["config"], job["overrides"], message)
            log.error(f"job #{job['idx']} failed: {message} (log: {run_dir / 'launcher.log'})")
        return result
