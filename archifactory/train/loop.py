"""The training loop: `train` sets up a run, `_train` is the loop to read top to bottom.

The loop is three typed pieces over one `RunContext` (everything a run holds: model, optimizer,
schedule, data, recorder, counters): `train_step` (micro-batches, clipping, the non-finite guard, the
optimizer step), `log_step` (the log-step record and the progress line) and `validate` / `checkpoint`.
Host syncs (`.item()` / `float(tensor)`) happen only on log, validation and checkpoint steps, plus one
scalar per step for the non-finite guard (the gradient norm decides whether the step is taken).
Everything else is one call into its own module: the run's setup (`setup.py`: data, model, optimizer,
schedule, resume), stop signals (`signals.py`), the step plan (`schedule.plan_steps`), validation
(`archifactory.eval.evaluate`), checkpoints, distributed wrapping, metrics, the run directory
(`archifactory.runs`). The loop knows no component by name: per-step component hooks go through
`model.after_optimizer_step()`, component metrics through `metrics.progress_fields`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from archifactory.config.hybrid import cfg_variant_label
from archifactory.config.validation import validate_config
from archifactory.core.errors import ArchiFactoryError
from archifactory.data import check_dataset_path
from archifactory.eval.evaluate import evaluate
from archifactory.generate.export import write_model_folder
from archifactory.hf.pretrained import apply_pretrained
from archifactory.model.build import check_buildable
from archifactory.model.documents import documents_for
from archifactory.model.match import MatchResult, apply_match
from archifactory.runs import layout
from archifactory.runs.checkpoints import finished_checkpoints
from archifactory.runs.files import discard, is_empty
from archifactory.runs.lock import locked
from archifactory.runs.log import detach_log_file
from archifactory.train import distributed
from archifactory.train.checkpoint import save_checkpoint
from archifactory.train.dcp import finish_save, start_save
from archifactory.train.metrics import Progress, RunRecorder, Throughput, peak_memory_mb
from archifactory.train.plot import plot_loss_curves
from archifactory.train.resume import RunPlan, claim_run, finish_completed, plan_run
from archifactory.train.runtime import configure_backends, peak_flops, resolve_device
from archifactory.train.schedule import plan_steps
from archifactory.train.setup import RunContext, setup_run
from archifactory.train.signals import StopRequest

log = logging.getLogger(__name__)


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
    fresh = is_main and is_empty(run_dir)
    try:
        validate_config(cfg)  # before anything is prepared, built or written
        # a mistyped dataset.path: "does not exist", before any match or build
        check_dataset_path(cfg.dataset)
        cfg, match = apply_match(cfg)  # model.target_params: the solved shape goes into the saved config
        cfg = apply_pretrained(cfg)  # model.pretrained_from: its vocab, norm eps and tokenizer, saved too
        check_buildable(cfg)  # every component constructor's own checks, on the meta device
        with locked(run_dir, enabled=is_main):
            plan = plan_run(cfg, run_dir, plan_steps(cfg, int(os.environ.get("WORLD_SIZE", "1")))[0])
            if plan.completed is not None:
                return finish_completed(run_dir, plan, is_main)
            if is_main:
                claim_run(cfg, run_dir, overrides or [], plan)
            summary = _run(cfg, run_dir, plan, is_main, match, discard_untrained=fresh)
    except (ArchiFactoryError, KeyboardInterrupt):
        if fresh and is_empty(run_dir):
            discard(run_dir)
        raise
    detach_log_file()  # on an error the CLI's guard still writes the traceback to it, then detaches
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
            detach_log_file()
            discard(run_dir)  # a bug keeps its folder: the traceback is in its log
            raise
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        try:  # where the disk allows: a full disk must not turn the real error into another one
            recorder.finish(
                status=status,
                error=str(error) or type(error).__name__,
                wall_seconds=time.perf_counter() - wall_start,
            )
        except Exception as record_error:
            log.warning("could not record status %s in %s: %s", status, layout.SUMMARY, record_error)
        raise
    finally:
        distributed.teardown()


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
            saved = finished_checkpoints(run.run_dir)
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
    if val["val_loss"] is None:
        _note_no_validation(run, val)
    else:
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


def _note_no_validation(run: RunContext, val: dict[str, float | None]) -> None:
    """One log line per session (the first validation that found nothing) saying why the figures are null."""
    if "val_loss" not in run.last:
        log.warning(
            "no held-out target tokens to validate on: %s stay null in %s (hold out more data: "
            "dataset.val_fraction, or a longer trainer.seq_len if held-out rows were cut)",
            " and ".join(val),
            layout.SUMMARY,
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
    trainer = run.cfg.trainer
    if trainer.get("checkpoint_format", "full") == "dcp":  # every rank writes its shards
        finish_pending(run)
        run.pending = start_save(
            layout.checkpoints_dir(run.run_dir),
            run.model,
            run.optimizer,
            run.scheduler.state_dict(),
            run.state,
            trainer.keep_checkpoints,
            asynchronous=bool(trainer.get("async_checkpoint", False)),
        )
        if run.pending.future is None:
            finish_pending(run)
        return
    model_state, optim_state = distributed.full_state(run.model, run.optimizer, run.strategy)
    if run.info.is_main:
        path = save_checkpoint(
            layout.checkpoints_dir(run.run_dir),
            model_state,
            {"optimizer": optim_state, "scheduler": run.scheduler.state_dict()},
            run.state,
            trainer.keep_checkpoints,
        )
        checkpoint_written(run, path)
    distributed.barrier(run.info)


def finish_pending(run: RunContext) -> None:
    """Publish the sharded checkpoint still being written (async) or just written; no-op without one."""
    if run.pending is None:
        return
    pending, run.pending = run.pending, None
    path = finish_save(pending)
    if run.info.is_main:
        checkpoint_written(run, path, steps=pending.meta["step"], tokens=pending.meta["tokens_seen"])


def checkpoint_written(
    run: RunContext, path: Path, steps: int | None = None, tokens: int | None = None
) -> None:
    """Rank 0, once a checkpoint is in place: log it; summary.json's steps never lag the newest one."""
    log.info("checkpoint: %s", path)
    run.recorder.update_summary(
        steps=run.state.step if steps is None else steps,
        tokens_seen=run.state.tokens_seen if tokens is None else tokens,
    )


def _train(run: RunContext, stop: StopRequest) -> dict[str, Any]:
    cfg, trainer, state = run.cfg, run.cfg.trainer, run.state
    run.recorder.attach_wandb(
        OmegaConf.to_container(cfg, resolve=True),
        cfg.wandb,
        f"{cfg_variant_label(cfg)}-{cfg.ffn.name}-{cfg.positional.name}-s{cfg.seed}",
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
            finish_pending(run)  # an async checkpoint is on disk before the run stops
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
    finish_pending(run)  # an async checkpoint's write completes before the model folder reads it
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
