"""Find a run directory and load its trained model and tokenizer: what `generate`, `eval` and `sft` reuse.

    from archifactory.runs import load_run, resolve_run
    run = load_run(resolve_run(None))        # the most recent completed run under outputs/
    run.model, run.tokenizer, run.config, run.step, run.name, run.params

A run directory (`runs/layout.py`) holds `.hydra/config.yaml` (the composed config), `summary.json`
(`status`), `checkpoints/step_NNNNNNN/` and `tokenizer/` (a copy of the tokenizer the run trained with,
written when training starts, so a run stays loadable after its token cache is deleted). Loading uses
only the newest finished checkpoint's `model.safetensors`, checked against its sha256 in
`trainer_state.json`; anything missing or damaged is refused with one line (`ArchiFactoryError`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from archifactory.core.errors import ArchiFactoryError
from archifactory.core.files import share_as_umask_allows
from archifactory.data.dataset import as_dataset_config
from archifactory.data.prepare import cache_root, tokenizer_folder
from archifactory.data.sources import make_source
from archifactory.data.tokenizer import Tokenizer, load_tokenizer, transformers_tokenizer
from archifactory.model.build import build_model
from archifactory.runs import layout
from archifactory.runs.checkpoints import load_checkpoint_weights, pick_checkpoint
from archifactory.runs.records import read_summary

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from archifactory.model.stack import StackedMixinForCausalLM

log = logging.getLogger(__name__)

OUTPUTS_DIR = layout.OUTPUTS_DIR
CONFIG = f"{layout.HYDRA_DIR}/{layout.CONFIG_FILE}"  # for messages


@dataclass
class LoadedRun:
    """A trained model ready for inference, with everything needed to use and describe it."""

    run_dir: Path
    name: str  # the run's `run_name` (the directory name when the config has none)
    model: StackedMixinForCausalLM  # in eval mode, on the requested device, fp32
    tokenizer: Tokenizer | None  # the data pipeline's tokenizer (None for a synthetic probe: token ids only)
    config: DictConfig  # the run's composed config, interpolations resolved
    step: int  # optimizer steps of the checkpoint that was loaded
    checkpoint: Path
    params: dict[str, int]  # `model.parameter_breakdown()`
    summary: dict[str, Any] = field(default_factory=dict)  # summary.json ({} when absent)

    def hf_tokenizer(self) -> PreTrainedTokenizerFast:
        """The same tokenizer as a `transformers.PreTrainedTokenizerFast` (for lm-eval's HFLM, pipelines)."""
        return transformers_tokenizer(self.tokenizer)


def completed_runs(outputs_dir: Path | str = OUTPUTS_DIR) -> list[Path]:
    """Every run directory under `outputs_dir` (at any depth) whose summary says `completed`, oldest first.

    Order is the time summary.json was last written, which for a completed run is when it finished.
    """
    root = Path(outputs_dir)
    runs: list[tuple[float, Path]] = []
    for summary_path in root.rglob(layout.SUMMARY) if root.is_dir() else []:
        summary = read_summary(summary_path.parent)
        if summary is not None and summary.get("status") == "completed":
            runs.append((summary_path.stat().st_mtime, summary_path.parent))
    return [path for _, path in sorted(runs)]


def latest_completed_run(outputs_dir: Path | str = OUTPUTS_DIR) -> Path:
    """The most recently finished run under `outputs_dir`; a one-line error when there is none."""
    runs = completed_runs(outputs_dir)
    if not runs:
        raise ArchiFactoryError(
            f"no completed run under {outputs_dir}/; train one first (archifactory train …) or pass run=<run dir>"
        )
    return runs[-1]


def resolve_run(run: str | Path | None, outputs_dir: Path | str = OUTPUTS_DIR) -> Path:
    """`run=` as the user gave it: a run directory, a run name under `outputs_dir`, or None for the latest."""
    if run is None or str(run) == "":
        return latest_completed_run(outputs_dir)
    for candidate in (Path(run).expanduser(), Path(outputs_dir) / str(run)):
        if layout.config_path(candidate).is_file():
            return candidate
    raise ArchiFactoryError(
        f"run={run} is not a run directory (no {CONFIG} there or under {outputs_dir}/); "
        "pass the folder a training run wrote, e.g. run=outputs/<run_name>"
    )


def load_run_config(run_dir: Path) -> DictConfig:
    """The run's composed config with every interpolation resolved."""
    path = layout.config_path(run_dir)
    try:
        cfg = OmegaConf.load(path)
        OmegaConf.resolve(cfg)
    except FileNotFoundError as error:
        raise ArchiFactoryError(f"{run_dir} is not a run directory (no {CONFIG})") from error
    except (OSError, ValueError, YAMLError, OmegaConfBaseException) as error:
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ArchiFactoryError(f"{path} is unreadable ({first})") from error
    if not isinstance(cfg, DictConfig) or not all(k in cfg for k in ("model", "mixin", "ffn", "positional")):
        raise ArchiFactoryError(f"{path} is not an ArchiFactory run config (no model/mixin/ffn/positional)")
    return cfg


def save_run_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> None:
    """Copy the tokenizer folder into `<run_dir>/tokenizer/` (atomically; kept when it already matches)."""
    target = Path(run_dir) / layout.TOKENIZER
    has_copy = (target / "tokenizer.json").is_file() and (target / "meta.json").is_file()
    if has_copy and load_tokenizer(target).hash == tokenizer.hash:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-tokenizer-", dir=target.parent))
    for name in ("tokenizer.json", "meta.json"):
        shutil.copy2(Path(tokenizer.path) / name, tmp / name)
    share_as_umask_allows(tmp)  # mkdtemp makes it 0700
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def load_run_tokenizer(run_dir: Path, cfg: DictConfig) -> Tokenizer:
    """`<run_dir>/tokenizer/`; for a run trained before that copy existed, the dataset's cached tokenizer."""
    own = Path(run_dir) / layout.TOKENIZER
    if own.is_dir():
        return load_tokenizer(own)
    dataset = as_dataset_config(cfg.dataset)
    folder = tokenizer_folder(dataset, make_source(dataset), cache_root(dataset))
    if not (folder / "tokenizer.json").is_file():
        raise ArchiFactoryError(
            f"run {run_dir} has no tokenizer/ folder and its dataset's tokenizer is not cached at {folder}; "
            f"run `archifactory data prepare dataset={dataset.name}` with the run's dataset settings"
        )
    return load_tokenizer(folder)


def load_run(run_dir: Path | str, device: str | torch.device = "cpu", step: int | None = None) -> LoadedRun:
    """The model of `run_dir`'s newest finished checkpoint (or the one at `step`), in eval mode."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    checkpoint = pick_checkpoint(run_dir, step)
    weights, ckpt_step = load_checkpoint_weights(checkpoint)
    probe = cfg.dataset.get("source") == "synthetic"  # MQAR/MAD runs: ids without text, no tokenizer
    tokenizer = None if probe else load_run_tokenizer(run_dir, cfg)
    model = build_model(cfg, int(cfg.dataset.vocab_size) if probe else tokenizer.vocab_size)
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    theirs = {name: list(t.shape) for name, t in weights.items()}
    if ours != theirs:
        differ = sorted(set(ours) ^ set(theirs)) or [n for n in ours if ours[n] != theirs[n]]
        raise ArchiFactoryError(
            f"checkpoint {checkpoint} does not match the run's config (differs at {', '.join(differ[:3])})"
        )
    model.load_state_dict(weights)
    model.to(device).eval()
    return LoadedRun(
        run_dir=run_dir,
        name=str(cfg.get("run_name") or run_dir.name),
        model=model,
        tokenizer=tokenizer,
        config=cfg,
        step=ckpt_step,
        checkpoint=checkpoint,
        params=model.parameter_breakdown(),
        summary=read_summary(run_dir) or {},
    )
