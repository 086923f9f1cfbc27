"""`archifactory study`: the same stages, in order, for every variant of a sweep, and one report.

    archifactory study -m mixin=gqa,rwkv6 seed=0,1 dataset=text dataset.path=./corpus \\
        study.sft=chat_jsonl study.sft_args="dataset.path=./chat.jsonl" study.eval=perplexity,mqar \\
        study.dir=studies/mine

Stages per variant: pretrain (one Hydra multirun of `train` into `<study.dir>/pretrain/<run_name>`, so
every launcher — local, parallel, gpus, slurm — works as it does for `train -m`), the evaluations on the
pretrained model, then each post-training stage the study names (`stages.POST_STAGES`: SFT, then GRPO)
into `<study.dir>/<stage>/<run_name>`, each followed by the same evaluations.
`study.from=<sweep dir>` skips pretraining and studies the completed runs of a sweep already trained.

Resumable: rerunning the same command skips every completed stage and resumes the rest
(`trainer.resume=true`). A stage that fails is recorded in `<study.dir>/study.json` and that variant's
later stages are skipped; the other variants go on. The exit status is 1 when anything failed.

The report (`<study.dir>/report.md`, `report.json`): one row per variant (runs grouped by their
overrides, seeds pooled), a column per stage score — pretrain `val_bpb`, each post-training stage's
`val_loss`, each evaluation's value after each stage — as mean ± std over seeds, and per stage a
significance column against the best variant on that stage's score (`report.table.compare`: paired t
over shared seeds, else Welch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from archifactory.config.compose import compose
from archifactory.core.errors import ArchiFactoryError
from archifactory.report.runs import Stat, Variant, find_runs, group_variants
from archifactory.report.table import compare
from archifactory.runs import layout
from archifactory.runs.files import write_atomic, write_json_atomic
from archifactory.runs.records import read_summary
from archifactory.study.stages import POST_STAGES, PostStage, completed, missing_evals, run_verb

STUDY_KEYS = ("study.dir", "study.from", "study.eval", "study.eval_args") + tuple(
    f"study.{s.name}{suffix}" for s in POST_STAGES for suffix in ("", "_args")
)


@dataclass
class StudySpec:
    folder: Path
    train_args: list[str]  # the sweep's overrides (pretraining), `-m` dropped
    evals: list[str]
    eval_args: list[str]
    post: list[tuple[PostStage, str, list[str]]]  # (stage, dataset, extra overrides)
    source: Path | None = None  # study.from: an already-trained sweep


@dataclass
class StudyState:
    failed: dict[str, dict[str, str]] = field(default_factory=dict)  # run name -> {stage, error}


def parse_study_args(args: list[str]) -> StudySpec:
    """Split `study.*` keys from the training overrides; unknown `study.` keys are one error line."""
    study: dict[str, str] = {}
    rest = []
    for arg in args:
        key, eq, value = arg.partition("=")
        if key.startswith("study."):
            if key not in STUDY_KEYS or not eq:
                raise ArchiFactoryError(
                    f"unknown study option {arg!r}; the options are {', '.join(STUDY_KEYS)}"
                )
            study[key] = value
        elif arg not in ("-m", "--multirun"):
            rest.append(arg)
    recipe = recipe_study(rest)
    for key in [k for k in study if k.endswith("_args") and recipe.get(k)]:  # the recipe's, then the line's
        study[key] = f"{recipe[key]} {study[key]}"
    study = recipe | study
    if "study.dir" not in study:
        raise ArchiFactoryError("study needs study.dir=<folder> (where its runs, state and report go)")
    post = [
        (stage, study[f"study.{stage.name}"], study.get(f"study.{stage.name}_args", "").split())
        for stage in POST_STAGES
        if study.get(f"study.{stage.name}")
    ]
    source = Path(study["study.from"]) if study.get("study.from") else None
    if source is not None and rest:
        raise ArchiFactoryError(
            f"study.from={source} studies a trained sweep: drop the training overrides {rest}"
        )
    evals = [name for name in study.get("study.eval", "").split(",") if name]
    return StudySpec(
        Path(study["study.dir"]), rest, evals, study.get("study.eval_args", "").split(), post, source
    )


def _save_state(folder: Path, state: StudyState) -> None:
    write_json_atomic(folder / "study.json", {"failed": state.failed})


def recipe_study(args: list[str]) -> dict[str, str]:
    """The `study:` block of the `experiment=` recipe among `args` as `study.<key>` defaults (lists joined
    with commas); the command line's own `study.*` keys win."""
    recipe = [arg for arg in args if arg.partition("=")[0] in ("experiment", "+experiment")]
    if not recipe:
        return {}
    block = compose(recipe).get("study") or {}
    defaults = {}
    for key, value in OmegaConf.to_container(block, resolve=False).items():  # type: ignore[union-attr]
        text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        defaults[f"study.{key}"] = text
    unknown = sorted(set(defaults) - set(STUDY_KEYS))
    if unknown:
        raise ArchiFactoryError(f"{recipe[0]}: unknown study option(s) {', '.join(unknown)}")
    return defaults


