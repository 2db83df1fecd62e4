"""One run at a time per model registry, whichever host it runs on: a Prefect global concurrency limit
of 1 named after the tracking URI, held through a lease that the run renews while it lives.

A killed run's lease ends when the server sees it expire (a minute at most). The next run of the same
project does not wait that long: the lease id is recorded in the project, and a run that holds the
project's lock knows the run that wrote the record is dead, so it releases that lease first.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client

LEASE_S = 60.0  # the shortest lease a Prefect server grants
RENEW_EVERY_S = LEASE_S / 4  # three renewals may fail before the lease is lost

logger = logging.getLogger(__name__)


def limit_name(tracking_uri: str) -> str:
    return f"genpipe-registry-{hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]}"


@contextmanager
def registry_turn(tracking_uri: str, wait_s: float, lease_record: Path | None = None) -> Iterator[None]:
    """Hold the registry's turn for the block.

    `lease_record`: a file of the caller's project; pass it only while holding the project's lock.
    Raises TimeoutError when another run keeps the turn for longer than `wait_s` seconds.
    """
    name = limit_name(tracking_uri)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        if lease_record is not None and lease_record.is_file():
            client.release_concurrency_slots_with_lease(UUID(lease_record.read_text().strip()))
            lease_record.unlink()
        lease_id = _take(client, name, wait_s)
    if lease_record is not None:
        lease_record.parent.mkdir(parents=True, exist_ok=True)
        lease_record.write_text(str(lease_id))
    stop = threading.Event()
    # The thread runs in a copy of this context: Prefect's settings (its API URL among them) may be
    # context-local, and a thread without them would renew against another (ephemeral) server.
    renewer = threading.Thread(
        target=contextvars.copy_context().run,
        args=(_renew, lease_id, stop),
        name=f"{name}-lease",
        daemon=True,
    )
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id)
        if lease_record is not None:
            lease_record.unlink(missing_ok=True)


def _take(client: SyncPrefectClient, name: str, wait_s: float) -> UUID:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            reply = client.increment_concurrency_slots_with_lease([name], 1, "concurrency", LEASE_S)
            return UUID(reply.json()["lease_id"])
        except httpx.HTTPStatusError as err:
            if err.response.status_code != httpx.codes.LOCKED:
                raise
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                raise TimeoutError(f"the registry's turn ({name}) stayed taken for {wait_s:g} s") from err
            time.sleep(min(float(err.response.headers.get("Retry-After", 1)), left_s))


def _renew(lease_id: UUID, stop: threading.Event) -> None:
    with get_client(sync_client=True) as client:
        while not stop.wait(RENEW_EVERY_S):
            try:
                client.renew_concurrency_lease(lease_id, LEASE_S)
            except (httpx.HTTPError, OSError) as err:
                # The run goes on: a later renewal may get through before the lease runs out.
                logger.warning("could not renew the registry's turn (lease %s): %s", lease_id, err)
