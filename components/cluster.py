"""What genpipe's trainings and evaluations on Ray share: the GPUs they ask for, and the channel their
progress takes from a Ray worker back to the process that shows it."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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
    """Holds the latest progress record of each training or evaluation (by feed) until the driver
    takes it. One per driver and cluster: an actor is a process of its own, about 1 s of CPU to start,
    which a 14-family run would otherwise pay twice per model."""

    def __init__(self) -> None:
        self.latest: dict[int, dict[str, Any]] = {}

    def post(self, feed: int, update: dict[str, Any]) -> None:
        self.latest[feed] = update

    def take(self, feed: int) -> dict[str, Any] | None:
        return self.latest.pop(feed, None)

    def received(self) -> None:
        """Answers once every post its caller sent before has been applied: an actor runs the calls
        of one caller in the order they were sent."""


@dataclass(frozen=True)
class ProgressPoster:
    """What a Ray worker holds to post one feed's progress (picklable)."""

    inbox: ray.actor.ActorHandle
    feed: int

    def post(self, update: dict[str, Any]) -> None:
        self.inbox.post.remote(self.feed, update)  # not awaited: the worker never waits for it

    def flush(self) -> None:
        """Wait until this worker's posts have landed; called as its work ends, so the driver's last
        take finds the last post, and none lands after it to stay in the inbox for the driver's life."""
        # An inbox that ended with its driver leaves nobody to hear the posts; raising here, in the
        # worker's `finally`, would put Ray's error in place of the work's own.
        with contextlib.suppress(ray.exceptions.RayActorError):
            ray.get(self.inbox.received.remote())


_feeds = itertools.count()
# The driver's handle keeps its inbox alive (Ray ends an actor when its creator's handles are gone).
# Keyed by the node the driver is connected through and its job: a new cluster gets a new inbox.
_inboxes: dict[tuple[str, str], ray.actor.ActorHandle] = {}
_inboxes_lock = threading.Lock()


def _driver_inbox() -> ray.actor.ActorHandle:
    """This driver's inbox on the connected cluster, started by its first feed; it ends with the driver."""
    context = ray.get_runtime_context()
    key = (context.get_node_id(), context.get_job_id())
    with _inboxes_lock:
        if key not in _inboxes:
            _inboxes[key] = ProgressInbox.remote()
        return _inboxes[key]


@contextmanager
def progress_feed(
    on_progress: Callable[[Update], None] | None, kind: Callable[..., Update]
) -> Iterator[ProgressPoster | None]:
    """A poster for a Ray worker to post `asdict(update)` with; a thread rebuilds each latest post as
    `kind(**post)` for `on_progress`. None (no poster) when nobody listens."""
    if on_progress is None:
        yield None
        return
    poster = ProgressPoster(_driver_inbox(), next(_feeds))
    done = threading.Event()

    def forward() -> None:
        while True:
            update = ray.get(poster.inbox.take.remote(poster.feed))
            if update is not None:
                on_progress(kind(**update))
            if done.wait(PROGRESS_POLL_S):
                return

    poller = threading.Thread(target=forward, name="ray-progress", daemon=True)
    poller.start()
    try:
        yield poster
    finally:
        done.set()
        poller.join()
        final = ray.get(poster.inbox.take.remote(poster.feed))  # posted after the poller's last look
        if final is not None:
            on_progress(kind(**final))
