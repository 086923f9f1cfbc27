"""`archifactory generate` and `archifactory export`: inference verbs over a finished run directory.

    archifactory generate [run=<run dir or name>] prompt="Once upon a time" [num_samples=3] [max_new_tokens=200]
                          [temperature=0.8] [top_k=…] [top_p=0.95] [repetition_penalty=1.1] [stop='\\n\\n']
                          [seed=0] [step=<checkpoint step>] [device=auto|cpu|cuda]
    archifactory generate run=… prompt_file=prompts.txt|prompts.jsonl [out=generations.jsonl] [...]
    archifactory export [run=…] [out=<folder>] [step=…] [format=hf|deepseek_v3]

These verbs read a run rather than start one, so they take plain `key=value` options (not Hydra: no
output directory is created). `run` defaults to the most recent completed run under `outputs/`; the run
and checkpoint used are named in the first line, on stderr, so stdout carries only the generated text
(streamed as it is produced) or, with `prompt_file`, JSONL. Generation stops at the tokenizer's EOS
unless `ignore_eos=true`; `stop=` (repeatable; `\\n`-style escapes) adds stop strings. On an SFT run,
`chat=true` (optionally `system="…"`) wraps each prompt as a user turn in its chat template and stops at
the end of the assistant's turn.
"""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.chat.template import END, has_chat_template, render, special_id

GENERATE_OPTIONS: dict[str, Callable[[str], Any]] = {
    "run": str,
    "prompt": str,
    "prompt_file": str,
    "out": str,
    "num_samples": int,
    "max_new_tokens": int,
    "temperature": float,
    "top_k": int,
    "top_p": float,
    "repetition_penalty": float,
    "stop": str,
    "seed": int,
    "step": int,
    "device": str,
    "ignore_eos": lambda v: {"true": True, "false": False}[v.lower()],
    "chat": lambda v: {"true": True, "false": False}[v.lower()],
    "system": str,
}
EXPORT_OPTIONS: dict[str, Callable[[str], Any]] = {"run": str, "out": str, "step": int, "format": str}


def parse_options(args: list[str], spec: dict[str, Callable[[str], Any]], verb: str) -> dict[str, Any]:
    """`key=value` arguments typed by `spec`; `stop` may repeat. One line for an unknown key or bad value."""
    options: dict[str, Any] = {"stop": []}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in spec:
            raise ArchiFactoryError(
                f"archifactory {verb}: unknown option {arg!r}; options are {', '.join(f'{k}=' for k in spec)}"
            )
        try:
            typed = spec[key](value)
        except (ValueError, KeyError):
            raise ArchiFactoryError(f"archifactory {verb}: {key}={value!r} is not a valid {key}") from None
        if key == "stop":
            options["stop"].append(codecs.decode(typed, "unicode_escape"))
        else:
            options[key] = typed
    return options


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ArchiFactoryError(f"device={name} but CUDA is not available; use device=cpu")
    return name


