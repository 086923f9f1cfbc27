"""What a run writes for people and programs: `metrics.jsonl`, `summary.json`, the same numbers to wandb,
and the progress display (a tqdm bar on a terminal, plain log lines off one).

`summary.json` is written at the start (`status: running`) and rewritten (atomically) at every
validation, every checkpoint and at the end, so a crash or a kill leaves `running`/`failed`/`interrupted`
— never a run that looks complete. A resumed run starts from the previous summary (its losses stay
until new ones replace them).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from archifactory.runs import layout, records
from archifactory.runs.files import write_atomic

log = logging.getLogger(__name__)

SUMMARY_KEYS = (
    "status",
    "mixin",
    "ffn",
    "positional",
    "dataset",
    "seed",
    "params_total",
    "params_non_embedding",
    "flops_per_token",
    "steps",
    "tokens_seen",
    "train_loss",
    "val_loss",
    "val_bpb",
    "tokens_per_second",
    "mfu",
    "peak_memory_mb",
    "wall_seconds",
)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# figures of one session that a resume must not carry over from the previous one
_SESSION_KEYS = ("status", "error", "rebuilt")
# summary sections other commands write (`archifactory eval`): the recorder never holds or rewrites them,
# so an evaluation that lands while this run trains is kept (`runs.records.update_summary` merges)
_OTHER_WRITERS = ("eval",)


class RunRecorder:
    """metrics.jsonl + summary.json + wandb, on the main rank only (other ranks get `enabled=False`)."""

    def __init__(self, run_dir: Path, enabled: bool, base_summary: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.enabled = enabled
        self.metrics_path = layout.metrics_path(run_dir)
        self.summary: dict[str, Any] = {key: None for key in SUMMARY_KEYS} | base_summary
        self.wandb_run: Any = None

    def start(self, resume_step: int | None, previous_summary: dict[str, Any] | None = None) -> None:
        """`status: running`; a fresh run empties metrics.jsonl, a resumed one keeps the lines up to its
        checkpoint (dropping a torn last line) and the previous summary's figures."""
        if not self.enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_atomic(self.metrics_path, "")
        elif self.metrics_path.exists():  # drop lines logged after the checkpoint we resume from
            kept = [r for r in records.read_metrics(self.metrics_path) if r.get("step", 0) <= resume_step]
            records.rewrite_metrics(self.metrics_path, kept)
        if previous_summary:
            carried = {k: v for k, v in previous_summary.items() if k not in _SESSION_KEYS + _OTHER_WRITERS}
            self.summary = carried | {k: v for k, v in self.summary.items() if v is not None}
        self.summary["status"] = "running"
        records.modify_summary(self.run_dir, self._restart)

    def _restart(self, summary: dict[str, Any]) -> None:
        """The summary a (re)started session writes: its own figures, plus the sections other commands
        wrote (nothing of an earlier session's status or error survives)."""
        kept = {key: summary[key] for key in _OTHER_WRITERS if key in summary}
        summary.clear()
        summary.update(kept | {key: _jsonable(value) for key, value in self.summary.items()})

    def attach_wandb(self, cfg: dict[str, Any], wandb_cfg: Any, run_name: str) -> None:
        if not (self.enabled and wandb_cfg.enabled):
            return
        import wandb

        mode = wandb_cfg.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb() else "offline"
        self.wandb_run = wandb.init(
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            name=wandb_cfg.name or run_name,
            config=cfg,
            dir=str(self.run_dir),
            mode=os.environ.get("WANDB_MODE", mode),
        )
        log.info("wandb: mode=%s run=%s", self.wandb_run.settings.mode, self.wandb_run.name)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {key: _jsonable(value) for key, value in record.items()}
        records.append_metrics(self.run_dir, clean)
        if self.wandb_run is not None:
            self.wandb_run.log(
                {k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=clean["step"]
            )

    def update_summary(self, **values: Any) -> None:
        if not self.enabled:
            return
        self.summary.update({key: _jsonable(value) for key, value in values.items()})
        records.update_summary(self.run_dir, self.summary)

    def finish(self, **values: Any) -> None:
        self.update_summary(**values)
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in self.summary.items() if v is not None})
            self.wandb_run.finish()
            self.wandb_run = None


