"""Text generation over each architecture's own decode state: one prefill, then one token at a time.

    from archifactory.generate.sampling import generate
    outs = generate(model, [prompt_ids_a, prompt_ids_b], max_new_tokens=64, temperature=0.8, top_p=0.95,
                    stop_strings=["\\n\\n"], tokenizer=tokenizer, seed=0)
    outs[0].tokens, outs[0].text, outs[0].stop_reason

Every mixin carries an explicit per-layer state (attention: its KV cache; retnet/rwkv6/mamba2: a
constant-size recurrent state; lstm/rnn: hidden cells) and the model owns the position counter, so a
prefill over the prompt followed by single-token steps gives exactly the logits of recomputing the full
forward at every step (`use_cache=False` does the latter, for tests and the benchmark).

Batches of prompts with different lengths (`padding`): `left` (the default) pads them on the left into one
batch with an attention mask, so one prefill and one decode loop serve every prompt. The model makes a pad
an identity step of every recurrence, masks pad keys in attention and counts positions over real tokens
only (`model/padding.py`), so each row's tokens equal those of the prompt generated alone. `group` runs
each group of equal-length prompts as its own batch instead (no padding; as fast only when few lengths).

Sampling follows the usual processors in Hugging Face's order: repetition penalty (CTRL, Keskar et al.
2019: a seen token's logit is divided by the penalty when positive, multiplied when negative), then
temperature, top-k, top-p (nucleus; Holtzman et al. 2020). Temperature 0 is greedy. Each prompt gets its
own random generator seeded from (`seed`, its index in the call), so `seed` makes a call reproducible and
the samples do not depend on how prompts are grouped into batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from archifactory.core.errors import ArchiFactoryError
from archifactory.model.stack import StackedMixinForCausalLM


class Decoder(Protocol):
    """Anything that turns token ids into text: our `Tokenizer` or a transformers tokenizer."""

    def decode(self, ids: list[int]) -> str: ...


@dataclass
class Generation:
    """One prompt's continuation."""

    tokens: list[int]  # new tokens only: a stop token is left out; a stop string's last token is kept
    text: str | None = None  # decoded new tokens, cut before the stop string (None without a tokenizer)
    stop_reason: str = "length"  # "length" | "stop_token" | "stop_string"
    prompt_tokens: list[int] = field(default_factory=list)


def process_logits(
    logits: Tensor,
    seen: Tensor | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
) -> Tensor:
    """logits [B, V] (fp32) -> processed logits [B, V]; filtered entries are -inf.

    `seen` [B, V] bool marks the tokens of each row's prompt and output (for the repetition penalty).
    Greedy (temperature 0) skips temperature, top-k and top-p: they never change the argmax.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0.0:
        return logits
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens ranked above it already reach top_p (the top token always stays)
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick_tokens(logits: Tensor, temperature: float, generators: list[torch.Generator]) -> Tensor:
    """processed logits [B, V] -> next tokens [B]: argmax when greedy, else one draw per row."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = logits.softmax(-1).cpu()
    picks = [torch.multinomial(probs[i], 1, generator=generators[i]) for i in range(len(generators))]
    return torch.cat(picks).to(logits.device)


def check_options(
    max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float
) -> None:
    problems = [
        (max_new_tokens < 0, f"max_new_tokens={max_new_tokens} must be >= 0"),
        (temperature < 0, f"temperature={temperature} must be >= 0 (0 = greedy)"),
        (top_k is not None and top_k < 1, f"top_k={top_k} must be >= 1 (or unset)"),
        (top_p is not None and not 0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]"),
        (repetition_penalty <= 0, f"repetition_penalty={repetition_penalty} must be > 0 (1 = off)"),
    ]
    for bad, message in problems:
        if bad:
            raise ArchiFactoryError(message)


