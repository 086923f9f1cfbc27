"""Write a local multiple-choice task (lm-eval YAML + JSONL) from plain text: `word_order`, see
`archifactory/eval/mc_task.py`.

    python scripts/make_mc_task.py ../shared/data/shakespeare tasks/word_order --count 200
    archifactory eval word_order run=<run> eval.include_path=tasks/word_order

`--relative` writes the data path as given (read from the working directory, for a folder shipped in the
repository: `examples/tasks/shakespeare_word_order` was made with it, from the repository root).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from archifactory.core.errors import ArchiFactoryError
from archifactory.eval.mc_task import write_word_order_task


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text", type=Path, help="a .txt file or a folder of them")
    parser.add_argument("out", type=Path, help="the task folder to write (eval.include_path=)")
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="word_order", help="the task name (`archifactory eval <name>`)")
    parser.add_argument("--relative", action="store_true", help="keep the data path relative to the cwd")
    args = parser.parse_args()
    files = sorted(args.text.glob("*.txt")) if args.text.is_dir() else [args.text]
    if not files:
        print(f"error: no .txt file at {args.text}", file=sys.stderr)
        return 1
    data = str(args.out / f"{args.name}.jsonl") if args.relative else None
    try:
        task = write_word_order_task(files, args.out, args.count, args.seed, args.name, data)
    except ArchiFactoryError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {task} ({args.count} items from {len(files)} file(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
