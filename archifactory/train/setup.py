"""Everything a run holds, built once before the loop: `RunContext` and `setup_run`.

`setup_run` opens the data (SFT: on the pretrained run's tokenizer), builds the model (SFT: from the
pretrained weights), wraps it for the distributed strategy, builds the optimizer and schedule, and restores
all of it from a checkpoint when resuming.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import load_data
from archifactory.data.chat.dataset import ChatData
from archifactory.data.dataset import TokenData
from archifactory.data.loader import PackedLoader
from archifactory.data.synthetic import SyntheticData, SyntheticLoader
from archifactory.hf.pretrained import load_pretrained_parts
from archifactory.model.build import build_model, describe_backends
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.runs.checkpoints import is_sharded
from archifactory.runs.load import load_run_config, load_run_tokenizer, resolve_run, save_run_tokenizer
from archifactory.train import distributed
from archifactory.train.checkpoint import TrainerState, load_checkpoint, model_signature, set_rng_state
from archifactory.train.dcp import PendingSave, load_sharded
from archifactory.train.init_from import init_from_pretrained
from archifactory.train.metrics import RunRecorder
from archifactory.train.optim import build_optimizer
from archifactory.train.plan import write_run_plan
from archifactory.train.runtime import autocast_factory, seed_everything
from archifactory.train.schedule import build_scheduler, plan_steps

log = logging.getLogger(__name__)

Autocast = Callable[[], AbstractContextManager]


@dataclass
class RunContext:
    """Everything one run holds, built once by `setup_run` and passed to the loop's pieces."""

    cfg: DictConfig
    run_dir: Path
    info: distributed.DistInfo
    device: torch.device
    autocast: Autocast
    recorder: RunRecorder
    data: TokenData | SyntheticData | ChatData
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
    pending: PendingSave | None = None  # trainer.async_checkpoint: a sharded checkpoint still being written
    last: dict[str, Any] = field(default_factory=dict)  # latest train/val figures for summary.json


def open_data(cfg: DictConfig, info: distributed.DistInfo) -> TokenData | SyntheticData | ChatData:
    """The run's data for this rank; chat data (SFT) on the tokenizer of the run it starts from."""
    base = None
    if cfg.dataset.get("source") == "chat":
        pretrained = resolve_run(cfg.dataset.tokenizer_from)
        base = load_run_tokenizer(pretrained, load_run_config(pretrained))
    return load_data(
        cfg.dataset,
        seq_len=cfg.trainer.seq_len,
        seed=cfg.seed,
        rank=info.rank,
        world_size=info.world_size,
        base_tokenizer=base,
    )


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
    data = open_data(cfg, info)
    if info.is_main:
        if data.tokenizer is not None:  # a synthetic probe has none
            save_run_tokenizer(run_dir, data.tokenizer)  # generate/eval/export load it from the run dir
        distributed.barrier(info)
    log.info(
        "data: vocab=%d, %s",
        data.vocab_size,
        data.description,
    )
    if cfg.model.get("pretrained_from") and data.vocab_size > cfg.model.vocab_size:
        raise ArchiFactoryError(
            f"the tokenizer has {data.vocab_size} tokens but {cfg.model.pretrained_from} embeds only "
            f"{cfg.model.vocab_size}; use a source whose embedding covers its tokenizer"
        )
    # model.pretrained_from: the source's embedding, final norm and head, passed to the constructor
    raw_model = build_model(cfg, data.vocab_size, **load_pretrained_parts(cfg))
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
        if resume_from is None:  # the run's plan: size, FLOPs, memory per GPU, wall time (plan.md)
            write_run_plan(cfg, run_dir, info.world_size, data.vocab_size)
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
        signature = model_signature(raw_model.state_dict())
        if is_sharded(resume_from):  # DCP: each rank reads its slice, whatever world size wrote it
            extra, state = load_sharded(resume_from, model, optimizer, signature)
            scheduler.load_state_dict(extra["scheduler"])
            set_rng_state(extra["rng"])
        else:
            ckpt = load_checkpoint(resume_from, signature)
            distributed.load_full_state(
                model, optimizer, ckpt.model_state, ckpt.optimizer_state["optimizer"], strategy
            )
            scheduler.load_state_dict(ckpt.optimizer_state["scheduler"])
            set_rng_state(ckpt.rng)
            state = ckpt.trainer_state
        loader.load_state_dict(state.loader)
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
