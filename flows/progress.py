"""What `genpipe run` shows while it works: each model's stage, and a progress bar while it trains
and while it is evaluated.

The flow's tasks post stage changes, training and evaluation progress to `feed`; the command line listens with
`LiveProgress` (a terminal: one row per model, a bar while it trains) or `PlainProgress` (logs and
CI: one line per stage change of a model). The feed is process-wide because the flow's tasks run in
threads of the process that called the flow.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from components.evaluation.evaluate import EvaluationProgress
    from components.training.trainer import TrainProgress

STAGES = ("queued", "training", "evaluating", "registering", "done", "failed", "skipped")
STAGE_STYLES = {"done": "green", "failed": "red", "skipped": "dim", "training": "cyan"}


class Listener(Protocol):
    def stage(self, model: str, stage: str, detail: str) -> None: ...

    def training(self, model: str, update: TrainProgress) -> None: ...

    def evaluation(self, model: str, update: EvaluationProgress) -> None: ...


class ProgressFeed:
    """Passes each model's stage changes and progress to the listeners of this process."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def stage(self, model: str, stage: str, detail: str = "") -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        for listener in list(self._listeners):
            listener.stage(model, stage, detail)

    def training(self, model: str, update: TrainProgress) -> None:
        for listener in list(self._listeners):
            listener.training(model, update)

    def evaluation(self, model: str, update: EvaluationProgress) -> None:
        for listener in list(self._listeners):
            listener.evaluation(model, update)

    @contextmanager
    def listening(self, listener: Listener) -> Iterator[Listener]:
        self._listeners.append(listener)
        try:
            yield listener
        finally:
            self._listeners.remove(listener)

    @contextmanager
    def logged_unless_watched(self, log: Callable[[str], None]) -> Iterator[None]:
        """Stage lines to `log` (a scheduled run's log) when no display of this process listens."""
        if self._listeners:
            yield
            return
        with self.listening(PlainProgress(log)):
            yield


feed = ProgressFeed()


def training_summary(update: TrainProgress) -> str:
    """`step 20/20, epoch 1/1, loss 0.1234, 5,210 images/s`."""
    loss = "" if update.loss is None else f", loss {update.loss:.4g}"
    return (
        f"step {update.step}/{update.total_steps}, epoch {update.epoch}/{update.epochs}{loss}, "
        f"{update.images_per_s:,.0f} images/s"
    )


def stage_line(model: str, stage: str, detail: str = "", when: dt.datetime | None = None) -> str:
    """One line of the plain form: the time, the model, its new stage and what about it."""
    when = when or dt.datetime.now()
    return f"{when:%H:%M:%S} {model:<10} {stage:<11} {detail}".rstrip()


def evaluation_summary(update: EvaluationProgress) -> str:
    """`batch 7/12, val: NLL`."""
    return f"batch {update.done}/{update.total}, {update.activity}"


class PlainProgress:
    """One line per stage change of a model; the line after training or evaluation says how far it got."""

    def __init__(self, write: Callable[[str], None]):
        self.write = write
        self._last: dict[str, str] = {}  # model -> how far its current stage got
        self._lock = threading.Lock()

    def stage(self, model: str, stage: str, detail: str) -> None:
        with self._lock:
            got = self._last.pop(model, None)
            if got is not None:
                detail = f"{detail} ({got})".lstrip()
            self.write(stage_line(model, stage, detail))

    def training(self, model: str, update: TrainProgress) -> None:
        with self._lock:
            self._last[model] = f"trained: {training_summary(update)}"

    def evaluation(self, model: str, update: EvaluationProgress) -> None:
        with self._lock:
            self._last[model] = f"evaluated: {evaluation_summary(update)}"


class LiveProgress:
    """A terminal display: one row per model with its stage, and a bar of its training steps."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            TextColumn("{task.fields[stage]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
            refresh_per_second=4,
            redirect_stderr=False,  # `genpipe run` sends stderr to the log file
        )
        self._tasks: dict[str, int] = {}

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def _task(self, model: str) -> int:
        if model not in self._tasks:
            self._tasks[model] = self.progress.add_task(model, total=None, stage="", info="")
        return self._tasks[model]

    def stage(self, model: str, stage: str, detail: str) -> None:
        style = STAGE_STYLES.get(stage, "yellow")
        fields = {"stage": f"[{style}]{stage:<11}[/{style}]"}
        if stage in ("done", "failed", "skipped"):
            fields["info"] = detail
        self.progress.update(self._task(model), **fields)

    def training(self, model: str, update: TrainProgress) -> None:
        loss = "" if update.loss is None else f"loss {update.loss:.4g}  "
        self.progress.update(
            self._task(model),
            total=update.total_steps,
            completed=update.step,
            info=f"epoch {update.epoch}/{update.epochs}  {loss}{update.images_per_s:,.0f} img/s",
        )

    def evaluation(self, model: str, update: EvaluationProgress) -> None:
        self.progress.update(
            self._task(model), total=update.total, completed=update.done, info=update.activity
        )
