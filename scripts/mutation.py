"""Mutation testing of the modules where a silent bug would corrupt comparisons (mutmut 3).

    python scripts/mutation.py positional            # one target: its modules x its test subset
    python scripts/mutation.py all --max-children 1  # every target in turn
    python scripts/mutation.py --list
    python scripts/mutation.py named                 # the hand-written mutations of issue #19 (minutes)

Each target is a few source modules and the tests that claim to check them. The run happens in a scratch
copy of the repository (`--workdir`, default `$TMPDIR/archifactory-mutation/<target>`) holding a
`pyproject.toml` whose `[tool.mutmut]` names that target, so the repository is untouched and each target
keeps its own mutmut cache (a rerun only retests mutants whose function changed). mutmut runs only the
tests that cover a mutated function, one mutant per worker process (`--max-children`; threads pinned to
1). The summary line per target is the mutation score: killed / (killed + survived), with mutants no
selected test reaches ("no tests") and timeouts listed apart. Not run by CI (see
`benchmarks/mutation.md` for the figures and the survivors judged equivalent).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    modules: tuple[str, ...]  # files mutated
    tests: tuple[str, ...]  # the pytest selection (paths or node ids) that checks them
    why: str


TARGETS: dict[str, Target] = {
    "positional": Target(
        ("archifactory/model/positional.py",),
        ("tests/model/test_positional.py",),
        "rope / alibi / sinusoidal / learned: positions every attention variant reads",
    ),
    "attention": Target(
        ("archifactory/model/mixins/attention.py",),
        ("tests/model/test_positional.py", "tests/model/test_accounting.py"),
        "gqa and the shared causal attention (mask, grouped K/V, SDPA vs reference, qk_norm), its FLOPs",
    ),
    "loss": Target(
        ("archifactory/model/loss.py", "archifactory/train/loop.py", "archifactory/eval/evaluate.py"),
        (
            "tests/model/test_stack.py::test_loss_ignores_padding_targets",
            "tests/model/test_stack.py::test_chunked_cross_entropy_equals_full",
            "tests/train/test_evaluate.py",
        ),
        "cross-entropy (chunked and not), validation loss and bits per byte (only `evaluate` in loop.py "
        "is reached by these tests; the rest of the loop counts as 'no tests')",
    ),
    "flops": Target(
        (
            "archifactory/model/ffn/swiglu.py",
            "archifactory/model/ffn/mlp.py",
            "archifactory/model/ffn/base.py",
        ),
        ("tests/model/test_accounting.py",),
        "FLOPs per token of the default FFNs and the intermediate-size rule (gqa's: target attention)",
    ),
    "checkpoint": Target(
        ("archifactory/train/checkpoint.py",),
        (
            "tests/train/test_checkpoint.py",
            "tests/train/test_run_promises.py::test_checkpoint_restores_every_rng",
            "tests/train/test_run_promises.py::test_keep_checkpoints_prunes_the_oldest",
        ),
        "atomic checkpoints, sha256 and signature checks, every RNG, pruning (the loader's resume guard: "
        "the named mutations; its tests build token caches, too slow per mutant here)",
    ),
}


@dataclass(frozen=True)
class Named:
    """A hand-written mutation (one exact source edit) that the test selection must kill."""

    what: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


# The blind spots of issue #19 plus the README promises it listed, each as the bug a test must catch.
NAMED: tuple[Named, ...] = (
    Named("gqa without RoPE", "archifactory/model/mixins/attention.py",
          "q, k = ctx.rotate(q), ctx.rotate(k)", "q, k = q, k", ("tests/model/test_positional.py",)),
    Named("ALiBi bias with the wrong sign", "archifactory/model/positional.py",
          "return -slopes[:, None, None]", "return slopes[:, None, None]", ("tests/model/test_positional.py",)),
    Named("sinusoidal sin/cos swapped", "archifactory/model/positional.py",
          "table[:, 0 : 2 * half : 2] = torch.sin(angles)", "table[:, 0 : 2 * half : 2] = torch.cos(angles)",
          ("tests/model/test_positional.py",)),
    Named("gqa ignores qk_norm", "archifactory/model/mixins/attention.py",
          "if self.q_norm is not None and self.k_norm is not None:", "if False:",
          ("tests/model/test_positional.py",)),
    Named("grouped K/V mapped to the wrong query heads", "archifactory/model/mixins/attention.py",
          "k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)",
          "k, v = k.repeat(1, groups, 1, 1), v.repeat(1, groups, 1, 1)", ("tests/model/test_positional.py",)),
    Named("passed-in embedding re-initialised", "archifactory/model/stack.py",
          "        if embedding_module is None:\n", "        if True:\n", ("tests/model/test_stack.py",)),
    Named("gqa counts no projection FLOPs", "archifactory/model/mixins/attention.py",
          "projections = 2 * self.hidden_size * (2 * self.hidden_size + 2 * kv_size)", "projections = 0",
          ("tests/model/test_accounting.py", "tests/model/test_contract.py::test_mixin_accounting")),
    Named("swiglu counts two matmuls", "archifactory/model/ffn/swiglu.py",
          "return 2 * 3 * self.hidden_size", "return 2 * 2 * self.hidden_size", ("tests/model/test_accounting.py",)),
    Named("val_bpb in nats", "archifactory/eval/evaluate.py",
          "loss / math.log(2) / bytes_per_token", "loss / bytes_per_token", ("tests/train/test_evaluate.py",)),
    Named("loader resume guard ignores the seed", "archifactory/data/loader.py",
          'for key in ("seed", "seq_len", "num_windows", "tokens"):',
          'for key in ("seq_len", "num_windows", "tokens"):',
          ("tests/data/test_loader.py",)),
    Named("loader resume guard ignores the dataset", "archifactory/data/loader.py",
          'for key in ("seed", "seq_len", "num_windows", "tokens"):', 'for key in ("seed", "seq_len"):',
          ("tests/data/test_loader.py",)),
    Named("HyperMoE generator re-initialised by the model", "archifactory/model/ffn/hyper_moe.py",
          "keep = (self.gen_up, self.expert_embedding)", "keep = (self.expert_embedding,)",
          ("tests/model/test_hyper_moe.py",)),
    Named("dispatch=auto never takes the grouped path", "archifactory/model/ffn/_moe_dispatch.py",
          'return "grouped" if grouped_mm_supported(x, weight) else "batched"', 'return "batched"',
          ("tests/model/test_moe.py",)),
    Named("numpy RNG not restored", "archifactory/train/checkpoint.py",
          '    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))', "    pass",
          ("tests/train/test_run_promises.py::test_checkpoint_restores_every_rng",)),
    Named("keep_checkpoints keeps one too many", "archifactory/train/checkpoint.py",
          "list_checkpoints(directory)[:-keep]", "list_checkpoints(directory)[: -keep - 1]",
          ("tests/train/test_checkpoint.py",)),
    Named("model.loss_chunk_size not wired", "archifactory/model/stack.py",
          "loss_chunk_size=model_cfg.loss_chunk_size,", "loss_chunk_size=0,",
          ("tests/train/test_run_promises.py::test_train_wires_budget_accumulation_metrics_chunked_loss_and_compile",)),
    Named("trainer.compile not wired", "archifactory/train/setup.py",
          "            block.compile()", "            pass",
          ("tests/train/test_run_promises.py::test_train_wires_budget_accumulation_metrics_chunked_loss_and_compile",)),
    Named("a stop signal leaves summary.json's steps stale", "archifactory/train/loop.py",
          "run.recorder.update_summary(steps=run.state.step, tokens_seen=run.state.tokens_seen)", "pass",
          ("tests/train/test_run_promises.py::test_stop_signal_checkpoints_and_marks_the_run_interrupted",)),
    Named("unknown key / wrong type: Hydra's multi-line report", "archifactory/cli/hydra_app.py",
          '    os.environ["HYDRA_FULL_ERROR"] = "1"', "    pass",
          ("tests/test_cli.py::test_compose_errors_are_short_and_fail",)),
    Named("data-prepare lock removed", "archifactory/data/prepare.py",
          '    with file_lock(folder.parent / f"{folder.name}.lock"):', "    if True:",
          ("tests/data/test_cache_lock.py",)),
    Named("verify_cache=false ignored", "archifactory/data/prepare.py",
          "check_cache(folder, key, tok, cfg.verify_cache)", "check_cache(folder, key, tok, True)",
          ("tests/data/test_cache_lock.py",)),
)  # fmt: skip


def run_named(scratch: Path) -> int:
    """Apply each named mutation to a scratch copy, run its tests there, report KILLED or SURVIVED."""
    if scratch.exists():
        shutil.rmtree(scratch)
    for folder in ("archifactory", "configs", "tests"):
        shutil.copytree(ROOT / folder, scratch / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", scratch / "pyproject.toml")
    env = os.environ | {"PYTHONPATH": str(scratch), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    survived = 0
    for mutation in NAMED:
        path = scratch / mutation.file
        source = path.read_text()
        if source.count(mutation.old) != 1:
            print(f"[MISSING ] {mutation.what}: the target text is not in {mutation.file} exactly once")
            survived += 1
            continue
        path.write_text(source.replace(mutation.old, mutation.new))
        try:
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests],
                cwd=scratch, env=env, capture_output=True, text=True, check=False,
            )  # fmt: skip
        finally:
            path.write_text(source)
        killed = result.returncode != 0
        survived += not killed
        last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-200:]
        print(f"[{'KILLED' if killed else 'SURVIVED':<8}] {mutation.what}: {last}")
    print(f"named mutations: {len(NAMED) - survived}/{len(NAMED)} killed")
    return 1 if survived else 0


def prepare_workdir(name: str, target: Target, workdir: Path) -> None:
    """Copy the package, configs and tests into `workdir` with a `[tool.mutmut]` for this target."""
    workdir.mkdir(parents=True, exist_ok=True)
    for folder in ("archifactory", "configs", "tests"):
        dest = workdir / folder
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(ROOT / folder, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    base = (ROOT / "pyproject.toml").read_text()
    config = "\n".join(
        [
            "",
            "[tool.mutmut]",
            'source_paths = ["archifactory/"]',
            f"only_mutate = {json.dumps(list(target.modules))}",
            f"pytest_add_cli_args_test_selection = {json.dumps(list(target.tests))}",
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-x", "-q"]',
            'also_copy = ["configs/"]',
            # torch is not fork-safe after it has run a test: fork each mutant from a clean server
            'process_isolation = "forkserver"',
            # mutmut caps each mutant's CPU time at 15 x its tests' clean time + this constant; on a busy
            # shared box 1 s (the default) turns slow-but-finished runs into false timeouts
            "timeout_constant = 20.0",
            "use_git_change_detection = false",
            "",
        ]
    )
    (workdir / "pyproject.toml").write_text(base + config)


def summarize(workdir: Path) -> dict[str, object]:
    """Per-status counts (mutmut's own exit-code mapping) and the surviving mutants, from its meta files."""
    from mutmut.stats import status_by_exit_code

    counts: dict[str, int] = {}
    survivors: list[str] = []
    for meta in sorted((workdir / "mutants").rglob("*.meta")):
        data = json.loads(meta.read_text())
        for key, code in data.get("exit_code_by_key", {}).items():
            status = status_by_exit_code[code]
            counts[status] = counts.get(status, 0) + 1
            if status == "survived":
                survivors.append(key)
    tested = counts.get("killed", 0) + counts.get("survived", 0)
    score = counts.get("killed", 0) / tested if tested else 0.0
    return {"counts": counts, "score": score, "survivors": survivors}


def run_target(name: str, workdir: Path, max_children: int) -> dict[str, object]:
    target = TARGETS[name]
    prepare_workdir(name, target, workdir)
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
    }
    env.pop("PYTHONPATH", None)  # mutmut puts its mutants/ copy first; nothing may shadow it
    mutmut = shutil.which("mutmut") or str(Path(sys.executable).with_name("mutmut"))
    subprocess.run([mutmut, "run", "--max-children", str(max_children)], cwd=workdir, env=env, check=False)
    result = summarize(workdir)
    (workdir / "summary.json").write_text(json.dumps(result, indent=1))
    counts = result["counts"]
    print(
        f"{name}: score {result['score']:.1%} (killed {counts.get('killed', 0)}, survived "
        f"{counts.get('survived', 0)}, no tests {counts.get('no tests', 0)}, timeout "
        f"{counts.get('timeout', 0)}); survivors: {workdir / 'summary.json'} and `mutmut show <name>` "
        f"in {workdir}"
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target", nargs="?", choices=[*TARGETS, "all", "named"])
    parser.add_argument("--list", action="store_true", help="print the targets and exit")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested in parallel")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "archifactory-mutation")
    args = parser.parse_args()
    if args.list or args.target is None:
        for name, target in TARGETS.items():
            print(f"{name:<11} {', '.join(target.modules)}\n{'':<11} tests: {' '.join(target.tests)}")
            print(f"{'':<11} {target.why}")
        return 0
    if args.target == "named":
        return run_named(args.workdir / "named")
    names = list(TARGETS) if args.target == "all" else [args.target]
    for name in names:
        run_target(name, args.workdir / name, args.max_children)
    return 0


if __name__ == "__main__":
    sys.exit(main())
