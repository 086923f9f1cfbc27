"""The run's log file: every log record of a command that uses a run also goes to `<run>/archifactory.log`.

It is attached by the command (not by Hydra) only once the command has decided to use the run directory,
so a refused command leaves the directory byte-identical; the CLI's error guard appends an unexpected
error's traceback to it (`log_file()`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from archifactory.runs import layout

LOG_NAME = layout.LOG
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's console format


class QuietFileHandler(logging.FileHandler):
    """A log file that stays silent when the disk refuses a write (full disk), instead of printing
    logging's own `--- Logging error ---` traceback on every record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        self.failed = True


_handler: QuietFileHandler | None = None


def attach_log_file(path: Path) -> Path:
    """Send every log record (root logger) to `path` as well, appending; replaces an earlier one."""
    global _handler
    detach_log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = QuietFileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)
    _handler = handler
    return path


def detach_log_file() -> None:
    global _handler
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler.close()
        _handler = None


def log_file() -> Path | None:
    return Path(_handler.baseFilename) if _handler is not None else None
