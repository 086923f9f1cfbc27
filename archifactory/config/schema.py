"""Typed config schemas, so a typo in a key or a wrong type fails at compose time with Hydra's message.

The fixed groups (`model`, `trainer`, `dataset`, `wandb`) are dataclasses here. The component groups
(`mixin`, `ffn`, `positional`, `residual`) get one schema per registered class, generated from its constructor
signature — the options a YAML may set are exactly the constructor's keyword arguments. Each YAML names
its schema in its defaults list (`- _schema_<name>`), the Hydra "structured config as schema" pattern.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Optional, Union

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from archifactory.core.registry import components


# Typed choices: OmegaConf checks an Enum field at compose time ("Invalid value 'adamx', expected one of
# [adamw, muon, ademamix]"), so a misspelt choice fails before any data is prepared.
class Choice(str, Enum):
    """A string choice: compares, hashes, prints, formats and JSON-encodes as its plain value
    (Python 3.11's StrEnum, written out for 3.10)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


def choices(name: str, values: list[str] | tuple[str, ...]) -> type[Choice]:
    """A `Choice` enum whose member names are its values (OmegaConf matches a YAML string by name)."""
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)  # type: ignore[return-value]


Optimizer = choices("Optimizer", ["adamw", "muon", "ademamix"])
Schedule = choices("Schedule", ["cosine", "wsd", "wsd_sqrt", "constant"])
Precision = choices("Precision", ["auto", "fp32", "bf16"])
Strategy = choices("Strategy", ["auto", "single", "ddp", "fsdp"])
CheckpointFormat = choices("CheckpointFormat", ["full", "dcp"])
Norm = choices("Norm", ["rmsnorm", "layernorm"])
Weights = choices("Weights", ["standard", "hyper"])
SourceKind = choices("SourceKind", ["text", "hf"])
DecodeErrors = choices("DecodeErrors", ["strict", "replace"])
WandbMode = choices("WandbMode", ["auto", "online", "offline", "disabled"])

COMPONENT_KINDS = ("mixin", "ffn", "positional", "residual")  # the groups whose schemas their classes give

# Constructor arguments the model supplies; everything else is a user option.
# (`sublayer`: a residual connection's place in its block, 0 = mixin, 1 = FFN)
_MODEL_SUPPLIED = {"self", "hidden_size", "layer_idx", "max_seq_len", "num_layers", "sublayer"}


@dataclass
class HyperConfig:
    """The hypernetwork of `model.weights=hyper` (model/hyper_weights.py): a GRU over depth."""

    embed_dim: int = 16  # the learned per-layer embedding e_l, the GRU's input
    hidden: int = 64  # the GRU's state h_l, from which each weight's row scaling is projected


@dataclass
class ModelConfig:
    preset: str = "tiny"
    num_layers: int = 4
    hidden_size: int = 128
    num_heads: int = 4
    max_seq_len: int = "${trainer.seq_len}"  # type: ignore[assignment]  # interpolation, resolved to int
    vocab_size: int | None = None  # None: taken from the tokenizer
    initializer_range: float = 0.02
    tie_embeddings: bool = False
    norm: Norm = Norm.rmsnorm
    norm_eps: float = 1e-5
    loss_chunk_size: int = 0  # tokens per chunk of the chunked cross-entropy; 0 = all at once
    # later layers mix the first layer's values into theirs (model/value_residual.py)
    value_residual: bool = False
    # standard: every layer stores its weights | hyper: generated from layer 0's by a GRU over depth
    # (the Recurrent Hyper Transformer, model/hyper_weights.py)
    weights: Weights = Weights.standard
    hyper: HyperConfig = field(default_factory=HyperConfig)
    # hybrids (model/hybrid.py): per-layer mixins, repeated to the depth; entries are names or {name: …, options}
    layer_pattern: Optional[list[Any]] = None
    attention_every: int = 0  # shorthand: every k-th layer is `attention_mixin`, the rest `mixin=`; 0 = off
    attention_mixin: str = "gqa"
    # parameter matching (archifactory/model/match.py): non-embedding target, e.g. 30M or 3e7; null = off
    target_params: Optional[str] = None
    match: str = "width"  # width: solve the hidden size | layers: solve the depth
    match_tolerance: float = 0.01
    match_multiple_of: int = 16  # the FFN hidden-size step that closes the gap the coarse knob leaves
    # pretrained parts (hf/pretrained.py): a transformers checkpoint (Hub id or local folder) whose embedding,
    # final norm and LM head the model starts from; the run then uses its tokenizer. null = off
    pretrained_from: Optional[str] = None
    freeze_pretrained: bool = False  # keep those pretrained parts fixed during training


