"""Prompts with checkable answers for reinforcement learning (`archifactory grpo`).

    from archifactory.data.rl import load_problems
    problems = load_problems(cfg.dataset)   # [Problem(prompt="What is 3+5?", answer="8", info={...}), …]

`dataset.format`: `arith` and `countdown` are generated (seeded by `dataset.data_seed`, difficulty knobs in
the config), `gsm8k` and `math` come from the Hugging Face Hub through `datasets.load_dataset` (one line
when it is unreachable), `rl_jsonl` reads local `{"prompt": …, "answer": …}` lines. Every problem must
carry an answer: a reward is computed against it.
"""

from archifactory.data.rl.problems import Problem, load_problems

__all__ = ["Problem", "load_problems"]
