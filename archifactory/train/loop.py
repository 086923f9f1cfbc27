"""The training loop: one function to read top to bottom (`train`), with its sync points named.

Host syncs (`.item()` / `float(tensor)`) happen only on log, validation and checkpoint steps, plus one
scalar per step for the non-finite guard (the gradient norm decides whether the step is taken).
Everything else is one call into its own module: data (`archifactory.data`), model
(`archifactory.model.build`), optimizer and schedule (`optim`, `schedule`), checkpoints, distributed
wrapping, metrics.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from archifactory.data import load_data
from archifactory.errors import ArchiFactoryError
from archifactory.model.build import build_model, describe_backends
from archifactory.train import distributed
from archifactory.train.checkpoint import (
    TrainerState,
    list_checkpoints,
    load_checkpoint,
    model_signature,
    save_checkpoint,
    set_rng_state,
)
from archifactory.train.metrics import RunRecorder, Throughput, peak_memory_mb
from archifactory.train.optim import build_optimizer
from archifactory.train.plot import plot_loss_curves
from archifactory.train.runtime import (
    autocast_factory,
    configure_backends,
    peak_flops,
    resolve_device,
    seed_everything,
)
from archifactory.train.schedule import build_scheduler, steps_from_token_budget

log = logging.getLogger(__name__)


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


def plan_steps(cfg: DictConfig, world_size: int) -> tuple[int, int]:
    """(optimizer steps, gradient-accumulation steps) from the token budget and/or max_steps."""
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
    return steps, accum


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: list, device: torch.device, autocast: Any, bytes_per_token: float
) -> dict[str, float]:
    """Token-weighted validation loss (nats) and bits per byte over the fixed validation batches."""
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast():
            out = model(inputs, targets=targets, return_logits=False)
        tokens = int((targets != -100).sum())
        total += out.lm_loss.float() * tokens
        count += tokens
    model.train()
    loss = float(total) / max(count, 1)
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / bytes_per_token}


def claim_run_dir(cfg: DictConfig, run_dir: Path, overrides: list[str], is_main: bool) -> None:
    """Refuse to start a fresh run over one that holds checkpoints or completed; then write `.hydra/`."""
    has_checkpoints = bool(list_checkpoints(run_dir / "checkpoints"))
    summary_path = run_dir / "summary.json"
    status = json.loads(summary_path.read_text()).get("status") if summary_path.exists() else None
    if not cfg.trainer.resume and (has_checkpoints or status == "completed"):
        raise ArchiFactoryError(
            f"{run_dir} already holds a run (status {status}); continue it with trainer.resume=true "
            "or start another with run_name=<new name>"
        )
    if is_main:
        hydra_dir = run_dir / ".hydra"
        hydra_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, hydra_dir / "config.yaml")
        OmegaConf.save(OmegaConf.create(list(overrides)), hydra_dir / "overrides.yaml")


def train(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    trainer = cfg.trainer
    is_main = int(os.environ.get("RANK", "0")) == 0
    claim_run_dir(cfg, run_dir, overrides or [], is_main)
    if not is_main:  # rank-0-only logging: the other ranks report warnings and errors only
        logging.getLogger("archifactory").setLevel(logging.WARNING)
    info = distributed.setup(
        "cuda" if torch.cuda.is_available() and trainer.device in ("auto", "cuda") else "cpu"
    )
    device = resolve_device(trainer.device, info.local_rank)
    configure_backends(device, trainer.num_threads)
    autocast = autocast_factory(trainer.precision, device)
    recorder = RunRecorder(
        run_dir,
        info.is_main,
        {
            "mixin": cfg.mixin.name,
            "ffn": cfg.ffn.name,
            "positional": cfg.positional.name,
            "dataset": cfg.dataset.name,
            "seed": cfg.seed,
            "run_dir": str(run_dir),
        },
    )
    ckpt_dir = run_dir / "checkpoints"
    resume_from = list_checkpoints(ckpt_dir)[-1] if trainer.resume and list_checkpoints(ckpt_dir) else None
    if trainer.resume and resume_from is None and info.is_main:
        log.warning("trainer.resume=true but %s holds no checkpoint: starting from step 0", ckpt_dir)
    recorder.start(resume_step=None if resume_from is None else int(resume_from.name.split("_")[-1]))
    wall_start = time.perf_counter()
    try:
        with StopRequest() as stop:
            return _train(cfg, run_dir, info, device, autocast, recorder, resume_from, stop, wall_start)
    except BaseException as error:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        recorder.finish(
            status=status,
            error=str(error) or type(error).__name__,
            wall_seconds=time.perf_counter() - wall_start,
        )
        raise
    finally:
        distributed.teardown()


def _train(cfg, run_dir, info, device, autocast, recorder, resume_from, stop, wall_start) -> dict[str, Any]:
    trainer = cfg.trainer
    seed_everything(cfg.seed)  # same on every rank: identical initial weights
    if not info.is_main:  # rank 0 prepares the token cache first; the others then reuse it
        distributed.barrier(info)
    data = load_data(
        cfg.dataset, seq_len=trainer.seq_len, seed=cfg.seed, rank=info.rank, world_size=info.world_size
    )
    if info.is_main:
        distributed.barrier(info)
    log.info(
        "data: vocab=%d, %s",
        data.vocab_size,
        "reused token cache, no tokenization" if data.reused_cache else "prepared token cache",
    )
    model = build_model(cfg, data.vocab_size).to(device)
    raw_model = model
    breakdown = model.parameter_breakdown()
    flops_per_token = model.flops_per_token(trainer.seq_len)
    total_steps, accum = plan_steps(cfg, info.world_size)
    tokens_per_step = trainer.micro_batch_size * trainer.seq_len * accum * info.world_size
    if info.is_main:
        log.info("model: %s", ", ".join(f"{k}={v:,}" for k, v in breakdown.items()))
        for line in describe_backends(model):
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
    if trainer.activation_checkpointing:
        for block in model.blocks:
            block.activation_checkpointing = True
    if trainer.compile:
        for block in model.blocks:
            block.compile()
    strategy = distributed.resolve_strategy(trainer.strategy, info)
    model = distributed.wrap_model(model, strategy, device)
    optimizer = build_optimizer(model, trainer, device.type, total_steps=total_steps)
    scheduler = build_scheduler(optimizer, trainer, total_steps)
    loader = data.train_loader(trainer.micro_batch_size, pin_memory=device.type == "cuda")
    val_batches = data.val_batches(trainer.micro_batch_size, trainer.eval_tokens)
    state = TrainerState(step=0, tokens_seen=0, loader=loader.state_dict())
    signature = model_signature(raw_model.state_dict())

    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, signature)
        distributed.load_full_state(
            model, optimizer, ckpt.model_state, ckpt.optimizer_state["optimizer"], strategy
        )
        scheduler.load_state_dict(ckpt.optimizer_state["scheduler"])
        loader.load_state_dict(ckpt.trainer_state.loader)
        set_rng_state(ckpt.rng)
        state = ckpt.trainer_state
        log.info("resumed from %s (step %d)", resume_from, state.step)

    def checkpoint() -> None:
        state.loader = loader.state_dict()
        model_state, optim_state = distributed.full_state(model, optimizer, strategy)
        if info.is_main:
            path = save_checkpoint(
                run_dir / "checkpoints",
                model_state,
                {"optimizer": optim_state, "scheduler": scheduler.state_dict()},
                state,
                trainer.keep_checkpoints,
            )
            log.info("checkpoint: %s", path)
        distributed.barrier(info)

    recorder.attach_wandb(
        OmegaConf.to_container(cfg, resolve=True),
        cfg.wandb,
        f"{cfg.mixin.name}-{cfg.ffn.name}-{cfg.positional.name}-s{cfg.seed}",
    )
    recorder.update_summary(
        params_total=breakdown["total"],
        params_non_embedding=breakdown["non_embedding"],
        params_active=breakdown["active"],
        flops_per_token=flops_per_token,
        steps=state.step,
        decode_state_size=raw_model.decode_state_size(trainer.seq_len),
        total_steps=total_steps,
    )
    throughput = Throughput(3 * flops_per_token, peak_flops(device), info.world_size)
    stepper = [m for m in raw_model.modules() if hasattr(m, "after_optimizer_step")]
    progress = tqdm(
        total=total_steps, initial=state.step, disable=not info.is_main, desc="train", dynamic_ncols=True
    )
    loss_sum = torch.zeros((), device=device)
    loss_count, nonfinite_in_a_row = 0, 0
    last: dict[str, Any] = {}
    model.train()
    throughput.resume()
    first_step = state.step + 1  # excluded from throughput: compilation and warm-up

    while state.step < total_steps:
        if stop.requested:
            throughput.pause()
            checkpoint()
            raise KeyboardInterrupt(
                f"stopped by {stop.requested} at step {state.step}; resume with trainer.resume=true"
            )
        aux_metrics: dict[str, torch.Tensor] = {}
        step_loss = torch.zeros((), device=device)
        for micro in range(accum):
            inputs, targets = next(loader)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with distributed.gradient_sync(model, strategy, enabled=micro == accum - 1), autocast():
                out = model(inputs, targets=targets, return_logits=False)
                (out.loss / accum).backward()
            step_loss += out.lm_loss.detach() / accum
            aux_metrics = out.aux
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):  # the one per-step sync: skip a non-finite step
            optimizer.zero_grad(set_to_none=True)
            state.nonfinite_skipped += 1
            nonfinite_in_a_row += 1
            log.warning(
                "non-finite loss/gradient at step %d: step skipped (%d in a row)",
                state.step,
                nonfinite_in_a_row,
            )
            if nonfinite_in_a_row >= trainer.max_nonfinite_steps:
                raise ArchiFactoryError(
                    f"{nonfinite_in_a_row} non-finite steps in a row at step {state.step}; stopped. The last good "
                    f"checkpoint is in {run_dir / 'checkpoints'}: lower trainer.lr or raise trainer.warmup_steps"
                )
            continue
        nonfinite_in_a_row = 0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for module in stepper:
            module.after_optimizer_step()
        state.step += 1
        state.tokens_seen += tokens_per_step
        throughput.add_tokens(tokens_per_step)
        if state.step == first_step:
            throughput.restart()
        loss_sum += step_loss
        loss_count += 1
        progress.update(1)

        is_last = state.step == total_steps
        if state.step % trainer.log_every == 0 or is_last:
            train_loss = float(distributed.all_reduce_mean(loss_sum / loss_count, info))  # sync: log step
            loss_sum.zero_()
            loss_count = 0
            tokens_per_second, mfu = throughput.read()
            record = {
                "step": state.step,
                "tokens_seen": state.tokens_seen,
                "train_loss": train_loss,
                "lr": trainer.lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0],
                "grad_norm": float(grad_norm),
                "tokens_per_second": tokens_per_second,
                "mfu": mfu,
                "nonfinite_skipped": state.nonfinite_skipped,
            }
            record |= {key: value for key, value in aux_metrics.items()}
            imbalance = [float(v) for k, v in aux_metrics.items() if k.endswith(".imbalance")]
            postfix = {"loss": f"{train_loss:.3f}"}
            if tokens_per_second is not None:
                postfix["tok/s"] = f"{tokens_per_second:,.0f}"
            if imbalance:
                postfix["imb"] = f"{max(imbalance):.2f}"
            progress.set_postfix(postfix)
            recorder.log(record)
            run_tokens_per_second, run_mfu = throughput.run_average()
            last.update(train_loss=train_loss, tokens_per_second=run_tokens_per_second, mfu=run_mfu)
        if state.step % trainer.eval_every == 0 or is_last:
            throughput.pause()
            val = evaluate(model, val_batches, device, autocast, data.val_bytes_per_token)
            recorder.log({"step": state.step, "tokens_seen": state.tokens_seen, **val})
            progress.write(f"step {state.step}: val_loss {val['val_loss']:.4f}  val_bpb {val['val_bpb']:.4f}")
            last.update(val)
            recorder.update_summary(
                steps=state.step,
                tokens_seen=state.tokens_seen,
                **last,
                peak_memory_mb=peak_memory_mb(device),
                wall_seconds=time.perf_counter() - wall_start,
            )
            throughput.resume()
        if state.step % trainer.checkpoint_every == 0 or is_last:
            throughput.pause()
            checkpoint()
            throughput.resume()
    progress.close()
    if info.is_main:
        plot_loss_curves(run_dir, f"{cfg.run_name}: {breakdown['total']:,} parameters")
    recorder.finish(
        status="completed",
        steps=state.step,
        tokens_seen=state.tokens_seen,
        **last,
        nonfinite_skipped=state.nonfinite_skipped,
        peak_memory_mb=peak_memory_mb(device),
        wall_seconds=time.perf_counter() - wall_start,
    )
    return recorder.summary
