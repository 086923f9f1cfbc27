"""The plan of a training run, before it runs: size, compute, memory per GPU and wall time, as one table.

`build_plan(cfg, world_size)` builds the model on PyTorch's meta device (shapes only: no memory, no
data, no GPU) and returns `TrainingPlan`; `render_plan` prints it as one Markdown table. `archifactory plan
<overrides>` prints it, and a training run writes the same table to `<run_dir>/plan.md` when it starts.
It lives in `train/` because it plans *this* trainer's run: the step count is `schedule.plan_steps`, the
optimizer state follows `optim.classify_parameters`, the peak FLOP/s are `runtime.PEAK_BF16_FLOPS`.

What each figure is (docs/plan.md has the derivations):

- parameters: `parameter_breakdown()` of the meta-built model (total, non-embedding, active), and how many
  of them train: `model.pretrained_from` builds the source's embedding / final norm / head (their shapes
  only, from its config: no weights are read) and `model.freeze_pretrained=true` freezes them as the run
  does, so gradients and optimizer state count the trainable parameters only.
- FLOPs per token: the model's own `flops_per_token(seq_len)` (forward, multiply-add = 2, attention's
  causal prefix included); training costs 3× that (backward = 2× forward), the figure MFU is measured
  against. Total FLOPs = 3 · F · D for D tokens: the 6·N·D rule with the model's own F in place of 2·N.
  Activation checkpointing recomputes the forward (4 · F · D executed), which MFU by convention does not
  count (Chowdhery et al., "PaLM", 2022, appendix B), so wall time = 3 · F · D / (GPUs · peak · MFU).
- memory per GPU, bytes: fp32 master parameters (4/param) and gradients (4/param); optimizer state from
  the real optimizer's state per trainable parameter (AdamW: 2 fp32 moments + a 4-byte step per tensor;
  Muon: one fp32 momentum per matrix element, AdamW for the rest; AdEMAMix: 3 fp32 moments); `fsdp`
  divides these by the world size and adds the gathered working set (the root's parameters and gradients
  stay unsharded; two blocks' parameters are gathered at a time, one being prefetched); `ddp` adds its
  gradient buckets (a second fp32 copy of the gradients). bf16 autocast keeps a bf16 copy of every matmul
  weight for the backward (2/param), frozen ones included (the backward still needs them for the input's
  gradient).
- activations: the tensors autograd saves for the backward, traced on the meta device through the
  model's real forward at micro_batch_size × seq_len in the planned compute dtype (`train/activations.py`).
  Without checkpointing: all of them. With it: the part outside the blocks (embedding, final norm, loss),
  each block's input (what the checkpoint keeps) and the largest block's saved tensors (recomputed one
  block at a time). Plus the loss's workspace (`loss_workspace_bytes`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from archifactory.config.hybrid import cfg_variant_label
from archifactory.core.errors import ArchiFactoryError
from archifactory.hf.pretrained import pretrained_part_modules
from archifactory.model.build import build_model
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.runs import layout
from archifactory.runs.files import write_atomic
from archifactory.train.activations import ActivationTrace, trace_activations
from archifactory.train.optim import classify_parameters
from archifactory.train.runtime import PEAK_BF16_FLOPS
from archifactory.train.schedule import plan_steps

log = logging.getLogger(__name__)

DEFAULT_MFU = 0.4
# GPUs the wall time is given for, with their memory in bytes; peak dense bf16 FLOP/s from
# runtime.PEAK_BF16_FLOPS. H100 SXM: 989 TFLOP/s bf16 dense, 80 GB (NVIDIA H100 datasheet); H200: the same
# compute, 141 GB (NVIDIA H200 datasheet); RTX 4090: 165.2 TFLOP/s bf16 with fp32 accumulate, dense, 24 GB
# (NVIDIA Ada Lovelace architecture whitepaper, appendix table "GeForce RTX 4090").
GPUS = {"H100": 80 * 2**30, "H200": 141 * 10**9, "RTX 4090": 24 * 2**30}
ADAMW_BYTES = 8  # exp_avg + exp_avg_sq, fp32
ADEMAMIX_BYTES = 12  # fast and slow EMAs + exp_avg_sq, fp32
MUON_BYTES = 4  # momentum_buffer, fp32
STEP_BYTES = 4  # AdamW's per-tensor `step` (a 0-d fp32 tensor)


@dataclass
class MemoryPlan:
    """Bytes per GPU, by part."""

    parameters: int
    gradients: int
    optimizer: int
    weight_copies: int  # bf16 autocast copies of the matmul weights
    activations: int | None  # without activation checkpointing; None: could not be traced
    activations_checkpointed: int | None
    loss_workspace: int

    def total(self, checkpointing: bool) -> int | None:
        acts = self.activations_checkpointed if checkpointing else self.activations
        if acts is None:
            return None
        static = self.parameters + self.gradients + self.optimizer + self.weight_copies
        return static + acts + self.loss_workspace


@dataclass
class TrainingPlan:
    label: str
    breakdown: dict[str, int]
    flops_per_token: float  # forward, the model's own count
    steps: int
    accum: int
    tokens_per_step: int
    trainable: int  # parameters the optimizer updates (model.freeze_pretrained leaves the source's out)
    pretrained: str | None  # model.pretrained_from: which parts come from where; None without a source
    world_size: int
    strategy: str
    optimizer: str
    dtype: str
    micro_batch_size: int
    seq_len: int
    checkpointing: bool
    memory: MemoryPlan
    mfu: float
    notes: list[str] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def total_flops(self) -> float:
        return 3 * self.flops_per_token * self.tokens

    def wall_seconds(self, peak_flops: float) -> float:
        return self.total_flops / (self.world_size * peak_flops * self.mfu)


def planned_strategy(strategy: str, world_size: int) -> str:
    """The strategy a run with `world_size` processes takes (train/distributed.resolve_strategy's rule)."""
    if strategy == "auto":
        return "ddp" if world_size > 1 else "single"
    if strategy == "single" and world_size > 1:
        raise ArchiFactoryError("trainer.strategy=single with several processes; use ddp or fsdp")
    return strategy


def planned_dtype(cfg: DictConfig) -> torch.dtype:
    """The compute dtype: bf16 autocast for `bf16`, and for `auto` unless the run is pinned to the CPU."""
    precision, device = str(cfg.trainer.precision), str(cfg.trainer.device)
    bf16 = precision == "bf16" or (precision == "auto" and device != "cpu")
    return torch.bfloat16 if bf16 else torch.float32


def optimizer_state_bytes(model: nn.Module, optimizer: str) -> int:
    """Bytes of the optimizer's state for `model`'s trainable parameters, as `train/optim.py` builds it."""
    classes = classify_parameters(model)
    everything = classes.decay + classes.no_decay
    if optimizer == "ademamix":
        return ADEMAMIX_BYTES * sum(p.numel() for _, p in everything)
    adamw = everything
    muon = 0
    if optimizer == "muon" and classes.matrix:
        adamw = classes.head + classes.no_decay
        muon = MUON_BYTES * sum(p.numel() for _, p in classes.matrix)
    return muon + sum(ADAMW_BYTES * p.numel() + STEP_BYTES for _, p in adamw)


def _numel(module: nn.Module | None, trainable: bool = False) -> int:
    """Parameters of `module` (each tensor once); `trainable`: only those that require a gradient."""
    if module is None:
        return 0
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _matmul_weights(model: nn.Module) -> int:
    """Elements of every Linear weight (frozen ones too) and of a tied head: what bf16 autocast casts."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and "weight" in m._parameters}
    count = sum(p.numel() for p in model.parameters() if id(p) in linear and p.ndim >= 2)
    return count + (model.head_weight.numel() if model.lm_head is None else 0)


def loss_workspace_bytes(batch_tokens: int, chunk: int, vocab: int, dtype: torch.dtype) -> int:
    """What the cross-entropy holds beyond the traced activations (`model/loss.py`). Whole micro-batch
    (chunk 0, or a chunk no smaller than it): its fp32 logits beside the log-probabilities it saves
    (traced), plus the compute-dtype logits they were cast from under bf16. Chunked: each chunk runs under
    checkpointing, so its backward recomputes one chunk's logits (compute dtype and fp32) and
    log-probabilities, which the trace does not see; the backward then turns the log-probabilities into
    the gradient in place."""
    compute = torch.empty((), dtype=dtype).element_size()
    cast = compute if dtype != torch.float32 else 0
    if 0 < chunk < batch_tokens:
        return chunk * vocab * (4 + 4 + cast)
    return batch_tokens * vocab * (4 + cast)


def memory_plan(
    model: StackedMixinForCausalLM,
    trace: ActivationTrace | None,
    optimizer: str,
    strategy: str,
    world_size: int,
    dtype: torch.dtype,
    loss_workspace: int,
) -> MemoryPlan:
    """Bytes per GPU (see the module docstring for each term)."""
    total, trainable = _numel(model), _numel(model, trainable=True)
    optim_bytes = optimizer_state_bytes(model, optimizer)
    params, grads = 4 * total, 4 * trainable
    if strategy == "fsdp":
        if optimizer == "muon":
            raise ArchiFactoryError(
                "trainer.optimizer=muon cannot step FSDP-sharded parameters; use trainer.strategy=ddp, "
                "or another optimizer with fsdp"
            )
        # model.weights=hyper shards the root unit alone (the blocks share block 0's weights)
        units = list(model.blocks) if getattr(model, "hyper", None) is None else []
        root = total - sum(_numel(b) for b in units)  # embedding, head, final norm: the root unit
        block = max((_numel(b) for b in units), default=0)
        root_trainable = trainable - sum(_numel(b, trainable=True) for b in units)
        block_trainable = max((_numel(b, trainable=True) for b in units), default=0)
        params = -(-params // world_size) + 4 * (root + 2 * block)
        grads = -(-grads // world_size) + 4 * (root_trainable + block_trainable)
        optim_bytes = -(-optim_bytes // world_size)
    elif strategy == "ddp":
        grads *= 2  # the .grad tensors + DDP's communication buckets (gradient_as_bucket_view=False)
    compute = torch.empty((), dtype=dtype).element_size()
    copies = 0 if dtype == torch.float32 else compute * _matmul_weights(model)
    return MemoryPlan(
        parameters=params,
        gradients=grads,
        optimizer=optim_bytes,
        weight_copies=copies,
        activations=trace.full if trace else None,
        activations_checkpointed=trace.checkpointed if trace else None,
        loss_workspace=loss_workspace,
    )


def build_plan(
    cfg: DictConfig, world_size: int, mfu: float = DEFAULT_MFU, vocab_size: int | None = None
) -> TrainingPlan:
    """The plan of `cfg` (a composed, validated, matched config) on `world_size` processes.

    `vocab_size`: the tokenizer's, when known (a starting run); else `model.vocab_size` or the dataset's
    `vocab_size` (the BPE size), as `archifactory list --params` does: no data is read. With
    `model.pretrained_from`, `cfg` is the one `hf.pretrained.apply_pretrained` returned (the source's
    vocabulary and norm eps), as the run's is.
    """
    if not 0 < mfu <= 1:
        raise ArchiFactoryError(f"plan.mfu={mfu} must be in (0, 1], e.g. plan.mfu=0.4")
    if world_size < 1:
        raise ArchiFactoryError(f"plan.world_size={world_size} must be a positive integer")
    trainer = cfg.trainer
    vocab = cfg.model.vocab_size or vocab_size or cfg.dataset.get("vocab_size")  # build_model's order
    if not vocab:
        raise ArchiFactoryError("the vocabulary size is unknown: set model.vocab_size=<N>")
    strategy = planned_strategy(str(trainer.strategy), world_size)
    dtype = planned_dtype(cfg)
    steps, accum = plan_steps(cfg, world_size)
    source = cfg.model.get("pretrained_from")
    with torch.device("meta"):
        parts = pretrained_part_modules(cfg, int(vocab)) if source else {}
        model = build_model(cfg, int(vocab), **parts).to(dtype)
    batch, seq_len = int(trainer.micro_batch_size), int(trainer.seq_len)
    trace = trace_activations(model, batch, seq_len)
    notes = [] if isinstance(trace, ActivationTrace) else [f"activations not estimated: {trace}"]
    memory = memory_plan(
        model,
        trace if isinstance(trace, ActivationTrace) else None,
        str(trainer.optimizer),
        strategy,
        world_size,
        dtype,
        loss_workspace_bytes(batch * seq_len, int(cfg.model.loss_chunk_size), model.vocab_size, dtype),
    )
    return TrainingPlan(
        label=f"{cfg_variant_label(cfg)}/{cfg.ffn.name}/{cfg.positional.name}, {cfg.model.num_layers} layers × "
        f"{cfg.model.hidden_size}, vocab {int(vocab):,}",
        breakdown=model.parameter_breakdown(),
        flops_per_token=model.flops_per_token(seq_len),
        steps=steps,
        accum=accum,
        tokens_per_step=batch * seq_len * accum * world_size,
        trainable=_numel(model, trainable=True),
        pretrained=_pretrained_parts(cfg) if source else None,
        world_size=world_size,
        strategy=strategy,
        optimizer=str(trainer.optimizer),
        dtype="bf16" if dtype == torch.bfloat16 else "fp32",
        micro_batch_size=batch,
        seq_len=seq_len,
        checkpointing=bool(trainer.activation_checkpointing),
        memory=memory,
        mfu=mfu,
        notes=notes,
    )


def _pretrained_parts(cfg: DictConfig) -> str:
    """Which parts `model.pretrained_from` loads, from where, and whether they train."""
    head = "tied head" if cfg.model.tie_embeddings else "LM head"
    state = "frozen" if cfg.model.freeze_pretrained else "trained"
    return f"embedding, final norm, {head} from {cfg.model.pretrained_from} ({state})"


def _count(value: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:,.2f}{unit}"
    return f"{value:,.0f}"


def _gib(nbytes: float | None) -> str:
    if nbytes is None:
        return "n/a"
    if nbytes < 2**30:
        return f"{nbytes / 2**20:,.1f} MiB"
    return f"{nbytes / 2**30:,.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:,.1f} days"
    if seconds >= 3600:
        return f"{seconds / 3600:,.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:,.1f} min"
    return f"{seconds:,.1f} s"


def plan_rows(plan: TrainingPlan) -> list[tuple[str, str, str]]:
    """(quantity, value, how) rows of the plan table."""
    b, m = plan.breakdown, plan.memory
    per_gpu = f"per GPU, {plan.strategy} × {plan.world_size}"
    ckpt = "chosen" if plan.checkpointing else "not chosen"
    no_ckpt = "not chosen" if plan.checkpointing else "chosen"
    rows = [("model", plan.label, f"{plan.dtype} compute, optimizer {plan.optimizer}")]
    if plan.pretrained:
        rows.append(("pretrained parts", plan.pretrained, "model.pretrained_from, model.freeze_pretrained"))
    rows += [
        ("parameters: total", f"{b['total']:,}", "meta-built model"),
        ("parameters: non-embedding", f"{b['non_embedding']:,}", "blocks + final norm"),
        ("parameters: active", f"{b['active']:,}", "per token (MoE: the experts used)"),
        ("parameters: trainable", f"{plan.trainable:,}", f"frozen: {b['total'] - plan.trainable:,}"),
        ("FLOPs per token (forward)", _count(plan.flops_per_token), f"model.flops_per_token({plan.seq_len})"),
        (
            "tokens to train",
            _count(plan.tokens),
            f"{plan.steps:,} steps × {plan.tokens_per_step:,} (micro-batch {plan.micro_batch_size} × seq "
            f"{plan.seq_len} × accum {plan.accum} × world {plan.world_size})",
        ),
        ("total training FLOPs", f"{plan.total_flops:.3g}", "3 × FLOPs/token × tokens (forward + backward)"),
        ("memory: parameters", _gib(m.parameters), f"{per_gpu}; fp32 master weights"),
        ("memory: gradients", _gib(m.gradients), f"{per_gpu}; fp32, trainable parameters"),
        (
            "memory: optimizer state",
            _gib(m.optimizer),
            f"{per_gpu}; {_optimizer_note(plan.optimizer)}, trainable parameters",
        ),
    ]
    if m.weight_copies:
        rows.append(
            ("memory: bf16 weight copies", _gib(m.weight_copies), "autocast's casts, kept for backward")
        )
    acts = f"micro-batch {plan.micro_batch_size} × {plan.seq_len}, traced on the meta device"
    rows += [
        ("memory: activations", _gib(m.activations), f"{acts}; no checkpointing ({no_ckpt})"),
        ("memory: activations, checkpointed", _gib(m.activations_checkpointed), f"per-block checkpointing ({ckpt})"),
        ("memory: loss workspace", _gib(m.loss_workspace), "one loss chunk's logits (+ log-probs when chunked)"),
        ("memory: total", _gib(m.total(False)), f"{per_gpu}; without checkpointing"),
        ("memory: total, checkpointed", _gib(m.total(True)), f"{per_gpu}; with checkpointing"),
    ]  # fmt: skip
    need = m.total(plan.checkpointing)
    for gpu, memory in GPUS.items():
        fits = "?" if need is None else "fits" if need <= memory else "does NOT fit"
        peak = PEAK_BF16_FLOPS[gpu]
        rows.append(
            (
                f"wall time: {plan.world_size} × {gpu}",
                _duration(plan.wall_seconds(peak)),
                f"{plan.mfu:.0%} MFU of {peak / 1e12:,.0f} TFLOP/s bf16 dense; {_gib(memory)}: {fits}",
            )
        )
    rows += [("note", note, "") for note in plan.notes]
    return rows


def _optimizer_note(optimizer: str) -> str:
    return {
        "adamw": "AdamW: 2 fp32 moments",
        "muon": "Muon: 1 fp32 momentum on matrices, AdamW on the rest",
        "ademamix": "AdEMAMix: 3 fp32 moments",
    }[optimizer]


def render_plan(plan: TrainingPlan) -> str:
    """The plan as one Markdown table."""
    rows = [("quantity", "value", "how"), *plan_rows(plan)]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines) + "\n"


def write_run_plan(cfg: DictConfig, run_dir: Path, world_size: int, vocab_size: int) -> Path | None:
    """`<run_dir>/plan.md`: the plan of the run that is starting, written atomically. A plan that cannot be
    made is a warning in the log, never the end of the run it describes; None then."""
    try:
        plan = build_plan(cfg, world_size, vocab_size=vocab_size)
    except Exception as error:  # whatever it is, the run itself goes on
        log.warning("%s not written: %s: %s", layout.PLAN, type(error).__name__, error)
        return None
    path = layout.plan_path(run_dir)
    write_atomic(path, render_plan(plan))
    return path
