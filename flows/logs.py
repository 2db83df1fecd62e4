"""Where a run's detailed logs go, and the notices of the tools genpipe drives that nobody needs to see.

`genpipe run` writes Prefect's log records (and every library's warnings) to a file under the project
and keeps the terminal for its own progress display; `-v` sends them to the terminal as well.
"""

from __future__ import annotations

import datetime as dt
import logging
import sys
import warnings
from pathlib import Path
from typing import TextIO

LOG_DIR = "outputs/logs"

# Each pattern is the start of one notice, matched exactly: a blanket filter would hide real problems.
IGNORED_WARNINGS = (
    # MLflow guesses a dataset's source type from its path; genpipe's local data paths match two kinds.
    r"The specified dataset source can be interpreted in multiple ways",
    # torchmetrics' KID keeps its features; genpipe feeds it a bounded `evaluate.num_samples`.
    r"Metric `Kernel Inception Distance` will save all extracted features in buffer",
)
IGNORED_LOG_RECORDS = {
    # A local Ray instance started for one run listens on this machine only.
    "ray._private.authentication.authentication_token_setup": (
        "Token authentication is disabled for this Ray cluster",
        "Token authentication is enabled for this Ray cluster",
    ),
}


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_tool_notices() -> None:
    """Drop the warnings and log records of MLflow and Ray that do not concern a genpipe user."""
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name, prefixes in IGNORED_LOG_RECORDS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))


def new_log_file(project_dir: Path) -> Path:
    """`<project>/outputs/logs/run-<UTC time>.log`, its folder created."""
    directory = Path(project_dir) / LOG_DIR
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"run-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}.log"


def _prints_to_terminal(handler: logging.Handler) -> bool:
    terminal = (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
    return getattr(handler, "stream", None) in terminal


def route_logs(log_file: Path, terminal: bool) -> TextIO:
    """Send the log records that Prefect, MLflow and Ray print, and Python warnings, to `log_file`
    (and still to the terminal when `terminal`); the open file is returned for stray prints.

    Call after those libraries configured their loggers (importing the flow module does)."""
    stream = open(log_file, "a", encoding="utf-8", buffering=1)
    file_handler = logging.StreamHandler(stream)
    file_handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s - %(message)s", "%H:%M:%S")
    )
    loggers = [logging.getLogger(), *map(logging.getLogger, list(logging.root.manager.loggerDict))]
    for logger in loggers:
        printing = [h for h in logger.handlers if _prints_to_terminal(h)]
        if not printing:
            continue
        logger.addHandler(file_handler)
        if not terminal:
            for handler in printing:
                logger.removeHandler(handler)
    logging.captureWarnings(True)  # "py.warnings" records reach the root logger's handlers, the file
    return stream