@dataclass
class TrainerConfig:
    preset: str = "default"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    seq_len: int = 256
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    max_steps: int = 1000  # caps any run; with a token budget, the smaller of the two wins
    epochs: Optional[float] = None  # passes over the data (chat SFT); with max_steps, the smaller wins
    total_tokens: int | None = None  # token budget: steps = total_tokens / batch_tokens
    batch_tokens: int | None = None  # global batch in tokens: sets grad_accum_steps from the micro-batch
    strategy: Strategy = Strategy.auto  # auto (ddp under torchrun, else single) | single | ddp | fsdp
    activation_checkpointing: bool = False
    max_nonfinite_steps: int = 5  # consecutive non-finite losses before the run stops
    optimizer: Optimizer = Optimizer.adamw
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    schedule: Schedule = Schedule.cosine
    decay_fraction: float = 0.2  # wsd: the final fraction of steps that decays to min_lr
    muon_lr: float = 0.02  # muon: learning rate of the matrix parameters (AdamW at `lr` for the rest)
    muon_momentum: float = 0.95
    ademamix_alpha: float = 5.0
    ademamix_beta3: float = 0.9999
    ademamix_warmup_steps: int | None = None  # alpha/beta3 warmup; None = the whole run
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_tokens: int = 65536
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    # full: rank 0 writes the gathered weights; dcp: every rank writes its shards (torch.distributed.checkpoint)
    checkpoint_format: CheckpointFormat = CheckpointFormat.full
    async_checkpoint: bool = False  # dcp: write in the background (dcp.async_save) while training goes on
    resume: bool = False
    compile: bool = False
    num_threads: int | None = None  # torch intra-op threads on CPU; None = torch's default


@dataclass
class DatasetConfig:
    """Where the text comes from, how it is tokenized and where the token shards are cached.

    See `archifactory/data/__init__.py` for the pipeline and the cache layout.
    """

    name: str = MISSING
    source: SourceKind = SourceKind.text  # text (local files) | hf (a Hugging Face Hub dataset)
    path: str | None = None  # text: a file, folder or glob; hf: the Hub dataset id
    hf_config: str | None = None  # the Hub dataset's config (subset) name
    revision: str | None = None  # a Hub commit/tag to pin; None = the default branch
    train_split: str = "train"
    val_split: str | None = None  # None: hold out every round(1/val_fraction)-th document
    text_field: str = "text"  # .jsonl/.parquet/Hub column holding the text
    doc_separator: str | None = (
        None  # .txt: split each file into documents on this string; None = one per file
    )
    streaming: bool = False  # hf: stream instead of downloading the whole split first
    gated: bool = False  # hf: the dataset needs an access token (read from `token_env`)
    token_env: str = "HF_TOKEN"
    max_documents: int | None = None  # cap on training documents
    max_tokens: int | None = None  # cap on training tokens (the last document is cut to fit)
    val_fraction: float = 0.01  # without a validation split: the share of documents held out
    tokenizer: str = "bpe"  # bpe: train a byte-level BPE on the training split; else a Hub tokenizer name
    vocab_size: int = 8192  # bpe only
    tokenizer_train_chars: int | None = 200_000_000  # bpe: characters of training text it learns from
    shard_tokens: int = 100_000_000  # tokens per shard file
    cache_dir: str = "${oc.env:ARCHIFACTORY_CACHE,${oc.env:HOME}/.cache/archifactory}"
    verify_cache: bool = True  # check every shard's checksum when reusing a cache
    rebuild: bool = False  # ignore an existing token cache and tokenize again
    document_mask: bool = False  # keep packed documents apart: each is mixed on its own (model/documents.py)
    encoding: str = "utf-8"  # local text files: any Python codec name (latin-1, utf-16, cp1252, …)
    decode_errors: DecodeErrors = DecodeErrors.strict  # strict: refuse undecodable bytes; replace: U+FFFD


