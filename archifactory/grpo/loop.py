"""The GRPO loop: `grpo` claims the run directory, `_steps` is the loop to read top to bottom.

One step = one rollout batch: `prompts_per_step` problems, each sampled `num_generations` times with the
policy's exact decode state (old log-probs recorded as tokens are drawn), scored by the reward functions,
turned into group advantages, then `num_iterations` optimizer updates on the clipped objective
(`objective.py`). With `num_iterations=1` the "old" log-probs are the update's own, detached (ratio 1,
TRL's choice); with more, the ones recorded at rollout.

The run-directory contract is `train`'s (`archifactory.runs`, `train.resume`): lock, fresh/resume/done
decided before a byte is written, `.hydra/` claimed, `metrics.jsonl` one record per step, `summary.json`
through the recorder (`reward` = mean over the last 10% of steps, `reward_first` over the first 10%),
atomic checkpoints every `trainer.checkpoint_every` steps. Resume is exact: which problems a step draws
and every sampling generator are functions of (seed, step), and the checkpoint holds model, optimizer,
schedule and RNG.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from archifactory.config.hybrid import cfg_variant_label
from archifactory.core.errors import ArchiFactoryError
from archifactory.generate.export import write_model_folder
from archifactory.grpo.objective import group_advantages, policy_loss, zero_spread_fraction
from archifactory.grpo.rewards import RewardContext, check_rewards, score
from archifactory.grpo.rollout import Rollout, sample, sequence_logps
from archifactory.grpo.run import Task, check_options, prepare
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.runs import layout
from archifactory.runs.files import discard, is_empty
from archifactory.runs.load import load_run, save_run_tokenizer
from archifactory.runs.lock import locked
from archifactory.runs.log import detach_log_file
from archifactory.runs.records import read_metrics
from archifactory.train.checkpoint import (
    TrainerState,
    load_checkpoint,
    model_signature,
    save_checkpoint,
    set_rng_state,
)
from archifactory.train.metrics import Progress, RunRecorder, peak_memory_mb
from archifactory.train.optim import build_optimizer
from archifactory.train.resume import claim_run, finish_completed, plan_run
from archifactory.train.runtime import configure_backends, resolve_device, seed_everything
from archifactory.train.schedule import build_scheduler
from archifactory.train.signals import StopRequest

log = logging.getLogger(__name__)


@dataclass
class GRPORun:
    """Everything the loop holds."""

    cfg: DictConfig
    run_dir: Path
    task: Task
    reference: StackedMixinForCausalLM | None  # frozen init policy; None when beta = 0
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainerState
    rewards: dict[str, float]
    context: RewardContext
    recorder: RunRecorder
    wall_start: float


def grpo(cfg: DictConfig, init: Path, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train the init run's model with GRPO on `cfg.dataset` into `run_dir`; returns the summary."""
    fresh = is_empty(run_dir)
    try:
        check_options(cfg)
        device = resolve_device(cfg.trainer.device)
        with locked(run_dir):
            plan = plan_run(cfg, run_dir, cfg.trainer.max_steps)
            if plan.completed is not None:
                return finish_completed(run_dir, plan, True)
            task = prepare(cfg, init, device)  # every refusal before the directory is claimed
            claim_run(cfg, run_dir, overrides or [], plan)
            save_run_tokenizer(run_dir, task.tokenizer)
            summary = _run(
                cfg, run_dir, init, task, plan.resume_from, plan.resume_step, plan.previous_summary
            )
    except (ArchiFactoryError, KeyboardInterrupt):
        if fresh and is_empty(run_dir):
            discard(run_dir)
        raise
    detach_log_file()
    return summary


