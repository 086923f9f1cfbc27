"""lm-eval's generation options, read for `ArchiFactoryLM.generate_until` (which runs `archifactory.generate.sampling`).

Each request is `(context, gen_kwargs)`; requests with the same `gen_kwargs` run together, in batches of
the adapter's batch size (sorted by prompt length, so a left-padded batch holds little padding).
Options understood (lm-eval's / Hugging Face's names): `until` (stop strings, a string or a list),
`max_gen_toks` (or `max_new_tokens`; default `eval.max_gen_toks`), `do_sample` (False: greedy),
`temperature` (1.0 when sampling without one), `top_k`, `top_p`, `repetition_penalty`. Others are
ignored with a warning. Generation also stops at EOS. A context longer than `max_length - max_gen_toks`
keeps its last tokens, and is counted as truncated.
"""

from __future__ import annotations

import logging
from typing import Any

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