def _netrc_has_wandb() -> bool:
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


class Throughput:
    """Tokens/s and MFU over the steps since the last read, excluding paused time (validation, saving)."""

    def __init__(self, train_flops_per_token: float, peak_flops: float | None, world_size: int) -> None:
        self.train_flops_per_token = train_flops_per_token
        self.peak_flops = peak_flops
        self.world_size = world_size
        self.tokens = 0
        self.seconds = 0.0
        self.run_tokens = 0  # every read window of the run, for the summary
        self.run_seconds = 0.0
        self._started: float | None = None

    def resume(self) -> None:
        self._started = time.perf_counter()

    def pause(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def add_tokens(self, tokens: int) -> None:
        self.tokens += tokens

    def run_average(self) -> tuple[float | None, float | None]:
        """(tokens/s, MFU) over every window read so far: the figure `summary.json` reports."""
        if self.run_seconds <= 0:
            return None, None
        tokens_per_second = self.run_tokens / self.run_seconds
        return tokens_per_second, self._mfu(tokens_per_second)

    def _mfu(self, tokens_per_second: float) -> float | None:
        if not self.peak_flops:
            return None
        return tokens_per_second * self.train_flops_per_token / (self.peak_flops * self.world_size)

    def restart(self) -> None:
        """Drop the window so far (the first step: torch.compile and allocator warm-up are not throughput)."""
        self.tokens, self.seconds = 0, 0.0
        self._started = time.perf_counter()

    def read(self) -> tuple[float | None, float | None]:
        """(global tokens/s, MFU), each None when the window is empty; resets the window."""
        self.pause()
        if self.tokens == 0 or self.seconds <= 0:
            self.resume()
            return None, None
        tokens_per_second = self.tokens / self.seconds
        self.run_tokens += self.tokens
        self.run_seconds += self.seconds
        self.tokens, self.seconds = 0, 0.0
        self.resume()
        return tokens_per_second, self._mfu(tokens_per_second)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def progress_fields(
    train_loss: float, tokens_per_second: float | None, aux: dict[str, torch.Tensor]
) -> dict[str, str]:
    """The short figures of the progress display: loss, tokens/s and, for routed FFNs, the worst layer's
    expert imbalance (max/mean load) among the per-layer `*.imbalance` metrics."""
    fields = {"loss": f"{train_loss:.3f}"}
    if tokens_per_second is not None:
        fields["tok/s"] = f"{tokens_per_second:,.0f}"
    imbalance = [float(value) for key, value in aux.items() if key.endswith(".imbalance")]
    if imbalance:
        fields["imb"] = f"{max(imbalance):.2f}"
    return fields


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise (a log file, a batch job) one log line per log step
    instead of thousands of carriage-return frames. Disabled on non-main ranks."""

    def __init__(self, total: int, initial: int, enabled: bool, interactive: bool | None = None) -> None:
        self.total = total
        self.enabled = enabled
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = (
            tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)
            if enabled and interactive
            else None
        )

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(
        self, step: int, train_loss: float, tokens_per_second: float | None, aux: dict[str, torch.Tensor]
    ) -> None:
        """A log step's figures: the bar's postfix, or one `step N/M: key value …` log line."""
        if not self.enabled:
            return
        fields = progress_fields(train_loss, tokens_per_second, aux)
        if self.bar is not None:
            self.bar.set_postfix(fields)
        else:
            log.info("step %d/%d: %s", step, self.total, "  ".join(f"{k} {v}" for k, v in fields.items()))

    def write(self, message: str) -> None:
        """A line that must not break the bar (validation results)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
