"""The one place that checks a composed config's values before anything is prepared, built or written.

The schemas (`archifactory.config.schema`) already fix every key's type and every choice (typed enums), so a
typo or `trainer.optimizer=adamx` fails at compose time. What a type cannot say is checked here:
ranges (lr > 0, intervals >= 1, heads >= 1 and dividing the width, …) and relations between keys
(kv heads dividing heads, top-k <= experts, the model's context >= the training sequence). Every problem
found is reported in one `ArchiFactoryError` line, so one run names them all.

Component options (`mixin.*`, `ffn.*`, `positional.*`) are checked by name, for whichever component
has them; `model.build.check_buildable` then builds the model on PyTorch's meta device (shapes only: no memory, no
data, a fraction of a second), so every constructor's own checks (a backend name, a head size RoPE
cannot rotate, an MLA rank) also fail before the data is prepared rather than after.
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import logging
import math
import re
from collections.abc import Callable
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf

from archifactory.core.errors import ArchiFactoryError

log = logging.getLogger(__name__)

Check = Callable[[Any], bool]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def at_least(low: float) -> tuple[Check, str]:
    return (lambda v: _number(v) and v >= low), f"must be >= {low:g}"


def positive() -> tuple[Check, str]:
    return (lambda v: _number(v) and v > 0), "must be > 0"


def within(low: float, high: float, high_open: bool = False) -> tuple[Check, str]:
    if high_open:
        return (lambda v: _number(v) and low <= v < high), f"must be in [{low:g}, {high:g})"
    return (lambda v: _number(v) and low <= v <= high), f"must be in [{low:g}, {high:g}]"


# key -> (check, what it needs [, what 0 means]); None values mean "unset/default" and are not checked.
TRAINER_RULES: dict[str, tuple[Check, str]] = {
    "seq_len": at_least(1),
    "micro_batch_size": at_least(1),
    "grad_accum_steps": at_least(1),
    "max_steps": at_least(1),
    "total_tokens": at_least(1),
    "batch_tokens": at_least(1),
    "lr": positive(),
    "muon_lr": positive(),
    "min_lr_ratio": within(0, 1),
    "decay_fraction": within(0, 1),
    "warmup_steps": at_least(0),
    "weight_decay": at_least(0),
    "beta1": within(0, 1, high_open=True),
    "beta2": within(0, 1, high_open=True),
    "eps": positive(),
    "grad_clip": at_least(0),  # 0 = no clipping
    "muon_momentum": within(0, 1, high_open=True),
    "ademamix_alpha": at_least(0),
    "ademamix_beta3": within(0, 1, high_open=True),
    "ademamix_warmup_steps": at_least(0),
    "eval_every": at_least(1),
    "log_every": at_least(1),
    "checkpoint_every": at_least(1),
    "eval_tokens": at_least(1),
    "keep_checkpoints": at_least(0),  # 0 = keep every checkpoint
    "max_nonfinite_steps": at_least(1),
    "num_threads": at_least(1),
}
MODEL_RULES: dict[str, tuple[Check, str]] = {
    "num_layers": at_least(1),
    "hidden_size": at_least(1),
    "num_heads": at_least(1),
    "max_seq_len": at_least(1),
    "vocab_size": at_least(2),
    "initializer_range": positive(),
    "norm_eps": positive(),
    "loss_chunk_size": at_least(0),  # 0 = the whole batch at once
}
DATASET_RULES: dict[str, tuple[Check, str]] = {
    "val_fraction": ((lambda v: _number(v) and 0 < v <= 0.5), "must be in (0, 0.5]"),
    "vocab_size": at_least(1),
    "max_documents": at_least(1),
    "max_tokens": at_least(1),
    "shard_tokens": at_least(1),
    "tokenizer_train_chars": at_least(1),
}
# Component options, by name, for whichever mixin / FFN / positional scheme has them.
COMPONENT_RULES: dict[str, tuple[Check, str]] = {
    **{
        key: at_least(1)
        for key in (
            "num_heads",
            "num_kv_heads",
            "num_experts",
            "top_k",
            "chunk_size",
            "sub_chunk_size",
            "d_state",
            "expand",
            "head_dim",
            "n_groups",
            "conv_kernel",
            "rnn_layers",
            "mix_rank",
            "decay_rank",
            "rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "inner_size",
            "granularity",
            "moe_every",
            "adapter_dim",
            "embedding_dim",
            "hypernet_dim",
            "multiple_of",
        )  # fmt: skip
    },
    **{key: at_least(0) for key in ("q_lora_rank", "proj_size", "num_shared_experts")},
    **{
        key: positive()
        for key in (
            "expand_k",
            "expand_v",
            "intermediate_multiplier",
            "norm_eps",
            "rope_theta",
            "theta",
            "base",
            "dt_min",
            "dt_max",
            "capacity_factor",
        )  # fmt: skip
    },
    **{key: at_least(0) for key in ("aux_loss_weight", "z_loss_weight", "bias_update_rate")},
}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _apply(section: str, values: dict[str, Any], rules: dict[str, tuple[Check, str]]) -> list[str]:
    problems = []
    for key, (check, needs) in rules.items():
        value = values.get(key)
        if value is None or value == "???":
            continue
        if not check(value):
            problems.append(f"{section}.{key}={value} {needs}")
    return problems


def _divides(problems: list[str], whole_key: str, whole: Any, part_key: str, part: Any) -> None:
    if isinstance(whole, int) and isinstance(part, int) and part >= 1 and whole % part:
        problems.append(f"{whole_key}={whole} is not divisible by {part_key}={part}")


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain values; a section whose interpolation cannot resolve yet stays unresolved
    (e.g. a chat dataset's `${init_from}` outside `sft`), so its other values are still checked."""
    try:
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]
    except Exception:
        values: dict[str, Any] = {}
        for key in cfg:
            try:
                value = cfg[key]
            except Exception:  # a top-level interpolation that cannot resolve: nothing to check there
                continue
            if not OmegaConf.is_config(value):
                values[str(key)] = value.value if isinstance(value, Enum) else value
                continue
            try:
                values[str(key)] = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
            except Exception:
                values[str(key)] = OmegaConf.to_container(value, resolve=False, enum_to_str=True)
        return values


