"""The lm-eval runner: any lm-evaluation-harness task or group by name, on our model.

`run_lm_eval(job)` builds lm-eval's `TaskManager` (its built-in tasks, plus `eval.include_path`: a folder
of local task YAMLs), wraps the run's model in `ArchiFactoryLM` and calls `lm_eval.simple_evaluate`
once for all requested names. Each name gets a `TaskResult`: its headline metric (the first metric of
its results: `acc` for MMLU, `acc` then `acc_norm` for hellaswag, `word_perplexity` for wikitext), and
as details lm-eval's full output restricted to that task and its subtasks, plus how many requests were
left-truncated to the model's `max_seq_len`.

Offline: local tasks (`eval.include_path`) never touch the Hub, and when every requested name is one of
them lm-eval's ~14,000 built-in task YAMLs are not even indexed; a built-in plain task (`arc_easy`, not a
group such as `mmlu`) gets an index of the few folders that bear on it (`eval/task_folders.py`: ~1 s, not
11 s). A built-in task needs its dataset from the Hub: with no network it is refused at once; in offline
mode (`HF_HUB_OFFLINE=1`) a dataset missing from the local cache fails in lm-eval's loading. Both end in
one line that names `eval.include_path`.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from archifactory.core.errors import ArchiFactoryError
from archifactory.data import hub
from archifactory.eval.job import EvalJob, TaskResult
from archifactory.eval.task_folders import task_folders

log = logging.getLogger(__name__)

LOCAL_HINT = "run local tasks with eval.include_path=<folder of lm-eval task YAMLs> (see docs/evaluation.md, 'Offline')"
# Result keys that are not metrics.
NOT_METRICS = {"alias", "samples", "name", "sample_len", " "}


def hub_error(names: list[str], why: str) -> ArchiFactoryError:
    return ArchiFactoryError(
        f"lm-eval task(s) {', '.join(names)} need the Hugging Face Hub ({why}); {LOCAL_HINT}"
    )


def is_offline_error(error: BaseException) -> bool:
    text = f"{type(error).__name__}: {error}".lower()
    return isinstance(error, (ConnectionError, TimeoutError)) or any(
        marker in text
        for marker in ("offline", "couldn't reach", "connection", "localentrynotfound", "not cached")
    )


def task_manager(names: list[str], include_path: str | None) -> Any:
    """lm-eval's TaskManager: local tasks only when they cover every name (fast), else with the built-in task
    folders that bear on the other names when each is a plain task there (fast), else with all built-ins."""
    from lm_eval.tasks import TaskManager

    builtin = list(names)
    if include_path is not None:
        folder = Path(include_path).expanduser()
        if not folder.is_dir():
            raise ArchiFactoryError(f"eval.include_path={include_path} is not a folder of task YAMLs")
        local = TaskManager(include_path=str(folder.resolve()), include_defaults=False)
        builtin = [name for name in names if name not in local.all_tasks]
        if not builtin:
            return local
    if not hub.offline_mode() and not hub.hub_reachable():
        raise hub_error(builtin, "no network; set HF_HUB_OFFLINE=1 to use datasets already in the HF cache")
    local_folder = [] if include_path is None else [str(Path(include_path).expanduser().resolve())]
    manager = narrow_task_manager(builtin, local_folder) or TaskManager(include_path=local_folder or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ArchiFactoryError(
            f"unknown lm-eval task {unknown[0]!r}{hint}; `python -m lm_eval ls tasks` lists them, "
            "and eval.include_path=<folder> adds local task YAMLs"
        )
    return manager


def narrow_task_manager(builtin: list[str], local: list[str]) -> Any | None:
    """lm-eval's index of only the built-in task folders that bear on `builtin` (`eval/task_folders.py`), then
    the local folder, as the full index orders them; None (index everything) unless each name is a plain
    task there."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folders = task_folders(builtin, Path(lm_eval.tasks.__file__).parent)
    if not folders:
        return None
    manager = TaskManager(include_path=[*map(str, folders), *local], include_defaults=False)
    return manager if all(name in manager.all_subtasks for name in builtin) else None