def read_prompts(path: Path) -> list[str]:
    """A .jsonl file of objects with a `prompt` key, or any other text file with one prompt per line."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as error:
        raise ArchiFactoryError(f"prompt_file={path} is unreadable ({error.strerror})") from error
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for number, line in enumerate(lines, 1):
        try:
            prompts.append(str(json.loads(line)["prompt"]))
        except (ValueError, KeyError, TypeError):
            raise ArchiFactoryError(f'{path}:{number} is not a JSON object with a "prompt"') from None
    return prompts


@dataclass
class TextStream:
    """Prints one row's text as tokens arrive: holds back an incomplete UTF-8 character and anything that
    could still turn out to be the start of a stop string (so a stop string is never printed)."""

    decode: Callable[[list[int]], str]
    hold: int  # characters kept back: the longest stop string minus one
    out: TextIO = field(default_factory=lambda: sys.stdout)
    tokens: list[int] = field(default_factory=list)
    printed: int = 0

    def add(self, token: int) -> None:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return
        self.flush(text[: max(self.printed, len(text) - self.hold)])

    def flush(self, text: str) -> None:
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = max(self.printed, len(text))


def generate_verb(args: list[str]) -> int:
    from archifactory.generate.sampling import generate
    from archifactory.runs.load import load_run, resolve_run

    opts = parse_options(args, GENERATE_OPTIONS, "generate")
    if ("prompt" in opts) == ("prompt_file" in opts):
        raise ArchiFactoryError('archifactory generate needs prompt="…" or prompt_file=<file> (one of them)')
    num_samples = opts.get("num_samples", 1)
    if num_samples < 1:
        raise ArchiFactoryError(f"num_samples={num_samples} must be >= 1")
    run_dir = resolve_run(opts.get("run"))
    run = load_run(run_dir, device=pick_device(opts.get("device", "auto")), step=opts.get("step"))
    print(
        f"run: {run_dir} (step {run.step}, {run.config.mixin.name}/{run.config.ffn.name}, "
        f"{run.params['total']:,} parameters)",
        file=sys.stderr,
    )
    tok = run.tokenizer
    chat = opts.get("chat", False)
    if chat and not has_chat_template(tok):
        raise ArchiFactoryError(
            f"chat=true needs an instruction-tuned run (archifactory sft …); {run_dir} has no chat template"
        )
    stop_ids = [] if opts.get("ignore_eos") else [tok.eos_id]
    if chat:  # the assistant closes its turn with <|end|>
        stop_ids.append(special_id(tok, END))
    sampling = {
        "max_new_tokens": opts.get("max_new_tokens", 128),
        "temperature": opts.get("temperature", 0.8),
        "top_k": opts.get("top_k"),
        "top_p": opts.get("top_p", 0.95),
        "repetition_penalty": opts.get("repetition_penalty", 1.0),
        "stop_token_ids": stop_ids,
        "stop_strings": opts["stop"],
        "tokenizer": tok,
    }
    seed = opts.get("seed", 0)
    source = f"{run_dir} (step {run.step})"
    if "prompt" in opts:
        ids = encode_prompt(tok, opts["prompt"], chat, opts.get("system"))
        hold = max((len(s) for s in opts["stop"]), default=1) - 1
        new_tokens = 0
        for sample in range(num_samples):
            if num_samples > 1:
                print(f"--- sample {sample + 1}/{num_samples}", file=sys.stderr)
            if not chat:  # a continuation is printed after its prompt; a chat answer stands alone
                sys.stdout.write(opts["prompt"])
            stream = TextStream(tok.decode, hold)
            stops = set(sampling["stop_token_ids"])  # EOS ends the text; it is not part of it

            def on_token(_: int, token: int, stream: TextStream = stream, stops: set[int] = stops) -> None:
                if token not in stops:
                    stream.add(token)

            result = generate(run.model, [ids], seed=seed + sample, on_token=on_token, **sampling)
            stream.flush(result[0].text or "")
            sys.stdout.write("\n")
            new_tokens += len(result[0].tokens)
        sys.stdout.flush()  # the text first, then the closing line on stderr (stdout stays the text alone)
        print(f"done: {num_samples} sample(s), {new_tokens} new tokens from {source}", file=sys.stderr)
        return 0
    prompts = read_prompts(Path(opts["prompt_file"]))
    batch = [encode_prompt(tok, p, chat, opts.get("system")) for p in prompts for _ in range(num_samples)]
    results = generate(run.model, batch, seed=seed, **sampling)
    lines = [
        json.dumps(
            {
                "prompt": prompts[index // num_samples],
                "sample": index % num_samples,
                "completion": result.text,
                "stop_reason": result.stop_reason,
                "num_tokens": len(result.tokens),
            }
        )
        + "\n"
        for index, result in enumerate(results)
    ]
    if "out" in opts:
        Path(opts["out"]).write_text("".join(lines))
    else:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
    where = opts.get("out", "stdout")
    print(f"done: wrote {len(lines)} generations to {where} from {source}", file=sys.stderr)
    return 0


def encode_prompt(tokenizer, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """The prompt's ids; an empty prompt starts from EOS (the document boundary the model was trained on).
    With `chat`, the prompt is a user turn in the SFT chat template (after an optional system turn), ending
    with the open assistant header the model continues."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return render(tokenizer, messages, add_generation_prompt=True).ids
    return tokenizer.encode(prompt) or [tokenizer.eos_id]


def export_verb(args: list[str]) -> int:
    from archifactory.generate.export import check_format, export_run
    from archifactory.runs.load import resolve_run

    opts = parse_options(args, EXPORT_OPTIONS, "export")
    export_format = opts.get("format", "hf")
    check_format(export_format)  # before looking for the run
    run_dir = resolve_run(opts.get("run"))
    out = export_run(run_dir, opts.get("out"), opts.get("step"), export_format)
    print(f"run: {run_dir}", file=sys.stderr)
    print(out)  # stdout: the folder alone, for scripts; the closing line goes with the run line
    sys.stdout.flush()
    print(f"done: exported {run_dir} to {out}", file=sys.stderr)
    return 0