def config_problems(cfg: DictConfig | dict[str, Any]) -> list[str]:
    """Every range or relation the composed config breaks, as `key=value …` phrases (empty: valid)."""
    values = _resolved(cfg) if isinstance(cfg, DictConfig) else cfg
    trainer, model = values.get("trainer") or {}, values.get("model") or {}
    dataset = values.get("dataset") or {}
    problems: list[str] = []
    # the model's shape first: it is what a user most often gets wrong, and older messages started here
    _divides(
        problems, "model.hidden_size", model.get("hidden_size"), "model.num_heads", model.get("num_heads")
    )
    if problems:
        problems[0] += "; choose a hidden size that is a multiple of the head count"
    problems += _apply("model", model, MODEL_RULES)
    problems += _apply("trainer", trainer, TRAINER_RULES)
    problems += _apply("dataset", dataset, DATASET_RULES)
    if (
        dataset.get("tokenizer") == "bpe"
        and _number(dataset.get("vocab_size"))
        and dataset["vocab_size"] < 257
    ):
        problems.append(
            f"dataset.vocab_size={dataset['vocab_size']} is too small for byte-level BPE; use >= 257"
        )
    seq_len, max_seq_len = trainer.get("seq_len"), model.get("max_seq_len")
    learned = (values.get("positional") or {}).get("name") == "learned"  # the one scheme with a fixed table
    if learned and _number(seq_len) and _number(max_seq_len) and max_seq_len < seq_len:
        problems.append(
            f"model.max_seq_len={max_seq_len} is shorter than trainer.seq_len={seq_len} (positional=learned "
            "has a table of max_seq_len positions)"
        )
    eval_tokens = trainer.get("eval_tokens")
    if _number(seq_len) and _number(eval_tokens) and 1 <= eval_tokens < seq_len:
        problems.append(
            f"trainer.eval_tokens={eval_tokens} is less than one window of trainer.seq_len={seq_len}"
        )
    device = trainer.get("device")
    if isinstance(device, str) and not DEVICE.match(device):
        problems.append(f"trainer.device={device!r} must be auto, cpu, mps, cuda or cuda:<index>")
    encoding = dataset.get("encoding")
    if isinstance(encoding, str):
        try:
            codecs.lookup(encoding)
        except LookupError:
            problems.append(
                f"dataset.encoding={encoding!r} is not a known text encoding (e.g. utf-8, latin-1)"
            )
    hidden = model.get("hidden_size")
    for kind in ("mixin", "ffn", "positional"):
        options = values.get(kind) or {}
        if not isinstance(options, dict):
            continue
        problems += _apply(kind, options, COMPONENT_RULES)
        heads, kv_heads = options.get("num_heads"), options.get("num_kv_heads")
        if kind == "mixin" and heads != model.get("num_heads"):  # else reported for the model above
            _divides(problems, "model.hidden_size", hidden, f"{kind}.num_heads", heads)
        _divides(problems, f"{kind}.num_heads", heads, f"{kind}.num_kv_heads", kv_heads)
        experts, top_k = options.get("num_experts"), options.get("top_k")
        if _number(experts) and _number(top_k) and top_k > experts:
            problems.append(f"{kind}.top_k={top_k} is more than {kind}.num_experts={experts}")
        dt_min, dt_max = options.get("dt_min"), options.get("dt_max")
        if _number(dt_min) and _number(dt_max) and dt_min > dt_max:
            problems.append(f"{kind}.dt_min={dt_min} is larger than {kind}.dt_max={dt_max}")
    return list(dict.fromkeys(problems))  # a divisibility problem can be found twice (model and mixin)