def headline(results: dict[str, Any]) -> tuple[str, float, float | None]:
    """(metric, value, stderr) of one task's results: its first metric (lm-eval keeps metric_list order)."""
    for key, value in results.items():
        metric, _, filter_name = key.partition(",")
        if metric in NOT_METRICS or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = results.get(f"{metric}_stderr,{filter_name}")
        label = metric if filter_name in ("", "none") else f"{metric},{filter_name}"
        stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
        return label, float(value), stderr
    raise ArchiFactoryError(f"lm-eval reported no metric ({', '.join(results)})")


def subtasks(output: dict[str, Any], name: str) -> list[str]:
    """`name` and every task or group below it, from lm-eval's `group_subtasks`."""
    tree = output.get("group_subtasks", {})
    found, todo = [], [name]
    while todo:
        current = todo.pop(0)
        if current not in found:
            found.append(current)
            todo.extend(tree.get(current, []))
    return found


def restrict(output: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """lm-eval's output with every per-task section cut down to `names` (shared keys kept whole)."""
    per_task = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                "n-samples", "samples")  # fmt: skip
    out = {key: value for key, value in output.items() if key not in per_task}
    for key in per_task:
        if isinstance(output.get(key), dict):
            out[key] = {name: value for name, value in output[key].items() if name in names}
    return out


def run_lm_eval(job: EvalJob) -> list[TaskResult]:
    opts = job.options
    if not opts.show_progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = task_manager(job.names, opts.include_path)

    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable, make_table

    from archifactory.data.chat.template import has_chat_template
    from archifactory.eval.adapter import ArchiFactoryLM

    run = job.run
    lm = ArchiFactoryLM(
        run.model,
        run.tokenizer,
        max_length=int(run.config.model.max_seq_len),
        batch_size=opts.batch_size,
        autocast=job.autocast,
        max_gen_toks=opts.max_gen_toks,
        show_progress=opts.show_progress,
    )
    limit = opts.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    try:
        output = simple_evaluate(
            model=lm,
            tasks=list(job.names),
            num_fewshot=opts.num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=opts.bootstrap_iters,
            log_samples=opts.log_samples,
            random_seed=0,
            numpy_random_seed=opts.seed,
            torch_random_seed=opts.seed,
            fewshot_random_seed=opts.seed,
            apply_chat_template=has_chat_template(run.tokenizer),  # an SFT run: prompts in its chat template
        )
    except ArchiFactoryError:
        raise
    except Exception as error:
        if isinstance(error, ValueError) and str(error).startswith("Duplicate task"):
            raise ArchiFactoryError(
                f"{str(error).splitlines()[0]}: a task is asked for twice (alone and in its group); "
                "drop one of the names"
            ) from error
        if is_offline_error(error):
            why = "offline mode, not in the local cache" if hub.offline_mode() else "no network"
            raise hub_error(list(job.names), why) from error
        raise
    if output is None:  # only rank 0 gets results
        return []
    truncated = lm.truncated
    if any(truncated.values()):
        counts = ", ".join(f"{n} {kind}" for kind, n in truncated.items() if n)
        print(f"warning: left-truncated to max_seq_len={lm.max_length}: {counts} request(s)", file=sys.stderr)
    if opts.show_progress:
        print(make_table(output))
        if output.get("groups"):
            print(make_table(output, "groups"))
    results = []
    for key in job.names:
        if key not in output["results"]:
            raise ArchiFactoryError(f"lm-eval returned no result for {key!r}")
        metric, value, stderr = headline(output["results"][key])
        details = restrict(output, subtasks(output, key))
        details["archifactory"] = {
            "truncated_requests": truncated,
            "requests": {kind: stats.requests for kind, stats in lm.stats.items()},
            "max_length": lm.max_length,
        }
        details = _jsonable(details, handle_non_serializable)
        n_shot = output.get("n-shot", {}).get(key)
        extra = {"num_fewshot": n_shot, "limit": limit, "truncated_requests": sum(truncated.values())}
        results.append(TaskResult(key, metric, value, stderr, details, extra))
    return results


def _jsonable(value: Any, default: Any) -> Any:
    """lm-eval's output as plain JSON types (its own `handle_non_serializable` for the rest)."""
    return json.loads(json.dumps(value, default=default))
