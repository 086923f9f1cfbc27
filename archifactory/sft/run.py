"""Supervised fine-tuning: `archifactory sft init_from=<pretrained run> dataset=chat_jsonl|limo|dolphin_r1`.

The same Hydra app as `train` (so trainer overrides, `-m` sweeps and `--cfg job` work), with three
differences: the architecture (`model`, `mixin`, `ffn`, `positional`) is the pretrained run's — an
override of any of them is refused with one line —, the trainer preset defaults to `trainer=sft`, and the
run directory is `outputs/<pretrained run name>-sft-<dataset name>-<dataset digest>`. The loop then starts from the
pretrained weights (`train/init_from.py`) on chat data (`data/chat/`); everything else — summary, metrics,
checkpoints, resume with `trainer.resume=true` — is the run-directory contract of `train`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from archifactory.core.errors import ArchiFactoryError
from archifactory.runs.load import load_run_config, resolve_run
from archifactory.train.loop import train

ARCHITECTURE = ("model", "mixin", "ffn", "positional")
USAGE = (
    "usage: archifactory sft init_from=<pretrained run dir> dataset=chat_jsonl|limo|dolphin_r1 [key=value …]"
)


def _key(arg: str) -> str:
    return arg.partition("=")[0].lstrip("+~")


def sft_arguments(args: list[str]) -> tuple[Path, list[str]]:
    """The pretrained run directory and the Hydra arguments for the SFT run."""
    init_from = [arg.partition("=")[2] for arg in args if _key(arg) == "init_from"]
    if len(init_from) != 1 or not init_from[0]:
        raise ArchiFactoryError(f"sft needs exactly one init_from=<pretrained run dir>; {USAGE}")
    for arg in args:
        if "=" in arg and _key(arg).split(".")[0] in ARCHITECTURE:
            raise ArchiFactoryError(
                f"sft takes the architecture from the pretrained run; drop {arg!r} (or pretrain that variant)"
            )
    if not any(_key(arg) == "dataset" for arg in args):
        raise ArchiFactoryError(f"sft needs dataset=chat_jsonl|limo|dolphin_r1; {USAGE}")
    pretrained = resolve_run(init_from[0]).resolve()
    name = str(load_run_config(pretrained).get("run_name") or pretrained.name)
    hydra_args = [arg for arg in args if _key(arg) != "init_from"]
    hydra_args += [
        f"init_from={pretrained}",
        f"run_name='{name}-sft-${{dataset.name}}-${{dataset_digest:${{dataset}}}}'",  # a second corpus: a new run
    ]
    if not any(_key(arg) == "trainer" for arg in args):
        hydra_args.append("trainer=sft")
    return pretrained, hydra_args


def with_pretrained_architecture(cfg: DictConfig, pretrained: Path) -> DictConfig:
    """`cfg` with model/mixin/ffn/positional replaced by the pretrained run's (vocabulary from the data)."""
    source = load_run_config(pretrained)
    with open_dict(cfg):
        for group in ARCHITECTURE:  # the typed `model` node is merged into, the component groups replaced
            cfg[group] = OmegaConf.merge(cfg[group], source[group]) if group == "model" else source[group]
        cfg.model.vocab_size = None  # the chat tokenizer's size: pretrained vocabulary + template tokens
    return cfg


def sft(cfg: DictConfig, pretrained: Path, run_dir: Path, overrides: list[str]) -> dict:
    """Fine-tune the pretrained run on `cfg.dataset` (chat data) into `run_dir`; returns the summary."""
    if cfg.dataset.get("source") != "chat":
        raise ArchiFactoryError(
            f"dataset={cfg.dataset.name} is not chat data; sft takes dataset=chat_jsonl|limo|dolphin_r1"
        )
    return train(with_pretrained_architecture(cfg, pretrained), run_dir, overrides)