def _run(
    cfg: DictConfig,
    run_dir: Path,
    init: Path,
    task: Task,
    resume_from: Path | None,
    resume_step: int | None,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    trainer, device = cfg.trainer, task.model.head_weight.device
    configure_backends(device, trainer.num_threads)
    seed_everything(cfg.seed)
    recorder = RunRecorder(
        run_dir,
        True,
        {
            "mixin": cfg_variant_label(cfg),
            "ffn": cfg.ffn.name,
            "positional": cfg.positional.name,
            "dataset": cfg.dataset.name,
            "seed": cfg.seed,
            "run_dir": str(run_dir),
            "init_from": str(init),
            "loss_type": str(cfg.grpo.loss_type),
        },
    )
    recorder.start(resume_step, previous)
    wall_start = time.perf_counter()
    try:
        with StopRequest() as stop:
            run = _setup(cfg, run_dir, init, task, recorder, resume_from, wall_start)
            return _steps(run, stop)
    except BaseException as error:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        try:
            recorder.finish(status=status, error=str(error) or type(error).__name__,
                            wall_seconds=time.perf_counter() - wall_start)  # fmt: skip
        except Exception as record_error:
            log.warning("could not record status %s in %s: %s", status, layout.SUMMARY, record_error)
        raise


def _setup(
    cfg: DictConfig,
    run_dir: Path,
    init: Path,
    task: Task,
    recorder: RunRecorder,
    resume_from: Path | None,
    wall_start: float,
) -> GRPORun:
    updates = cfg.trainer.max_steps * cfg.grpo.num_iterations
    optimizer = build_optimizer(
        task.model, cfg.trainer, task.model.head_weight.device.type, total_steps=updates
    )
    scheduler = build_scheduler(optimizer, cfg.trainer, updates)
    state = TrainerState(step=0, tokens_seen=0, loader={"problems_drawn": 0})
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from, model_signature(task.model.state_dict()))
        task.model.load_state_dict(ckpt.model_state)
        optimizer.load_state_dict(ckpt.optimizer_state["optimizer"])
        scheduler.load_state_dict(ckpt.optimizer_state["scheduler"])
        set_rng_state(ckpt.rng)
        state = ckpt.trainer_state
        log.info("resumed from %s (step %d)", resume_from, state.step)
    reference = None
    if cfg.grpo.beta != 0.0:  # the frozen init policy; with beta = 0 none is kept in memory
        reference = load_run(init, task.model.head_weight.device).model.requires_grad_(False)
    recorder.update_summary(
        params_total=task.model.parameter_breakdown()["total"],
        params_non_embedding=task.model.parameter_breakdown()["non_embedding"],
        decode_state_size=task.model.decode_state_size(cfg.trainer.seq_len),
        total_steps=cfg.trainer.max_steps,
        chat_template=task.chat,
    )
    g = cfg.grpo
    context = RewardContext(g.sandbox, g.allow_unsandboxed, g.code_timeout)
    return GRPORun(cfg, run_dir, task, reference, optimizer, scheduler, state,
                   check_rewards(list(g.reward_funcs), g.reward_weights), context, recorder, wall_start)  # fmt: skip


def draw_problems(step: int, count: int, total: int, seed: int) -> list[int]:
    """The problem indices of rollout `step`: epochs of a permutation seeded by (seed, epoch)."""
    picks = []
    for position in range(step * count, (step + 1) * count):
        epoch, offset = divmod(position, total)
        order = list(range(total))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        picks.append(order[offset])
    return picks


def row_seed(seed: int, step: int, row: int) -> int:
    """The sampling generator of one completion: a function of (seed, step, row), so a resume redraws it."""
    return (seed * 1_000_003**2 + step * 1_000_003 + row) % 2**63


def _steps(run: GRPORun, stop: StopRequest) -> dict[str, Any]:
    cfg, state = run.cfg, run.state
    progress = Progress(cfg.trainer.max_steps, state.step, enabled=True)
    while state.step < cfg.trainer.max_steps:
        if stop.requested:
            checkpoint(run)
            raise KeyboardInterrupt(
                f"stopped by {stop.requested} at step {state.step}; resume with trainer.resume=true"
            )
        record = grpo_step(run)
        progress.advance()
        if state.step % cfg.trainer.log_every == 0 or state.step == cfg.trainer.max_steps:
            progress.write(f"step {state.step}: reward {record['reward']:.3f}  loss {record['loss']:.4f}  "
                           f"length {record['completion_length']:.1f}")  # fmt: skip
        if state.step % cfg.trainer.checkpoint_every == 0 or state.step == cfg.trainer.max_steps:
            checkpoint(run)
    progress.close()
    write_model_folder(run.run_dir)
    run.recorder.finish(
        status="completed",
        steps=state.step,
        tokens_seen=state.tokens_seen,
        **reward_window(run.run_dir),
        peak_memory_mb=peak_memory_mb(run.task.model.head_weight.device),
        wall_seconds=time.perf_counter() - run.wall_start,
    )
    return run.recorder.summary


