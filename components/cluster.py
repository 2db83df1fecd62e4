"""What genpipe's trainings and evaluations on Ray share: the GPUs they ask for, and the channel their
progress takes from a Ray worker back to the process that shows it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import ray

PROGRESS_POLL_S = 0.5  # how often the driver reads the latest progress of a training or evaluation

Update = TypeVar("Update")


def gpus_to_use(setting: float | str) -> float:
    """GPUs per worker or task for a params setting: a number (fractions allowed), or "auto": one when
    the connected cluster has a GPU, else none."""
    if setting == "auto":
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    gpus = float(setting)
    if gpus < 0:
        raise ValueError(f"GPUs per worker or task must be >= 0 or 'auto', got {setting!r}")
    return gpus


@ray.remote(num_cpus=0)
class ProgressInbox:
    """Holds the latest progress record of one training or evaluation until the driver takes it."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] | None = None

    def post(self, update: dict[str, Any]) -> None:
        self.latest = update

    def take(self) -> dict[str, Any] | None:
        update, self.latest = self.latest, None
        return update


@contextmanager
def progress_feed(
    on_progress: Callable[[Update], None] | None, kind: Callable[..., Update]
) -> Iterator[ray.actor.ActorHandle | None]:
    """An inbox for a Ray worker to post `asdict(update)` to; a thread rebuilds each latest post as
    `kind(**post)` for `on_progress`. None (no inbox) when nobody listens."""
    if on_progress is None:
        yield None
        return
    inbox = ProgressInbox.remote()
    done = threading.Event()

    def forward() -> None:
        while True:
            update = ray.get(inbox.take.remote())
            if update is not None:
                on_progress(kind(**update))
            if done.wait(PROGRESS_POLL_S):
                return

    poller = threading.Thread(target=forward, name="ray-progress", daemon=True)
    poller.start()
    try:
        yield inbox
    finally:
        done.set()
        poller.join()
        final = ray.get(inbox.take.remote())  # posted after the poller's last look
        if final is not None:
            on_progress(kind(**final))
        ray.kill(inbox)