def unknown_key_message(full_key: str, known: list[str]) -> str:
    """`unknown key trainer.max_step; did you mean trainer.max_steps?`: the nearest key of the same node
    (difflib), else the node's keys. Never Hydra's `+key` advice: it would store the typo and run on."""
    prefix, _, key = full_key.rpartition(".")
    where = f"{prefix}." if prefix else ""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"unknown key {full_key}; did you mean {where}{close[0]}?"
    return f"unknown key {full_key}; {prefix or 'the config'} has: {', '.join(known)}"


def schema_keys(node: Any) -> list[str] | None:
    """The keys a typed (structured-config) node may hold; None for a free-form node (e.g. `published`)."""
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else node
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return None
    return [f.name for f in dataclasses.fields(schema)]


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """One `unknown key …` phrase per key of a typed node that its schema does not have.

    Hydra composes typed nodes in struct mode, so `trainer.max_step=10` already fails; but `+key=value`
    appends with struct mode lifted (`force_add`), and would store a typo and train on without it. This
    walks the composed tree (interpolations unresolved) and names every such key."""
    problems: list[str] = []
    known = schema_keys(cfg)
    for key, child in cfg.items_ex(resolve=False):
        full_key = f"{prefix}{key}"
        if known is not None and key not in known:
            problems.append(unknown_key_message(full_key, known))
        elif isinstance(child, DictConfig):
            problems += unknown_keys(child, f"{full_key}.")
    return problems


def check_known_keys(cfg: DictConfig) -> None:
    """Raise one `ArchiFactoryError` line naming every appended (`+key=…`) key no schema has."""
    problems = unknown_keys(cfg)
    if problems:
        raise ArchiFactoryError("; ".join(problems))


def validate_config(cfg: DictConfig | dict[str, Any]) -> None:
    """Raise one `ArchiFactoryError` line naming every problem of `cfg`; return quietly when it is valid."""
    problems = config_problems(cfg)
    if problems:
        raise ArchiFactoryError("; ".join(problems))
