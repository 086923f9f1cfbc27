"""`archifactory grpo init_from=<run> dataset=<task>`: what the verb takes from the run it starts from.

The architecture (`model`, `mixin`, `ffn`, `positional`, `residual`) and the tokenizer are the init run's
(an override of the architecture is refused with one line); the chat template too when the init run is an
SFT run (its tokenizer carries the template's tokens): prompts are then rendered as a user turn and a
completion ends at `<|end|>`, else the prompt is the question and a newline and a completion ends at EOS.
The run directory is `outputs/<init run name>-grpo-<dataset name>`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from archifactory.core.errors import ArchiFactoryError
from archifactory.data.chat.template import END, has_chat_template, render, special_id
from archifactory.data.rl import Problem, load_problems
from archifactory.data.tokenizer import Tokenizer
from archifactory.grpo.rewards import check_rewards
from archifactory.model.stack import StackedMixinForCausalLM
from archifactory.runs import layout
from archifactory.runs.load import load_run, load_run_config, resolve_run

PRESETS = {"grpo": "default", "trainer": "grpo"}  # what the verb adds unless given
ARCHITECTURE = ("model", "mixin", "ffn", "positional", "residual")
RL_DATASETS = "arith|countdown|gsm8k|math|rl_jsonl"
USAGE = f"usage: archifactory grpo init_from=<run dir> dataset={RL_DATASETS} [key=value …]"


def _key(arg: str) -> str:
    return arg.partition("=")[0].lstrip("+~")


def grpo_arguments(args: list[str]) -> tuple[Path, list[str]]:
    """The init run directory and the Hydra arguments of the GRPO run."""
    init_from = [arg.partition("=")[2] for arg in args if _key(arg) == "init_from"]
    if len(init_from) != 1 or not init_from[0]:
        raise ArchiFactoryError(f"grpo needs exactly one init_from=<run dir> (an SFT run, ideally); {USAGE}")
    for arg in args:
        if "=" in arg and _key(arg).split(".")[0] in ARCHITECTURE:
            raise ArchiFactoryError(
                f"grpo takes the architecture from the init run; drop {arg!r} (or train that variant first)"
            )
    keys = {_key(arg) for arg in args}
    if "dataset" not in keys and "experiment" not in keys:
        raise ArchiFactoryError(f"grpo needs dataset={RL_DATASETS}; {USAGE}")
    init = resolve_run(init_from[0]).resolve()
    name = str(load_run_config(init).get("run_name") or init.name)
    hydra_args = [arg for arg in args if _key(arg) != "init_from"]
    hydra_args.append(f"init_from={init}")
    if "run_name" not in keys:
        hydra_args.append(f"run_name='{name}-grpo-${{dataset.name}}'")
    if "experiment" not in keys:  # a recipe picks its own presets
        hydra_args += [f"{group}={preset}" for group, preset in PRESETS.items() if group not in keys]
    return init, hydra_args


def with_init_architecture(cfg: DictConfig, init_cfg: DictConfig) -> DictConfig:
    """`cfg` with the architecture groups replaced by the init run's (resolved) ones."""
    with open_dict(cfg):
        for group in ARCHITECTURE:
            if group in init_cfg:
                cfg[group] = (
                    OmegaConf.merge(cfg[group], init_cfg[group]) if group == "model" else init_cfg[group]
                )
    return cfg


def check_options(cfg: DictConfig) -> None:
    """What the schema's types cannot say about `grpo.*` and the dataset, as one line per problem."""
    if cfg.dataset.get("source") != "rl":
        raise ArchiFactoryError(
            f"dataset={cfg.dataset.name} has no answers to reward; grpo takes dataset={RL_DATASETS}"
        )
    g = cfg.grpo
    if g is None:
        raise ArchiFactoryError("grpo options missing: pass grpo=default (the verb adds it)")
    check_rewards(list(g.reward_funcs), g.reward_weights)
    problems = [
        (
            g.num_generations < 2,
            f"grpo.num_generations={g.num_generations} must be >= 2 (a group needs a spread)",
        ),
        (g.prompts_per_step < 1, f"grpo.prompts_per_step={g.prompts_per_step} must be >= 1"),
        (g.max_completion_length < 1, f"grpo.max_completion_length={g.max_completion_length} must be >= 1"),
        (g.num_iterations < 1, f"grpo.num_iterations={g.num_iterations} must be >= 1"),
        (g.temperature < 0, f"grpo.temperature={g.temperature} must be >= 0"),
        (not 0 < g.top_p <= 1, f"grpo.top_p={g.top_p} must be in (0, 1]"),
        (not 0 <= g.epsilon < 1, f"grpo.epsilon={g.epsilon} must be in [0, 1)"),
        (
            g.epsilon_high is not None and g.epsilon_high < 0,
            f"grpo.epsilon_high={g.epsilon_high} must be >= 0",
        ),
        (g.beta < 0, f"grpo.beta={g.beta} must be >= 0"),
    ]
    bad = [message for failed, message in problems if failed]
    if bad:
        raise ArchiFactoryError("; ".join(bad))


@dataclass
class Task:
    """The policy to train and everything needed to prompt it and score it."""

    model: StackedMixinForCausalLM
    tokenizer: Tokenizer
    problems: list[Problem]
    prompts: list[list[int]]  # token ids of each problem's prompt
    stop_ids: list[int]
    pad_id: int
    chat: bool


def prompt_ids(tokenizer: Tokenizer, problem: Problem, chat: bool, system: str | None) -> list[int]:
    """The tokens a completion continues: a user turn + open assistant header (chat), else `question\\n`."""
    if not chat:
        return tokenizer.encode(problem.prompt + "\n")
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": problem.prompt}
    ]
    return render(tokenizer, messages, add_generation_prompt=True).ids


def prepare(cfg: DictConfig, init: Path, device: torch.device) -> Task:
    """Load the init run's model and tokenizer and the problems; refuse (one line) what cannot train."""
    if not (init / layout.TOKENIZER).is_dir():  # a synthetic probe's run, or a copy without its tokenizer
        raise ArchiFactoryError(
            f"run {init} has no {layout.TOKENIZER}/ folder: GRPO samples and scores text; init_from a run "
            "pretrained on text and instruction-tuned with `archifactory sft` (they save their tokenizer)"
        )
    run = load_run(init, device)
    tokenizer = run.tokenizer
    chat = has_chat_template(tokenizer)
    problems = load_problems(cfg.dataset)
    prompts = [prompt_ids(tokenizer, p, chat, cfg.dataset.get("system_prompt")) for p in problems]
    longest = max(len(p) for p in prompts)
    context = int(run.config.model.max_seq_len)
    need = longest + int(cfg.grpo.max_completion_length)
    if need > context:
        raise ArchiFactoryError(
            f"grpo.max_completion_length={cfg.grpo.max_completion_length} plus the longest prompt "
            f"({longest} tokens) is {need} tokens, beyond the model's context model.max_seq_len={context}; "
            f"lower grpo.max_completion_length to {max(context - longest, 0)} or less"
        )
    stop_ids = [special_id(tokenizer, END), tokenizer.eos_id] if chat else [tokenizer.eos_id]
    return Task(run.model.train(), tokenizer, problems, prompts, stop_ids, tokenizer.eos_id, chat)
