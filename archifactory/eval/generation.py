"""lm-eval's `generate_until` requests through `archifactory.generate.generate`.

Each request is `(context, gen_kwargs)`; requests with the same `gen_kwargs` run together, in batches of
the adapter's batch size (sorted by prompt length, so `generate`'s equal-length groups are large).
Options understood (lm-eval's / Hugging Face's names): `until` (stop strings, a string or a list),
`max_gen_toks` (or `max_new_tokens`; default `eval.max_gen_toks`), `do_sample` (False: greedy),
`temperature` (1.0 when sampling without one), `top_k`, `top_p`, `repetition_penalty`. Others are
ignored with a warning. Generation also stops at EOS. A context longer than `max_length - max_gen_toks`
keeps its last tokens, and is counted as truncated.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from archifactory.errors import ArchiFactoryError

if TYPE_CHECKING:
    from archifactory.eval.adapter import ArchiFactoryLM

log = logging.getLogger(__name__)

KNOWN = {"until", "max_gen_toks", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p",
         "repetition_penalty"}  # fmt: skip


def sampling_options(gen_kwargs: dict[str, Any], default_max: int) -> dict[str, Any]:
    """lm-eval's gen_kwargs -> keyword arguments of `generate` (plus `stop_strings`)."""
    ignored = sorted(set(gen_kwargs) - KNOWN)
    if ignored:
        log.warning("generate_until: ignoring generation options %s", ", ".join(ignored))
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_new = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", default_max))
    do_sample = bool(gen_kwargs.get("do_sample", False))
    temperature = float(gen_kwargs.get("temperature", 1.0 if do_sample else 0.0)) if do_sample else 0.0
    return {
        "max_new_tokens": int(max_new),
        "temperature": temperature,
        "top_k": gen_kwargs.get("top_k") if do_sample else None,
        "top_p": gen_kwargs.get("top_p") if do_sample else None,
        "repetition_penalty": float(gen_kwargs.get("repetition_penalty", 1.0)),
        "stop_strings": [s for s in until if s],
    }


def generate_until(lm: ArchiFactoryLM, requests: list) -> list[str]:
    from archifactory.generate import generate
    from archifactory.sft.template import END, has_chat_template, special_id

    stats = lm._stats("generate_until")
    stats.requests += len(requests)
    stop_ids = [lm.eot_token_id]
    if has_chat_template(lm.tokenizer):  # an SFT model closes its turn with <|end|>
        stop_ids.append(special_id(lm.tokenizer, END))
    outputs: list[str] = [""] * len(requests)
    groups: dict[str, list[int]] = {}
    for index, req in enumerate(requests):
        groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
    for indices in groups.values():
        options = sampling_options(requests[indices[0]].args[1], lm.max_gen_toks)
        max_context = lm.max_length - options["max_new_tokens"]
        if max_context < 1:
            raise ArchiFactoryError(
                f"a task asks for {options['max_new_tokens']} new tokens, as many as the model's "
                f"max_seq_len ({lm.max_length}); lower eval.max_gen_toks"
            )
        prompts: dict[int, list[int]] = {}
        for index in indices:
            ids = lm.tok_encode(requests[index].args[0]) or [lm.eot_token_id]
            if len(ids) > max_context:
                stats.truncated += 1
                ids = ids[-max_context:]
            prompts[index] = ids
        order = sorted(indices, key=lambda i: len(prompts[i]))
        for first in range(0, len(order), lm.batch_size):
            chunk = order[first : first + lm.batch_size]
            with lm.autocast():
                results = generate(
                    lm.model,
                    [prompts[i] for i in chunk],
                    stop_token_ids=stop_ids,
                    tokenizer=lm.tokenizer,
                    **options,
                )
            for index, result in zip(chunk, results):
                outputs[index] = result.text or ""
                lm.cache_hook.add_partial("generate_until", requests[index].args, outputs[index])
    return outputs
