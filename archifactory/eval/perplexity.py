"""`archifactory eval perplexity [dataset=…]`: loss, perplexity and bits per byte on a validation split.

The figures are computed exactly as the training loop's validation (`train.loop.evaluate`): the split is
one token stream (EOS after every document), cut into consecutive windows of the run's `seq_len + 1`
tokens, and the loss is the token-weighted mean next-token cross-entropy over them (nats).
perplexity = exp(loss); bits per byte = loss / ln 2 / (UTF-8 bytes of the split's text / its tokens),
which compares variants with different tokenizers fairly.

- No `dataset` override: the run's own validation split from its token cache (the same windows its
  `val_loss` used when `trainer.eval_tokens` covered the split). Reported as `perplexity`.
- `dataset.<key>=…` alone changes keys of the run's dataset (e.g. `dataset.val_split=test`);
  `dataset=<option> [dataset.<key>=…]` picks another corpus (`dataset=text dataset.path=…`). Either way
  its validation documents are read and tokenized with the *run's* tokenizer, in memory (nothing is
  cached). Reported as `perplexity_<dataset name>`.
- `eval.max_tokens` caps the tokens read (default: the whole split).
- A run trained with `dataset.document_mask=true` is scored with packed documents kept apart, as its
  validation was. A synthetic probe (MQAR, MAD) has no text: refused, its score is `val_accuracy`.
- An SFT run (chat data): by default its own held-out conversations (the same split as its training,
  rebuilt with the run's chat tokenizer), scored like its validation — loss and next-token accuracy on
  assistant tokens only, no bits per byte (the template's tokens have no bytes); `dataset=text …` scores
  it on plain text like any run.
- A GRPO run (RL prompts: nothing to score) is scored on the data of the run it started from (its
  `init_from`, followed until a text or chat run), so SFT -> GRPO shows what GRPO did to the SFT loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from archifactory.config.compose import compose
from archifactory.config.schema import DatasetConfig
from archifactory.core.errors import ArchiFactoryError
from archifactory.data import load_data
from archifactory.data.chat.dataset import chat_val_batches, encode_chat
from archifactory.data.dataset import as_dataset_config
from archifactory.data.prepare import routed_parts
from archifactory.data.sources import make_source
from archifactory.eval.evaluate import evaluate
from archifactory.eval.job import EvalJob, TaskResult
from archifactory.runs import layout
from archifactory.runs.load import load_run_config

Dataset = DatasetConfig | DictConfig  # text/Hub data, or a chat node (SFT conversations, resolved)


def as_dataset(node: Any) -> Dataset:
    """A composed `dataset` node as what the splits read: a `DatasetConfig`, or for chat data (whose keys
    are not a DatasetConfig's) the node itself with its values resolved."""
    if isinstance(node, DictConfig) and node.get("source") == "chat":
        return OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    return as_dataset_config(node)


def scored_dataset(config: DictConfig) -> DictConfig:
    """The run's `dataset` node, or for an RL run (GRPO's prompts and answers: no text to score) that of the
    run it started from, followed through `init_from` until a text or chat run."""
    seen: list[str] = []
    while config.dataset.get("source") == "rl":
        init = config.get("init_from")
        if not init or init in seen:
            raise ArchiFactoryError(
                f"perplexity: the run was trained on RL prompts (dataset={config.dataset.name}) and has no "
                "text run in its init_from chain; give it one: dataset=text dataset.path=<folder>"
            )
        seen.append(init)
        config = load_run_config(Path(init))
    return config.dataset


def dataset_config(job: EvalJob) -> tuple[Dataset, bool]:
    """(the dataset to evaluate on, whether it is the run's own) from the run's config and `job.extra`."""
    own = as_dataset(scored_dataset(job.run.config))
    if not job.extra:
        return own, True
    if any(arg.split("=", 1)[0] == "dataset" for arg in job.extra):
        try:
            node = compose(job.extra).dataset
        except (HydraException, OmegaConfBaseException) as error:
            raise ArchiFactoryError(f"perplexity: {str(error).splitlines()[0]}") from error
        other = as_dataset(node)
    else:
        try:
            keys = OmegaConf.from_dotlist([arg.removeprefix("dataset.") for arg in job.extra])
            base = own if isinstance(own, DictConfig) else OmegaConf.structured(own)
            OmegaConf.set_struct(base, True)  # a mistyped key is refused, for chat nodes too
            merged = OmegaConf.merge(base, keys)
        except Exception as error:  # OmegaConf's validation errors: one line naming the key
            raise ArchiFactoryError(f"perplexity: {str(error).splitlines()[0]}") from error
        other = as_dataset(merged)
    return other, other == own


def own_split(job: EvalJob, seq_len: int, max_tokens: int | None) -> tuple[list, float, int]:
    """(validation batches, bytes per token, tokens in the split) from the run's own token cache."""
    cfg = job.run.config
    dataset = scored_dataset(cfg)
    data = load_data(dataset, seq_len=seq_len, seed=cfg.seed)
    if data.tokenizer.hash != job.run.tokenizer.hash:
        raise ArchiFactoryError(
            f"the token cache of {dataset.name} was made with another tokenizer than run "
            f"{job.run.name}'s; pass dataset.rebuild=true to tokenize it again with the run's settings"
        )
    total = data.manifest["splits"]["val"]["tokens"]
    batches = data.val_batches(job.options.batch_size, max_tokens or total)
    return batches, data.val_bytes_per_token, total


def other_split(
    job: EvalJob, dataset: DatasetConfig, seq_len: int, max_tokens: int | None
) -> tuple[list, float, int]:
    """Validation documents of another dataset, tokenized with the run's tokenizer, in windows."""
    source = make_source(dataset)
    source.preflight()
    tokenizer = job.run.tokenizer
    ids: list[int] = []
    nbytes = 0
    # The last part is the validation stream when the source has a validation split (its training
    # documents are never read), else the one routed stream that holds documents out.
    for split, text in routed_parts(source, dataset)[-1]:
        if split != "val":
            continue
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
        nbytes += len(text.encode("utf-8"))
        if max_tokens is not None and len(ids) > max_tokens:
            break
    count = (len(ids) - 1) // seq_len
    if max_tokens is not None:
        count = min(count, max_tokens // seq_len)
    if count < 1:
        raise ArchiFactoryError(
            f"the validation split of {source.description} has {len(ids):,} tokens with the run's tokenizer, "
            f"fewer than one window of {seq_len + 1}"
        )
    stream = torch.tensor(ids[: count * seq_len + 1], dtype=torch.long)
    windows = stream[:-1].view(count, seq_len), stream[1:].view(count, seq_len)
    batch = job.options.batch_size
    batches = [(windows[0][i : i + batch], windows[1][i : i + batch]) for i in range(0, count, batch)]
    return batches, nbytes / max(len(ids), 1), len(ids)


def chat_split(
    job: EvalJob, dataset: DictConfig, seq_len: int, max_tokens: int | None
) -> tuple[list, None, int]:
    """(batches, None: no bytes, tokens) of the held-out conversations of chat data, encoded with the run's
    tokenizer (an SFT run's carries the template's tokens) exactly as its training split them."""
    _, val, _ = encode_chat(dataset, job.run.tokenizer, seq_len)
    batches = chat_val_batches(val, seq_len, job.options.batch_size, max_tokens)
    return batches, None, len(val) * seq_len


def run_perplexity(job: EvalJob) -> list[TaskResult]:
    if job.names != ["perplexity"]:
        raise ArchiFactoryError(f"the perplexity runner evaluates `perplexity`, not {job.names}")
    seq_len = int(job.run.config.trainer.seq_len)
    dataset, own = dataset_config(job)
    if dataset.source == "synthetic":
        raise ArchiFactoryError(
            f"perplexity needs text, and dataset {dataset.name} is a synthetic probe: its answer accuracy is "
            f"val_accuracy in the run's {layout.SUMMARY}; pass dataset=<a text dataset> for perplexity"
        )
    max_tokens = job.options.max_tokens
    if dataset.source == "chat":
        batches, bytes_per_token, split_tokens = chat_split(job, dataset, seq_len, max_tokens)
    elif own:
        batches, bytes_per_token, split_tokens = own_split(job, seq_len, max_tokens)
    else:
        batches, bytes_per_token, split_tokens = other_split(job, dataset, seq_len, max_tokens)
    model = job.run.model
    # a run trained with dataset.document_mask validates with documents kept apart: so does perplexity
    document_mask = scored_dataset(job.run.config).get("document_mask", False)
    document_eos = job.run.tokenizer.eos_id if document_mask else None
    figures = evaluate(model, batches, job.device, job.autocast, bytes_per_token, document_eos)
    model.eval()  # `evaluate` hands the model back in training mode
    loss = figures["val_loss"]
    if loss is None:
        raise ArchiFactoryError(
            f"perplexity: the validation split of {dataset.name} has no target token for run {job.run.name} "
            "(every held-out row was cut before its answer); raise trainer.seq_len or hold out more data"
        )
    tokens = sum(int((targets != -100).sum()) for _, targets in batches)
    scores = {k: v for k, v in figures.items() if k != "val_loss"}  # val_bpb, or chat's val_accuracy
    scores = {"bits_per_byte" if k == "val_bpb" else k.removeprefix("val_"): v for k, v in scores.items()}
    details: dict[str, Any] = {
        "dataset": OmegaConf.to_container(
            dataset if isinstance(dataset, DictConfig) else OmegaConf.structured(dataset)
        ),
        "own_dataset": own,
        "document_mask": document_eos is not None,
        "seq_len": seq_len,
        "tokens": tokens,
        "split_tokens": split_tokens,
        "bytes_per_token": bytes_per_token,
        "loss": loss,
        "perplexity": math.exp(loss),
        **scores,
    }
    name = "perplexity" if own else f"perplexity_{dataset.name}"
    extra = {"loss": loss, **scores, "tokens": tokens, "dataset": dataset.name}
    return [TaskResult(name, "perplexity", math.exp(loss), None, details, extra)]