@dataclass
class ProbeDatasetConfig:
    """A synthetic probe (`archifactory/data/synthetic/`): generated on the fly, no download, no cache."""

    name: str = MISSING
    source: str = "synthetic"
    task: str = MISSING  # mqar | a MAD task (set with task=<name>)
    vocab_size: int = 8192
    train_examples: int | None = None  # None: fresh examples every step; N: a fixed pool cycled per epoch
    val_examples: int = 1000  # the fixed, seeded validation set


@dataclass
class MQARDatasetConfig(ProbeDatasetConfig):
    num_kv_pairs: int = 8
    power_a: float = 0.01  # query gaps ∝ a·g^(a−1): Zoology's power law
    random_non_queries: bool = True  # fill empty slots with random tokens instead of 0


@dataclass
class MADDatasetConfig(ProbeDatasetConfig):
    noise_vocab_size: int = 0  # noisy_in_context_recall: the top ids are noise tokens
    frac_noise: float = 0.0
    k_motif_size: int = 1  # fuzzy_in_context_recall: keys/values of 1..motif tokens
    v_motif_size: int = 1
    num_tokens_to_copy: int = 16  # selective_copying


@dataclass
class ChatDatasetConfig:
    """Conversations for `archifactory sft` (archifactory/sft/): one per row, loss on assistant tokens."""

    name: str = MISSING
    source: str = "chat"
    format: str = "chat_jsonl"  # chat_jsonl (local {"messages": […]} lines) | limo | dolphin_r1
    path: Optional[str] = None  # chat_jsonl: a file, folder or glob; Hub formats: override the dataset id
    hf_config: Optional[str] = None  # dolphin_r1: reasoning-deepseek | reasoning-flash | nonreasoning
    split: str = "train"
    revision: Optional[str] = None
    val_fraction: float = 0.05  # every round(1/val_fraction)-th conversation is held out
    max_conversations: Optional[int] = None
    tokenizer_from: str = "${init_from}"  # the pretrained run whose tokenizer gets the chat tokens
    cache_dir: str = "${oc.env:ARCHIFACTORY_CACHE,${oc.env:HOME}/.cache/archifactory}"


LossType = choices("LossType", ["grpo", "dr_grpo", "dapo"])
ScaleRewards = choices("ScaleRewards", ["group", "batch", "none"])
RLFormat = choices("RLFormat", ["arith", "countdown", "gsm8k", "math", "rl_jsonl"])


@dataclass
class GRPOConfig:
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) and its fixes: Dr. GRPO's
    unbiased normalisation (Liu et al. 2025) and DAPO's token-level loss and clip-higher (Yu et al. 2025).
    Option names follow TRL's `GRPOConfig`."""

    preset: str = "default"
    num_generations: int = 8  # G: completions sampled per prompt (one group)
    prompts_per_step: int = 4  # prompts per rollout batch: a step trains on prompts_per_step x G completions
    max_completion_length: int = 32  # new tokens per completion (a row stops earlier at the end-of-turn)
    temperature: float = 1.0  # sampling temperature; log-probs are taken of logits / temperature, as sampled
    top_p: float = 1.0
    epsilon: float = 0.2  # clip range: ratio in [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[float] = None  # None: epsilon (DAPO's clip-higher: e.g. 0.28)
    beta: float = 0.0  # KL(policy || reference) weight, k3 estimator; 0 keeps no reference model
    loss_type: LossType = LossType.grpo  # grpo | dr_grpo | dapo (how token losses are averaged)
    num_iterations: int = 1  # policy updates per rollout batch (mu); > 1 uses the rollout's log-probs as old
    scale_rewards: ScaleRewards = ScaleRewards.group  # group | batch std divides advantages; none: Dr. GRPO
    reward_funcs: list[str] = field(
        default_factory=lambda: ["answer"]
    )  # answer | format | countdown | unit_test
    reward_weights: Optional[list[float]] = None  # one per reward function; None: all 1.0
    sandbox: str = "auto"  # unit_test reward: auto | bwrap | unshare | none (none needs allow_unsandboxed)
    allow_unsandboxed: bool = False
    code_timeout: float = 5.0  # unit_test reward: wall-clock seconds per program