def run_study(spec: StudySpec) -> int:
    """Run every stage not yet done, record failures, write the report; 1 when something failed."""
    folder = spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    state = StudyState()  # failures of this invocation: a rerun retries what failed before
    log = folder / "study.log"
    pretrain = spec.source or folder / "pretrain"
    if spec.source is None:
        sweep = [
            "train",
            "-m",
            *spec.train_args,
            f"hydra.sweep.dir={pretrain}",
            "hydra.sweep.subdir=${run_name}",
        ]
        result = run_verb([*sweep, "trainer.resume=true"], log)
        if not result.ok:
            state.failed["pretrain"] = {"stage": "pretrain", "error": result.detail}
    runs = sorted(path.parent.parent for path in pretrain.glob(f"*/{layout.HYDRA_DIR}/{layout.CONFIG_FILE}"))
    if not runs:
        raise ArchiFactoryError(f"no run under {pretrain}: nothing to study (see {log})")
    for run_dir in runs:
        _study_run(spec, run_dir, state, log)
    _save_state(folder, state)
    write_report(spec, runs)
    return 1 if state.failed else 0


def _study_run(spec: StudySpec, run_dir: Path, state: StudyState, log: Path) -> None:
    """One pretrained run through the evaluations and every post-training stage, stopping at a failure."""
    name = run_dir.name
    if not completed(run_dir):
        state.failed[name] = {"stage": "pretrain", "error": "the pretraining run did not complete"}
        return
    current = run_dir
    for stage, dataset, extra in [(None, "", []), *spec.post]:
        if stage is not None:
            target = spec.folder / stage.name / name
            if not completed(target):
                seed = (read_summary(run_dir) or {}).get(
                    "seed", 0
                )  # each seed's post-training keeps its seed
                args = [
                    stage.verb,
                    f"init_from={current.resolve()}",
                    f"dataset={dataset}",
                    f"seed={seed}",
                    *extra,
                ]
                result = run_verb([*args, f"hydra.run.dir={target}", "trainer.resume=true"], log)
                if not result.ok or not completed(target):
                    state.failed[name] = {"stage": stage.name, "error": result.detail}
                    return
            current = target
        todo = missing_evals(current, spec.evals)
        if todo:
            result = run_verb(["eval", ",".join(todo), f"run={current.resolve()}", *spec.eval_args], log)
            if not result.ok or missing_evals(current, spec.evals):
                state.failed[name] = {
                    "stage": f"eval after {stage.name if stage else 'pretrain'}",
                    "error": result.detail,
                }
                return


@dataclass
class Column:
    title: str
    stage: str  # "pretrain" or a post stage's name: whose runs the figure is read from
    key: str  # a summary key (dotted)
    significance: bool = False
    higher_is_better: bool = False


def report_columns(spec: StudySpec) -> list[Column]:
    columns = [Column("pretrain val_bpb", "pretrain", "val_bpb", True)]
    columns += [Column(f"pretrain {e}", "pretrain", f"eval.{e}.value") for e in spec.evals]
    for stage, _, _ in spec.post:
        columns.append(
            Column(f"{stage.name} {stage.metric}", stage.name, stage.metric, True, stage.higher_is_better)
        )
        columns += [Column(f"{stage.name} {e}", stage.name, f"eval.{e}.value") for e in spec.evals]
    return columns


def stage_variants(spec: StudySpec, runs: list[Path]) -> dict[str, list[Variant]]:
    """Per stage, the variants (grouped by the pretrained runs' overrides) holding that stage's runs."""
    pretrained = find_runs(runs)
    variants = {"pretrain": group_variants(pretrained)}
    for stage, _, _ in spec.post:
        staged = []
        for variant in variants["pretrain"]:
            folders = [p for r in variant.runs if completed(p := spec.folder / stage.name / r.path.name)]
            staged.append(Variant(variant.label, find_runs(folders) if folders else []))  # none: empty cells
        variants[stage.name] = staged
    return variants


def _mean_std(stat: Stat) -> str:
    if stat.mean is None:
        return "—"
    return f"{stat.mean:.4f}" if stat.std is None else f"{stat.mean:.4f} ± {stat.std:.4f}"


def report_rows(spec: StudySpec, runs: list[Path]) -> list[dict[str, Any]]:
    """One dict per variant: label, seeds, and per column the per-seed values, mean, std (and verdict)."""
    variants, columns = stage_variants(spec, runs), report_columns(spec)
    rows = [
        {"variant": v.label, "seeds": sorted(str(r.seed) for r in v.completed)} for v in variants["pretrain"]
    ]
    for column in columns:
        stage = variants[column.stage]
        ranked = [v for v in stage if v.stat(column.key).mean is not None]
        pick = max if column.higher_is_better else min
        best = pick(ranked, key=lambda v: v.stat(column.key).mean) if ranked else None  # type: ignore[arg-type, return-value]
        for row, variant in zip(rows, stage):
            stat = variant.stat(column.key)
            cell: dict[str, Any] = {"values": variant.by_seed(column.key), "mean": stat.mean, "std": stat.std}
            if column.significance and best is not None and stat.mean is not None:
                cell["significant"] = compare(variant, best, column.key).verdict
            row[column.title] = cell
    return rows


def write_report(spec: StudySpec, runs: list[Path]) -> str:
    rows, columns = report_rows(spec, runs), report_columns(spec)
    header = ["variant", "seeds"]
    for column in columns:
        header.append(column.title)
        if column.significance:
            header.append(f"{column.title} vs best")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], ",".join(row["seeds"])]
        for column in columns:
            cell = row[column.title]
            cells.append(_mean_std(Stat(list(cell["values"].values()))))
            if column.significance:
                cells.append(cell.get("significant", "—"))
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_atomic(spec.folder / "report.md", text)
    write_json_atomic(spec.folder / "report.json", {"rows": rows})
    return text
