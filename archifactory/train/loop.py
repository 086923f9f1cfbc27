"""The training loop: `train` sets up a run, `_train` is the loop to read top to bottom.

The loop is three typed pieces over one `RunContext` (everything a run holds: model, optimizer,
schedule, data, recorder, counters): `train_step` (micro-batches, clipping, the non-finite guard, the
optimizer step), `log_step` (the log-step record and the progress line) and `validate` / `checkpoint`.
Host syncs (`.item()` / `float(tensor)`) happen only on log, validation and checkpoint steps, plus one
scalar per step for the non-finite guard (the gradient norm decides whether the step is taken).
Everything else is one call into its own module: data (`archifactory.data`), model
(`archifactory.model.build`), optimizer and schedule (`optim`, `schedule`), checkpoints, distributed
wrapping, metrics. The loop knows no component by name: per-step component hooks go through
`model.after_optimizer_step()`, component metrics through `metrics.progress_fields`.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from archifactory import guard
from archifactory.data import check_dataset_path, load_data
from archifactory.data.dataset import TokenData
from archifactory.data.loader import PackedLoader
from archifactory.data.synthetic import SyntheticData, SyntheticLoader
from archifactory.errors import ArchiFactoryError
from archifactory.eval.probe import probe_metrics
from archifactory.model.build import build_model, describe_backends
from archifactory.model.documents import documents_for
from archifactory.model.hybrid import cfg_variant_label
from archifactory.model.match import MatchResult, apply_match
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.runs import resolve_run, save_run_tokenizer, write_model_folder
from archifactory.sft.model import init_from_pretrained
from archifactory.train import distributed, rundir
from archifactory.train.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    model_signature,
    save_checkpoint,
    set_rng_state,
)
from archifactory.train.metrics import Progress, RunRecorder, Throughput, peak_memory_mb
from archifactory.train.optim import build_optimizer
from archifactory.train.plot import plot_loss_curves
from archifactory.train.resume import RunPlan, claim_run, finish_completed, plan_run
from archifactory.train.runtime import (
    autocast_factory,
    configure_backends,
    peak_flops,
    resolve_device,
    seed_everything,
)
from archifactory.train.schedule import build_scheduler, steps_from_token_budget
from archifactory.validation import check_buildable, validate_config

log = logging.getLogger(__name__)

Autocast = Callable[[], AbstractContextManager]


class StopRequest:
    """SIGINT/SIGTERM ask the loop to stop at the next step boundary and save; a second SIGINT aborts."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def plan_steps(cfg: DictConfig, world_size: int, examples_per_epoch: int | None = None) -> tuple[int, int]:
    """(optimizer steps, gradient-accumulation steps) from the token budget, `trainer.epochs` over
    `examples_per_epoch` rows (chat data) and/or max_steps: the smallest wins."""
    trainer = cfg.trainer
    accum = trainer.grad_accum_steps
    steps = trainer.max_steps
    if trainer.batch_tokens is not None:
        budget = (
            trainer.total_tokens
            if trainer.total_tokens is not None
            else trainer.batch_tokens * trainer.max_steps
        )
        budget_steps, accum = steps_from_token_budget(
            budget, trainer.batch_tokens, trainer.micro_batch_size, trainer.seq_len, world_size
        )
        steps = min(steps, budget_steps)
    elif trainer.total_tokens is not None:
        tokens_per_step = trainer.micro_batch_size * trainer.seq_len * accum * world_size
        steps = min(steps, max(1, trainer.total_tokens // tokens_per_step))
    if trainer.epochs is not None and examples_per_epoch is not None:
        rows_per_step = trainer.micro_batch_size * accum * world_size
        steps = min(steps, max(1, math.ceil(trainer.epochs * examples_per_epoch / rows_per_step)))
    return steps, accum


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list,
    device: torch.device,
    autocast: Autocast,
    bytes_per_token: float | None,
    document_eos: int | None = None,
) -> dict[str, float]:
    """Token-weighted validation loss (nats) and bits per byte over the fixed validation batches; for a
    dataset without bytes (a synthetic probe, `bytes_per_token` None): loss and accuracy on its answers."""
    if bytes_per_token is None:
        return probe_metrics(model, batches, device, autocast)
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for inputs, targets in batches:
        documents = documents_for(inputs, document_eos, device)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            out = model(inputs, targets=targets, return_logits=False, documents=documents)
        tokens = int((targets != -100).sum())
        total += out.lm_loss.float() * tokens
        count += tokens
    model.train()
    loss = float(total) / max(count, 1)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}