@dataclass
class RLDatasetConfig:
    """Prompts with a checkable answer for `archifactory grpo` (archifactory/data/rl/)."""

    name: str = MISSING
    source: str = "rl"
    format: RLFormat = (
        MISSING  # arith | countdown (synthetic, seeded) | gsm8k | math (Hub) | rl_jsonl (local)
    )
    path: Optional[str] = None  # rl_jsonl: the .jsonl file; gsm8k/math: the Hub dataset id
    hf_config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None
    prompt_field: str = "prompt"  # rl_jsonl/Hub: the column holding the question
    answer_field: str = "answer"  # rl_jsonl/Hub: the column holding the answer (tests: unit-test code)
    max_problems: Optional[int] = None  # cap on problems (synthetic: how many are generated)
    data_seed: int = 1234  # synthetic problems and their order: the same for every run seed
    num_terms: int = 2  # arith: operands per expression
    max_value: int = 9  # arith/countdown: operands drawn from 1..max_value
    operators: str = "+-"  # arith/countdown: operators to draw from (+, -, *)
    num_numbers: int = 3  # countdown: numbers given, each used at most once
    system_prompt: Optional[str] = None  # a system turn before every question (SFT runs' chat template)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "archifactory"
    entity: str | None = None
    mode: WandbMode = WandbMode.auto  # auto: online with an API key, offline without
    name: str | None = None


@dataclass
class RootConfig:
    seed: int = 0
    run_name: str = MISSING
    mixin: Any = MISSING
    ffn: Any = MISSING
    positional: Any = MISSING
    residual: Any = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dataset: Any = (
        MISSING  # each dataset YAML names its schema: `_schema` (text/Hub) or `_schema_mqar`/`_schema_mad`
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)
    experiment_name: str | None = None
    init_from: Optional[str] = None  # `archifactory sft`: the pretrained run directory it starts from
    grpo: Any = None  # `archifactory grpo`: the algorithm's options (configs/grpo/, GRPOConfig)
    # a recipe's published reference figures (e.g. {val_loss: {gqa: 1.0096, …}}), printed by `report`
    published: Any = None
    # `archifactory study`: a recipe's stage settings ({sft, sft_args, eval, eval_args}); train ignores it
    study: Any = None


