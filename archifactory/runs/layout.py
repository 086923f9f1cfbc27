"""The run directory's file names: the one module that spells them (docs/architecture.md, "Run directory").

<run_dir>/
  .hydra/config.yaml     the composed, resolved config (what resume compares, what loading builds)
  .hydra/overrides.yaml  the command-line overrides (the report labels variants by them)
  summary.json           final figures and `status`; the `eval` section is `archifactory eval`'s
  metrics.jsonl          one JSON object per log / validation step
  checkpoints/step_NNNNNNN/  model.safetensors, optimizer.pt, rng.pt, trainer_state.json
                         (trainer.checkpoint_format=dcp: dcp/ — every rank's shards of model and optimizer,
                         torch.distributed.checkpoint's .metadata + *.distcp — plus extra.pt: schedule, RNG)
  tokenizer/             the run's copy of its tokenizer (tokenizer.json, meta.json)
  model/                 the final model in Hugging Face format
  model_deepseek_v3/     `archifactory export format=deepseek_v3`'s folder (when written without out=)
  eval/<task>.json       one file per evaluation
  archifactory.log       every log line of every command that used the run
  curves.png             loss (and probe accuracy) curves
  plan.md                the run's plan (size, FLOPs, memory per GPU, wall time), written when it starts
  .archifactory.lock     held by the command that owns the run (train, sft) for its lifetime
  .summary.lock          held for each read-modify-write of summary.json (train and eval interleave)
"""

from __future__ import annotations

from pathlib import Path

HYDRA_DIR = ".hydra"
CONFIG_FILE = "config.yaml"
OVERRIDES_FILE = "overrides.yaml"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
CHECKPOINT_PREFIX = "step_"
DCP_DIR = "dcp"  # a sharded checkpoint's torch.distributed.checkpoint folder
DCP_EXTRA = "extra.pt"  # a sharded checkpoint's LR schedule and RNG states (rank 0)
TRAINER_STATE = "trainer_state.json"
TOKENIZER = "tokenizer"
MODEL = "model"
MODEL_DEEPSEEK_V3 = "model_deepseek_v3"
EVAL_DIR = "eval"
LOG = "archifactory.log"
CURVES = "curves.png"
PLAN = "plan.md"
LOCK = ".archifactory.lock"
SUMMARY_LOCK = ".summary.lock"
TRACEBACK = "traceback.txt"
OUTPUTS_DIR = Path("outputs")


def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA_DIR / CONFIG_FILE


def overrides_path(run_dir: Path) -> Path:
    return Path(run_dir) / HYDRA_DIR / OVERRIDES_FILE


def summary_path(run_dir: Path) -> Path:
    return Path(run_dir) / SUMMARY


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


def plan_path(run_dir: Path) -> Path:
    return Path(run_dir) / PLAN


def log_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOG


def eval_dir(run_dir: Path) -> Path:
    return Path(run_dir) / EVAL_DIR