@dataclass
class RunContext:
    """Everything one run holds, built once by `setup_run` and passed to the loop's pieces."""

    cfg: DictConfig
    run_dir: Path
    info: distributed.DistInfo
    device: torch.device
    autocast: Autocast
    recorder: RunRecorder
    data: TokenData | SyntheticData
    raw_model: StackedMixinForCausalLM  # the unwrapped model: accounting, hooks, checkpoint signature
    model: nn.Module  # what the step runs: the raw model, or its DDP/FSDP wrapping
    strategy: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loader: PackedLoader | SyntheticLoader
    val_batches: list
    state: TrainerState
    total_steps: int
    accum: int
    tokens_per_step: int
    wall_start: float
    breakdown: dict[str, int]
    flops_per_token: float
    document_eos: int | None = None  # dataset.document_mask: the EOS that separates packed documents
    nonfinite_in_a_row: int = 0
    last: dict[str, Any] = field(default_factory=dict)  # latest train/val figures for summary.json


@dataclass
class StepResult:
    """One optimizer step's outputs, still on the device (read back only on log steps)."""

    loss: Tensor  # mean lm loss over the micro-batches
    grad_norm: Tensor
    aux: dict[str, Tensor]  # the last micro-batch's component metrics


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train one variant into `run_dir`: check the config, lock the directory, decide (read-only) what to
    do with it, claim it, run. A refusal at any step before the claim leaves the directory untouched; a
    directory this command found empty is removed again on a refusal, or on a user error or interrupt
    before the first step (nothing but the config was written: no `failed` folder to clean up)."""
    is_main = int(os.environ.get("RANK", "0")) == 0
    fresh = is_main and rundir.is_empty(run_dir)
    try:
        validate_config(cfg)  # before anything is prepared, built or written
        cfg, match = apply_match(cfg)  # model.target_params: the solved shape goes into the saved config
        check_buildable(cfg)  # every component constructor's own checks, on the meta device
        check_dataset_path(cfg.dataset)  # a mistyped dataset.path: "does not exist", before the directory
        with rundir.locked(run_dir, enabled=is_main):
            plan = plan_run(cfg, run_dir, plan_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))[0])
            if plan.completed is not None:
                return finish_completed(run_dir, plan, is_main)
            if is_main:
                claim_run(cfg, run_dir, overrides or [], plan)
            summary = _run(cfg, run_dir, plan, is_main, match, discard_untrained=fresh)
    except (ArchiFactoryError, KeyboardInterrupt):
        if fresh and rundir.is_empty(run_dir):
            rundir.discard(run_dir)
        raise
    guard.detach_log_file()  # on an error the CLI's guard still writes the traceback to it, then detaches
    return summary


def _run(
    cfg: DictConfig,
    run_dir: Path,
    plan: RunPlan,
    is_main: bool,
    match: MatchResult | None = None,
    discard_untrained: bool = False,
) -> dict[str, Any]:
    trainer = cfg.trainer
    if not is_main:  # rank-0-only logging: the other ranks report warnings and errors only
        logging.getLogger("archifactory").setLevel(logging.WARNING)
    info = distributed.setup(
        "cuda" if torch.cuda.is_available() and trainer.device in ("auto", "cuda") else "cpu"
    )
    device = resolve_device(trainer.device, info.local_rank)
    configure_backends(device, trainer.num_threads)
    recorder = RunRecorder(
        run_dir,
        info.is_main,
        {
            "mixin": cfg_variant_label(cfg),  # a hybrid's pattern, e.g. gated_deltanet3+gqa
            "ffn": cfg.ffn.name,
            "positional": cfg.positional.name,
            "dataset": cfg.dataset.name,
            "document_mask": bool(cfg.dataset.get("document_mask", False)),
            "seed": cfg.seed,
            "run_dir": str(run_dir),
        },
    )
    recorder.start(plan.resume_step, plan.previous_summary)
    if match is not None:
        recorder.update_summary(**match.summary())
        if info.is_main:
            log.info(
                "params: target %s non-embedding, achieved %s (%+.2f%%) by model.match=%s: %s",
                f"{match.target:,}",
                f"{match.achieved:,}",
                100 * match.error,
                match.match,
                match.shape.describe(),
            )
    wall_start = time.perf_counter()
    run: RunContext | None = None
    try:
        with StopRequest() as stop:
            run = setup_run(cfg, run_dir, info, device, recorder, plan.resume_from, wall_start)
            return _train(run, stop)
    except BaseException as error:
        untrained = run is None or run.state.step == 0
        if discard_untrained and untrained and isinstance(error, (ArchiFactoryError, KeyboardInterrupt)):
            guard.detach_log_file()
            rundir.discard(run_dir)  # a bug keeps its folder: the traceback is in its log
            raise
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        try:  # where the disk allows: a full disk must not turn the real error into another one
            recorder.finish(
                status=status,
                error=str(error) or type(error).__name__,
                wall_seconds=time.perf_counter() - wall_start,
            )
        except Exception as record_error:
            log.warning("could not record status %s in summary.json: %s", status, record_error)
        raise
    finally:
        distributed.teardown()


def setup_run(
    cfg: DictConfig,
    run_dir: Path,
    info: distributed.DistInfo,
    device: torch.device,
    recorder: RunRecorder,
    resume_from: Path | None,
    wall_start: float,
) -> RunContext:
    """Data, model, optimizer, schedule and loader for this rank; resumed from `resume_from` if given."""
    trainer = cfg.trainer
    seed_everything(cfg.seed)  # same on every rank: identical initial weights
    if not info.is_main:  # rank 0 prepares the token cache first; the others then reuse it
        distributed.barrier(info)
    data = load_data(
        cfg.dataset, seq_len=trainer.seq_len, seed=cfg.seed, rank=info.rank, world_size=info.world_size
    )
    if info.is_main:
        if data.tokenizer is not None:  # a synthetic probe has none
            save_run_tokenizer(run_dir, data.tokenizer)  # generate/eval/export load it from the run dir
        distributed.barrier(info)
    log.info(
        "data: vocab=%d, %s",
        data.vocab_size,
        data.description,
    )
    raw_model = build_model(cfg, data.vocab_size)
    if cfg.get("init_from"):  # `archifactory sft`: the pretrained weights, vocabulary grown for chat tokens
        init_from_pretrained(raw_model, resolve_run(cfg.init_from))
    raw_model = raw_model.to(device)
    total_steps, accum = plan_steps(cfg, info.world_size, getattr(data, "examples_per_epoch", None))
    tokens_per_step = trainer.micro_batch_size * trainer.seq_len * accum * info.world_size
    breakdown = raw_model.parameter_breakdown()
    if info.is_main:
        log.info("model: %s", ", ".join(f"{k}={v:,}" for k, v in breakdown.items()))
        for line in describe_backends(raw_model):
            log.info("compute path: %s", line)
        log.info(
            "plan: %d optimizer steps x %d tokens (micro-batch %d x seq %d x accum %d x world %d) = %s tokens",
            total_steps,
            tokens_per_step,
            trainer.micro_batch_size,
            trainer.seq_len,
            accum,
            info.world_size,
            f"{total_steps * tokens_per_step:,}",
        )
    for block in raw_model.blocks:
        block.activation_checkpointing = trainer.activation_checkpointing
        if trainer.compile:
            block.compile()
    strategy = distributed.resolve_strategy(trainer.strategy, info)
    model = distributed.wrap_model(raw_model, strategy, device)
    optimizer = build_optimizer(model, trainer, device.type, total_steps=total_steps)
    scheduler = build_scheduler(optimizer, trainer, total_steps)
    loader = data.train_loader(trainer.micro_batch_size, pin_memory=device.type == "cuda")
    state = TrainerState(step=0, tokens_seen=0, loader=loader.state_dict())
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, model_signature(raw_model.state_dict()))
        distributed.load_full_state(
            model, optimizer, ckpt.model_state, ckpt.optimizer_state["optimizer"], strategy
        )
        scheduler.load_state_dict(ckpt.optimizer_state["scheduler"])
        loader.load_state_dict(ckpt.trainer_state.loader)
        set_rng_state(ckpt.rng)
        state = ckpt.trainer_state
        log.info("resumed from %s (step %d)", resume_from, state.step)
    return RunContext(
        cfg=cfg,
        run_dir=run_dir,
        info=info,
        device=device,
        autocast=autocast_factory(trainer.precision, device),
        recorder=recorder,
        data=data,
        raw_model=raw_model,
        model=model,
        strategy=strategy,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        val_batches=data.val_batches(trainer.micro_batch_size, trainer.eval_tokens),
        state=state,
        total_steps=total_steps,
        accum=accum,
        tokens_per_step=tokens_per_step,
        wall_start=wall_start,
        breakdown=breakdown,
        flops_per_token=raw_model.flops_per_token(trainer.seq_len),
        document_eos=data.eos_id if cfg.dataset.get("document_mask", False) else None,
    )


def train_step(run: RunContext) -> StepResult | None:
    """One optimizer step over `accum` micro-batches; None when a non-finite gradient skipped it."""
    trainer = run.cfg.trainer
    aux: dict[str, Tensor] = {}
    step_loss = torch.zeros((), device=run.device)
    for micro in range(run.accum):
        inputs, targets = next(run.loader)
        documents = documents_for(inputs, run.document_eos, run.device)  # on the host: no sync
        inputs = inputs.to(run.device, non_blocking=True)
        targets = targets.to(run.device, non_blocking=True)
        with distributed.gradient_sync(run.model, run.strategy, enabled=micro == run.accum - 1):
            with run.autocast():  # the forward only: backward runs in the dtypes autocast chose
                out = run.model(inputs, targets=targets, return_logits=False, documents=documents)
            (out.loss / run.accum).backward()
        step_loss += out.lm_loss.detach() / run.accum
        aux = out.aux
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), trainer.grad_clip or float("inf"))
    if not torch.isfinite(grad_norm):  # the one per-step sync: skip a non-finite step
        run.optimizer.zero_grad(set_to_none=True)
        run.state.nonfinite_skipped += 1
        run.nonfinite_in_a_row += 1
        log.warning(
            "non-finite loss/gradient at step %d: step skipped (%d in a row)",
            run.state.step,
            run.nonfinite_in_a_row,
        )
        if run.nonfinite_in_a_row >= trainer.max_nonfinite_steps:
            saved = list_checkpoints(run.run_dir / "checkpoints")
            keeps = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written yet"
            raise ArchiFactoryError(
                f"{run.nonfinite_in_a_row} non-finite steps in a row at step {run.state.step}; stopped ({keeps}): "
                "lower trainer.lr or raise trainer.warmup_steps"
            )
        return None
    run.nonfinite_in_a_row = 0
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.raw_model.after_optimizer_step()  # per-step component hooks (e.g. MoE bias balancing)
    run.state.step += 1
    run.state.tokens_seen += run.tokens_per_step
    return StepResult(step_loss, grad_norm, aux)


def log_step(
    run: RunContext, result: StepResult, train_loss: float, throughput: Throughput, progress: Progress
) -> None:
    """The log-step record (metrics.jsonl, wandb) and the progress line; `train_loss` is already synced."""
    tokens_per_second, mfu = throughput.read()
    scheduler = run.scheduler
    record = {
        "step": run.state.step,
        "tokens_seen": run.state.tokens_seen,
        "train_loss": train_loss,
        "lr": run.cfg.trainer.lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0],
        "grad_norm": float(result.grad_norm),
        "tokens_per_second": tokens_per_second,
        "mfu": mfu,
        "nonfinite_skipped": run.state.nonfinite_skipped,
    }
    record |= result.aux
    progress.report(run.state.step, train_loss, tokens_per_second, result.aux)
    run.recorder.log(record)
    run_tokens_per_second, run_mfu = throughput.run_average()
    run.last.update(train_loss=train_loss, tokens_per_second=run_tokens_per_second, mfu=run_mfu)


def validate(run: RunContext, progress: Progress) -> None:
    """Validation loss and bits per byte (a probe: accuracy on answers): logged, shown, in summary.json."""
    val = evaluate(
        run.model, run.val_batches, run.device, run.autocast, run.data.val_bytes_per_token, run.document_eos
    )
    elapsed = time.perf_counter() - run.wall_start  # the wall-clock axis of `archifactory report`'s plots
    run.recorder.log(
        {"step": run.state.step, "tokens_seen": run.state.tokens_seen, "elapsed_seconds": elapsed, **val}
    )
    progress.write(f"step {run.state.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
    run.last.update(val)
    run.recorder.update_summary(
        steps=run.state.step,
        tokens_seen=run.state.tokens_seen,
        **run.last,
        peak_memory_mb=peak_memory_mb(run.device),
        wall_seconds=time.perf_counter() - run.wall_start,
    )


def checkpoint(run: RunContext, loss_window: tuple[Tensor, int] | None = None) -> None:
    """Save model, optimizer, schedule, data position and RNG (gathered on every rank, written by rank 0).

    `loss_window`: the train-loss sum and step count since the last log step, saved so that the first
    log step after a resume averages the same steps as an uninterrupted run (a sync: checkpoint step).
    """
    run.state.loader = run.loader.state_dict()
    if loss_window is not None:
        loss_sum, loss_count = loss_window
        run.state.loss_sum = float(distributed.all_reduce_mean(loss_sum, run.info)) if loss_count else 0.0
        run.state.loss_count = loss_count
    model_state, optim_state = distributed.full_state(run.model, run.optimizer, run.strategy)
    if run.info.is_main:
        path = save_checkpoint(
            run.run_dir / "checkpoints",
            model_state,
            {"optimizer": optim_state, "scheduler": run.scheduler.state_dict()},
            run.state,
            run.cfg.trainer.keep_checkpoints,
        )
        log.info("checkpoint: %s", path)
        # summary.json's steps never lag the newest checkpoint
        run.recorder.update_summary(steps=run.state.step, tokens_seen=run.state.tokens_seen)
    distributed.barrier(run.info)


def _train(run: RunContext, stop: StopRequest) -> dict[str, Any]:
    cfg, trainer, state = run.cfg, run.cfg.trainer, run.state
    run.recorder.attach_wandb(
        OmegaConf.to_container(cfg, resolve=True),
        cfg.wandb,
        f"{cfg.mixin.name}-{cfg.ffn.name}-{cfg.positional.name}-s{cfg.seed}",
    )
    run.recorder.update_summary(
        params_total=run.breakdown["total"],
        params_non_embedding=run.breakdown["non_embedding"],
        params_active=run.breakdown["active"],
        flops_per_token=run.flops_per_token,
        steps=state.step,
        decode_state_size=run.raw_model.decode_state_size(trainer.seq_len),
        total_steps=run.total_steps,
    )
    throughput = Throughput(3 * run.flops_per_token, peak_flops(run.device), run.info.world_size)
    progress = Progress(run.total_steps, state.step, enabled=run.info.is_main)
    # the train-loss window a resumed checkpoint left open (empty for a fresh run)
    loss_sum = torch.full((), state.loss_sum, device=run.device)
    loss_count = state.loss_count
    run.model.train()
    throughput.resume()
    first_step = state.step + 1  # excluded from throughput: compilation and warm-up

    while state.step < run.total_steps:
        if stop.requested:
            throughput.pause()
            checkpoint(run, loss_window=(loss_sum, loss_count))  # also says where it stopped in summary.json
            raise KeyboardInterrupt(
                f"stopped by {stop.requested} at step {state.step}; resume with trainer.resume=true"
            )
        result = train_step(run)
        if result is None:
            continue
        throughput.add_tokens(run.tokens_per_step)
        if state.step == first_step:
            throughput.restart()
        loss_sum += result.loss
        loss_count += 1
        progress.advance()

        is_last = state.step == run.total_steps
        if state.step % trainer.log_every == 0 or is_last:
            train_loss = float(distributed.all_reduce_mean(loss_sum / loss_count, run.info))  # sync: log step
            loss_sum.zero_()
            loss_count = 0
            log_step(run, result, train_loss, throughput, progress)
        if state.step % trainer.eval_every == 0 or is_last:
            throughput.pause()
            validate(run, progress)
            throughput.resume()
        if state.step % trainer.checkpoint_every == 0 or is_last:
            throughput.pause()
            checkpoint(run, loss_window=(loss_sum, loss_count))
            throughput.resume()
    progress.close()
    if run.info.is_main:
        plot_loss_curves(run.run_dir, f"{cfg.run_name}: {run.breakdown['total']:,} parameters")
        write_model_folder(run.run_dir)  # model/: Hugging Face format, from the final checkpoint
    run.recorder.finish(
        status="completed",
        steps=state.step,
        tokens_seen=state.tokens_seen,
        **run.last,
        nonfinite_skipped=state.nonfinite_skipped,
        peak_memory_mb=peak_memory_mb(run.device),
        wall_seconds=time.perf_counter() - run.wall_start,
    )
    return run.recorder.summary