def _omegaconf_type(annotation: Any) -> Any:
    """Map a constructor annotation to a type OmegaConf validates (it knows no PEP 604 unions/Literal)."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = _omegaconf_type(args[0]) if len(args) == 1 else Any
        return Optional[inner]
    if origin is Literal:
        values = typing.get_args(annotation)
        return _choice_enum(values) if all(isinstance(v, str) for v in values) else type(values[0])
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return list[_omegaconf_type(args[0])] if args and args[0] is not Ellipsis else list[Any]
    return annotation


@functools.cache
def _choice_enum(values: tuple[str, ...]) -> type[Choice]:
    """A StrEnum for a `Literal[...]` of strings, so OmegaConf validates the choice at compose time.

    It is bound to a module-level name so a composed config holding one pickles (submitit sweeps).
    """
    name = "Choice_" + "_".join("".join(ch if ch.isalnum() else "_" for ch in v) for v in values)
    enum = choices(name, values)
    globals()[name] = enum
    return enum


@functools.cache
def component_schema(kind: str, name: str, cls: type) -> type:
    """A dataclass whose fields are `name` plus the keyword options of `cls.__init__` (one per component
    class: `register_configs` recognises a schema it has stored already by its identity). It is bound to a
    module-level name (`mixin_gqa_schema`), so a composed config holding it pickles; another process builds
    it on first lookup (`__getattr__` below)."""
    hints = typing.get_type_hints(cls.__init__)
    fields: list[tuple[str, Any, Any]] = [("name", str, field(default=name))]
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name in _MODEL_SUPPLIED or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = MISSING if param.default is inspect.Parameter.empty else param.default
        if isinstance(default, (list, dict)):
            default_value = default
            fields.append(
                (
                    param.name,
                    _omegaconf_type(hints[param.name]),
                    field(default_factory=lambda v=default_value: v),
                )
            )
        else:
            fields.append((param.name, _omegaconf_type(hints[param.name]), field(default=default)))
    schema = dataclasses.make_dataclass(f"{kind}_{name}_schema", fields)
    schema.__module__ = __name__  # (make_dataclass takes `module=` from Python 3.12 on)
    globals()[schema.__name__] = schema
    return schema


def __getattr__(attribute: str) -> type:
    """A component schema or choice enum that this process has not built yet, by the name pickle looks it up
    under (`mixin_gqa_schema`, `Choice_auto_sdpa`): every component's schema is built, enums included."""
    if attribute.startswith("__"):  # Python's own lookups (`__path__`, ...): no schema's name
        raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")
    list(component_schemas())
    if attribute in globals():
        return globals()[attribute]
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


def component_schemas() -> Iterator[tuple[str, str, type]]:
    """(kind, name, schema) of every registered component."""
    for kind in COMPONENT_KINDS:
        for name, cls in components(kind).items():
            yield kind, name, component_schema(kind, name, cls)


def component_options(cfg: Any) -> dict[str, Any]:
    """The constructor keyword arguments of a composed component config (everything but `name`)."""
    # typed choices arrive as StrEnum members; constructors get the plain string
    return {k: v.value if isinstance(v, Enum) else v for k, v in cfg.items() if k != "name"}


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore; called before Hydra composes (every composition)."""
    _store(None, "archifactory_schema", RootConfig)
    _store("model", "_schema", ModelConfig)
    _store("trainer", "_schema", TrainerConfig)
    _store("dataset", "_schema", DatasetConfig)
    _store("dataset", "_schema_mqar", MQARDatasetConfig)
    _store("dataset", "_schema_mad", MADDatasetConfig)
    _store("dataset", "_schema_chat", ChatDatasetConfig)
    _store("dataset", "_schema_rl", RLDatasetConfig)
    _store("grpo", "_schema", GRPOConfig)
    for kind, name, schema in component_schemas():
        _store(kind, f"_schema_{name}", schema)


# (group, name) -> the schema stored there and the store's entry for it, as `_store` left them
_STORED: dict[tuple[str | None, str], tuple[type, object]] = {}


def _store(group: str | None, name: str, schema: type) -> None:
    """`ConfigStore.store` unless the store still holds the entry this schema was stored as. Hydra turns the
    dataclass into a config on every store: all of them again cost 0.25 s, on every composition (a test
    process composes hundreds). A component registered later, or a schema replaced, is stored anew."""
    stored = _STORED.get((group, name))
    if stored is not None and stored[0] is schema and stored[1] is _entry(group, name):
        return
    ConfigStore.instance().store(group=group, name=name, node=schema)
    _STORED[(group, name)] = (schema, _entry(group, name))


def _entry(group: str | None, name: str) -> object | None:
    """The ConfigStore's entry for `<group>/<name>.yaml`, None when it holds none."""
    entries: Any = ConfigStore.instance().repo
    for part in group.split("/") if group else ():
        entries = entries.get(part, {})
    return entries.get(f"{name}.yaml")
