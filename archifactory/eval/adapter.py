"""`ArchiFactoryLM`: our trained model as an lm-eval (lm-evaluation-harness, EleutherAI) language model.

A `lm_eval.api.model.TemplateLM` subclass, so every lm-eval task (multiple choice, perplexity, generation)
runs on a `StackedMixinForCausalLM` with the tokenizer it was trained with:

- `loglikelihood` — lm-eval's request handling (an empty context becomes EOS, trailing context spaces move
  to the continuation) with one change in how a pair is split into tokens: the *whole* text is encoded
  once and the tokens that end after the context's last character are the continuation. The model thus
  sees exactly the tokenization it was trained on, even when a BPE merge spans the boundary ("the ma" +
  "t" scores the token " mat" given "the"). Scoring is `scoring.score_continuations`: batched, one
  forward per distinct input, logits only at continuation positions, left truncation counted.
- `loglikelihood_rolling` — lm-eval's disjoint rolling windows at the model's `max_seq_len` (each token
  predicted once, the first after EOS, later windows with full context), summed per document.
- `generate_until` — greedy or sampled continuation through `archifactory.generate.generate`, contexts
  left-truncated to leave room for `max_gen_toks`, stopped at the task's `until` strings and EOS; contexts
  of different lengths share a batch, left-padded (each row exactly as alone).

`truncated` counts the requests whose context was cut on the left; the eval runner reports it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.chat.template import END, TEMPLATE_NAME, chat_text, has_chat_template, special_id
from archifactory.data.tokenizer import Tokenizer
from archifactory.eval.generation import sampling_options
from archifactory.eval.scoring import ScoreStats, score_continuations
from archifactory.generate.sampling import generate
from archifactory.model.stack import StackedMixinForCausalLM

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256


class ArchiFactoryLM(TemplateLM):
    """lm-eval's LM interface over a StackedMixinForCausalLM and its training tokenizer.

    Args:
        model: the trained model (moved to eval mode here).
        tokenizer: the run's tokenizer (`archifactory.data.Tokenizer`); its EOS is lm-eval's prefix token.
        max_length: the longest input the model takes (the run's `model.max_seq_len`).
        batch_size: forward rows per batch.
        autocast: a context-manager factory for the forward (bf16 autocast on CUDA, a no-op on CPU).
        max_gen_toks: generation length when a task does not set `max_gen_toks`.
        show_progress: tqdm bars for each request type.
    """

    def __init__(
        self,
        model: StackedMixinForCausalLM,
        tokenizer: Tokenizer,
        max_length: int,
        batch_size: int = 16,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._max_length = max_length
        self._batch_size = batch_size
        self._device = model.head_weight.device
        self.autocast = autocast
        self.max_gen_toks = max_gen_toks
        self.show_progress = show_progress
        self.stats: dict[str, ScoreStats] = {}

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def truncated(self) -> dict[str, int]:
        """Left-truncated requests per request type."""
        return {kind: stats.truncated for kind, stats in self.stats.items()}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Split the whole text's tokens at the context's end: continuation = tokens ending after it."""
        spaces = len(context) - len(context.rstrip())
        if spaces:  # lm-eval's convention: a word's leading space belongs to the continuation
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        encoding = self.tokenizer.backend.encode(context + continuation, add_special_tokens=False)
        boundary = len(context)
        split = next((i for i, (_, end) in enumerate(encoding.offsets) if end > boundary), len(encoding.ids))
        context_ids, continuation_ids = encoding.ids[:split], encoding.ids[split:]
        if not context_ids:  # a merge swallowed the whole context: condition on EOS, like an empty one
            context_ids = [self.prefix_token_id]
        return context_ids, continuation_ids

    def _stats(self, kind: str) -> ScoreStats:
        return self.stats.setdefault(kind, ScoreStats())

    def _score(self, pairs: list, kind: str, desc: str) -> list[tuple[float, bool]]:
        with tqdm(total=len(pairs), desc=desc, disable=not self.show_progress) as bar:
            return score_continuations(
                self.model,
                pairs,
                self.max_length,
                self.batch_size,
                pad_id=self.eot_token_id,
                autocast=self.autocast,
                stats=self._stats(kind),
                progress=bar.update,
            )

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list:
        """requests: [((context, continuation), context_ids, continuation_ids)] from `loglikelihood`."""
        pairs = [(context_ids, continuation_ids) for _, context_ids, continuation_ids in requests]
        results = self._score(pairs, "loglikelihood", "loglikelihood")
        for (request, _, _), answer in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document over disjoint windows of at most `max_length` tokens."""
        pairs: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                pairs.append((context, continuation))
                owners.append(index)
        scores = self._score(pairs, "loglikelihood_rolling", "loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy or sampled continuations through `archifactory.generate` (exact batched decoding); requests
        with the same generation options run in left-padded batches of `batch_size` prompts of any lengths
        (sorted by length first, so a batch holds little padding)."""
        stats = self._stats("generate_until")
        stats.requests += len(requests)
        stop_ids = [self.eot_token_id]
        if has_chat_template(self.tokenizer):  # an SFT model closes its turn with <|end|>
            stop_ids.append(special_id(self.tokenizer, END))
        outputs: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        for indices in groups.values():
            options = sampling_options(requests[indices[0]].args[1], self.max_gen_toks)
            max_context = self.max_length - options["max_new_tokens"]
            if max_context < 1:
                raise ArchiFactoryError(
                    f"a task asks for {options['max_new_tokens']} new tokens, as many as the model's "
                    f"max_seq_len ({self.max_length}); lower eval.max_gen_toks"
                )
            prompts: dict[int, list[int]] = {}
            for index in indices:
                ids = self.tok_encode(requests[index].args[0]) or [self.eot_token_id]
                if len(ids) > max_context:
                    stats.truncated += 1
                    ids = ids[-max_context:]
                prompts[index] = ids
            order = sorted(indices, key=lambda i: len(prompts[i]))
            for first in range(0, len(order), self.batch_size):
                chunk = order[first : first + self.batch_size]
                with self.autocast():
                    results = generate(
                        self.model,
                        [prompts[i] for i in chunk],
                        stop_token_ids=stop_ids,
                        tokenizer=self.tokenizer,
                        **options,
                    )
                for index, result in zip(chunk, results):
                    outputs[index] = result.text or ""
                    self.cache_hook.add_partial("generate_until", requests[index].args, outputs[index])
        return outputs

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """An SFT run's template name (lm-eval records it), else none."""
        return TEMPLATE_NAME if chat_template and has_chat_template(self.tokenizer) else ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """lm-eval's prompt for a chat model: the SFT template as text (its markers encode to their ids)."""
        return chat_text(chat_history, add_generation_prompt)

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.head_weight.dtype),
            "max_length": self.max_length,
            "batch_size": self.batch_size,
        }

    @property
    def device(self) -> torch.device:
        return self._device