def as_prompt_lists(prompts: Tensor | Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        return [row.tolist() for row in prompts]
    lists = [list(map(int, p)) for p in prompts]
    if any(not p for p in lists):
        raise ArchiFactoryError(
            "every prompt needs at least one token (an empty prompt has nothing to condition on)"
        )
    return lists


class StopChecker:
    """Decides, after each new token of one row, whether that row is done and why."""

    def __init__(self, stop_token_ids: Sequence[int], stop_strings: Sequence[str], tokenizer: Decoder | None):
        if stop_strings and tokenizer is None:
            raise ArchiFactoryError("stop_strings need a tokenizer to decode the generated text")
        self.stop_token_ids = set(stop_token_ids)
        self.stop_strings = list(stop_strings)
        self.tokenizer = tokenizer

    def check(self, tokens: list[int]) -> str | None:
        if tokens[-1] in self.stop_token_ids:
            return "stop_token"
        if self.stop_strings and self.cut(self.tokenizer.decode(tokens)) is not None:
            return "stop_string"
        return None

    def cut(self, text: str) -> int | None:
        """Index of the earliest stop string in `text`, or None."""
        hits = [i for i in (text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def finish(self, tokens: list[int], reason: str, prompt: list[int]) -> Generation:
        kept = tokens[:-1] if reason == "stop_token" else tokens
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(kept)
            cut = self.cut(text) if reason == "stop_string" else None
            text = text if cut is None else text[:cut]
        return Generation(kept, text, reason, prompt)


def left_pad(prompts: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Prompts right-aligned in one [B, T] batch (pad id 0, never attended) and the attention mask
    (1 = token), or None when every prompt has the same length."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    if all(len(p) == width for p in prompts):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(
    model: StackedMixinForCausalLM,
    prompts: Tensor | Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    tokenizer: Decoder | None = None,
    seed: int | None = None,
    on_token: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
    padding: str = "left",
) -> list[Generation]:
    """Continue each prompt by up to `max_new_tokens` tokens.

    prompts: token ids, a [B, T] / [T] tensor or a list of lists (any lengths).
    temperature: 0 = greedy; top_k / top_p: None = off; repetition_penalty: 1 = off.
    stop_token_ids: end a row when it emits one (left out of the output), e.g. `[tokenizer.eos_id]`.
    stop_strings: end a row when its decoded text contains one (needs `tokenizer`; the text is cut there).
    seed: makes sampling reproducible (None: a fresh random seed).
    on_token(row, token): called for every accepted token, in order within a row (streaming).
    use_cache: False recomputes the full forward for every new token (the slow oracle the cache must equal).
    padding: `left` (prompts of any lengths in one left-padded batch) or `group` (one batch per length).
    Returns one `Generation` per prompt, in the order given.
    """
    check_options(max_new_tokens, temperature, top_k, top_p, repetition_penalty)
    if padding not in ("left", "group"):
        raise ArchiFactoryError(f"padding={padding!r} is not one of left, group")
    prompt_lists = as_prompt_lists(prompts)
    stopper = StopChecker(stop_token_ids, stop_strings, tokenizer)
    base_seed = int(torch.randint(0, 2**31, ())) if seed is None else seed
    batches: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompt_lists):
        batches.setdefault(len(prompt) if padding == "group" else 0, []).append(index)
    results: list[Generation | None] = [None] * len(prompt_lists)
    was_training = model.training
    model.eval()
    try:
        for rows in batches.values():
            group = [prompt_lists[i] for i in rows]
            generators = [torch.Generator().manual_seed((base_seed * 1_000_003 + i) % 2**64) for i in rows]
            emit = None if on_token is None else (lambda r, t, rows=rows: on_token(rows[r], t))
            for row, generation in zip(rows, _generate_group(
                model, group, max_new_tokens, temperature, top_k, top_p, repetition_penalty,
                stopper, generators, emit, use_cache,
            )):  # fmt: skip
                results[row] = generation
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def _generate_group(
    model: StackedMixinForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    stopper: StopChecker,
    generators: list[torch.Generator],
    emit: Callable[[int, int], None] | None,
    use_cache: bool,
) -> list[Generation]:
    """Prompts as one left-padded batch: prefill once, then one token per step until every row stops."""
    device = model.head_weight.device
    ids, mask = left_pad(prompts, device)  # [B, T], [B, T] or None
    batch = ids.shape[0]
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch, model.vocab_size, dtype=torch.bool, device=device)
        for row, prompt in enumerate(prompts):
            seen[row, torch.tensor(prompt, device=device)] = True
    state = model.init_state(batch, device) if use_cache else None
    new: list[list[int]] = [[] for _ in range(batch)]
    done: list[str | None] = [None] * batch
    if max_new_tokens > 0:
        out = model(ids, state=state, attention_mask=mask)
        for step in range(max_new_tokens):
            logits = process_logits(out.logits[:, -1], seen, temperature, top_k, top_p, repetition_penalty)
            next_tokens = pick_tokens(logits, temperature, generators)  # [B]
            for row, token in enumerate(next_tokens.tolist()):
                if done[row] is None:
                    new[row].append(token)
                    if emit is not None:
                        emit(row, token)
                    done[row] = stopper.check(new[row])
            if all(reason is not None for reason in done) or step == max_new_tokens - 1:
                break
            if seen is not None:
                seen.scatter_(1, next_tokens[:, None], True)
            ids = torch.cat([ids, next_tokens[:, None]], dim=1)
            mask = None if mask is None else torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            # finished rows keep stepping (a state's batch layout is the mixin's own); their tokens are dropped
            # (the state keeps the prefill's pad counts: decode steps need no mask)
            out = (
                model(next_tokens[:, None], state=out.state) if use_cache else model(ids, attention_mask=mask)
            )
    return [
        stopper.finish(tokens, reason or "length", prompt)
        for tokens, reason, prompt in zip(new, done, prompts)
    ]