def rollout_batch(run: GRPORun) -> tuple[Rollout, list[int], list[str]]:
    """Sample G completions of each of this step's problems; (rollout, problem index per row, texts)."""
    g, task, step = run.cfg.grpo, run.task, run.state.step
    chosen = draw_problems(
        step, g.prompts_per_step, len(task.problems), run.cfg.dataset.data_seed + run.cfg.seed
    )
    rows = [index for index in chosen for _ in range(g.num_generations)]
    rollout = sample(
        task.model, [task.prompts[i] for i in rows], g.max_completion_length, g.temperature, g.top_p,
        task.stop_ids, task.pad_id, [row_seed(run.cfg.seed, step, r) for r in range(len(rows))],
    )  # fmt: skip
    texts = []
    for row in range(len(rows)):
        tokens = rollout.completion(row)
        texts.append(task.tokenizer.decode(tokens[:-1] if tokens and tokens[-1] in task.stop_ids else tokens))
    return rollout, rows, texts


def grpo_step(run: GRPORun) -> dict[str, Any]:
    """One rollout batch and its `num_iterations` updates; returns (and logs) the step's record."""
    g, task = run.cfg.grpo, run.task
    started = time.perf_counter()
    rollout, rows, texts = rollout_batch(run)
    total, parts = score(run.rewards, texts, [task.problems[i] for i in rows], run.context)
    rewards = torch.tensor(total, dtype=torch.float32)
    advantages = group_advantages(rewards, g.num_generations, str(g.scale_rewards)).to(rollout.tokens.device)
    rollout_seconds = time.perf_counter() - started
    tokens = sum(len(p) for p in rollout.prompts) + int(rollout.mask.sum())
    ref_logp = None
    if run.reference is not None:
        with torch.no_grad():
            ref_logp = sequence_logps(run.reference, rollout, g.temperature)[0]
    started = time.perf_counter()
    for _ in range(g.num_iterations):
        logp, entropy = sequence_logps(task.model, rollout, g.temperature)
        old = logp.detach() if g.num_iterations == 1 else rollout.old_logp
        loss = policy_loss(
            logp, old, advantages, rollout.mask, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
            loss_type=str(g.loss_type), max_completion_length=g.max_completion_length, beta=g.beta, ref_logp=ref_logp,
        )  # fmt: skip
        loss.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(
            task.model.parameters(), run.cfg.trainer.grad_clip or float("inf")
        )
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    update_seconds = time.perf_counter() - started
    run.state.step += 1
    run.state.tokens_seen += tokens
    run.state.loader = {"problems_drawn": run.state.step * g.prompts_per_step}
    mask = rollout.mask.float()
    record: dict[str, Any] = {
        "step": run.state.step,
        "tokens_seen": run.state.tokens_seen,
        "reward": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        **{f"reward/{name}": sum(v) / len(v) for name, v in parts.items()},
        **{f"reward/{name}_std": float(torch.tensor(v).std()) for name, v in parts.items()},
        "zero_spread_fraction": zero_spread_fraction(rewards, g.num_generations),
        "completion_length": float(mask.sum(-1).mean()),
        "loss": float(loss.loss.detach()),
        "clip_fraction": float(loss.clip_fraction),
        "kl": None if loss.kl is None else float(loss.kl),
        "entropy": float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1)),
        "grad_norm": float(grad_norm),
        "lr": run.scheduler.get_last_lr()[0],
        "rollout_tokens_per_second": tokens / max(rollout_seconds, 1e-9),
        "update_tokens_per_second": tokens * g.num_iterations / max(update_seconds, 1e-9),
    }
    run.recorder.log(record)
    return record


def checkpoint(run: GRPORun) -> None:
    """Model, optimizer, schedule, RNG and the step (which fixes the data position and the samplers)."""
    path = save_checkpoint(
        layout.checkpoints_dir(run.run_dir),
        run.task.model.state_dict(),
        {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()},
        run.state,
        run.cfg.trainer.keep_checkpoints,
    )
    log.info("checkpoint: %s", path)
    run.recorder.update_summary(steps=run.state.step, tokens_seen=run.state.tokens_seen)


def reward_window(run_dir: Path) -> dict[str, float | None]:
    """Mean reward over the first and the last 10% of the logged steps (at least one step each)."""
    rewards = [r["reward"] for r in read_metrics(layout.metrics_path(run_dir)) if r.get("reward") is not None]
    if not rewards:
        return {"reward": None, "reward_first": None}
    width = max(1, math.ceil(len(rewards) / 10))
    return {"reward": sum(rewards[-width:]) / width, "reward_first": sum(rewards[:width]) / width}
