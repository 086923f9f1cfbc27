"""The `experiment=grpo_arith_cpu` recipe over 3 seeds: mean reward over the first and the last 10% of steps.

    PYTHONPATH=. python scripts/bench_grpo.py [--root /tmp/bench-grpo] [--seeds 0 1 2] [--mixin gqa]

Builds a tiny CPU-pretrained + SFT run on arithmetic once (tests/grpo/helpers.py: 10 pretraining steps on
templated text, `--sft-steps` SFT steps on "What is a+b?" conversations), then runs
`archifactory grpo experiment=grpo_arith_cpu init_from=<it> seed=<s>` per seed and prints a Markdown table
(docs/grpo.md holds the measured one). Minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.grpo.helpers import pretrain_and_sft  # noqa: E402


def reward_windows(run_dir: Path) -> tuple[float, float, int]:
    rewards = [json.loads(line)["reward"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    width = max(1, math.ceil(len(rewards) / 10))
    return sum(rewards[:width]) / width, sum(rewards[-width:]) / width, len(rewards)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/bench-grpo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--mixin", default="gqa")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("overrides", nargs="*", help="extra overrides for every grpo run")
    args = parser.parse_args()
    sft = args.root / "outputs" / f"sft_{args.mixin}"
    if not (sft / "summary.json").is_file():
        pretrain_and_sft(args.root, args.mixin, sft_steps=args.sft_steps)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    rows = []
    for seed in args.seeds:
        name = f"grpo_arith_cpu_{args.mixin}_s{seed}"
        command = [sys.executable, "-m", "archifactory", "grpo", "experiment=grpo_arith_cpu", f"init_from={sft}",
                   f"seed={seed}", f"run_name={name}", *args.overrides]  # fmt: skip
        subprocess.run(command, cwd=args.root, env=env, check=True, capture_output=True)
        first, last, steps = reward_windows(args.root / "outputs" / name)
        rows.append((seed, steps, first, last))
    print(
        "| seed | steps | reward, first 10% | reward, last 10% | higher? |\n| --- | --: | --: | --: | --- |"
    )
    for seed, steps, first, last in rows:
        print(f"| {seed} | {steps} | {first:.3f} | {last:.3f} | {'yes' if last > first else 'no'} |")
    return 0 if all(last > first for _, _, first, last in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
