"""One run at a time per model registry, whichever host it runs on: a Prefect global concurrency limit
of 1 named after the tracking URI, held through a lease that the run renews while it lives.

Prefect's `prefect.concurrency.sync.concurrency(..., lease_duration=...)` would do the same, but it
does not tell its caller the lease id, and the run journal needs it: the next run of the same project
proves the holder dead and releases that lease at once instead of waiting for it to expire.

Where the lease lives decides whether a killed run's turn comes back. With no Prefect server
configured, every run starts a temporary server that shares the database in PREFECT_HOME (where the
slot is counted) but, by default, keeps leases in its own memory: the slot of a killed run would then
stay taken for good, since no later server knows its lease. So the servers genpipe starts keep leases
in files under PREFECT_HOME, and as temporary servers run no repossessor, a run waiting for the turn
reclaims leases that have expired there itself. A shared `prefect server start` reclaims them on its
own (start it with the same lease storage to keep leases across restarts of the server).
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.settings import PREFECT_API_URL
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.variables import Variable

from flows.journal import Holder

LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
# Read by the temporary Prefect server when a run starts one; a user's own setting wins.
os.environ.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)

LEASE_S = 60.0  # the shortest lease a Prefect server grants
RENEW_EVERY_S = LEASE_S / 4  # three renewals may fail before the lease is lost

logger = logging.getLogger(__name__)


class RegistryBusy(TimeoutError):
    """Another run kept the registry's turn for longer than this run would wait."""

    def __init__(self, message: str, holder: Holder | None):
        super().__init__(message)
        self.holder = holder


def limit_name(tracking_uri: str) -> str:
    return f"genpipe-registry-{hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]}"


def _announced_holder(name: str) -> Holder | None:
    announced = Variable.get(name)
    return Holder(**announced) if isinstance(announced, dict) else None


@contextmanager
def registry_turn(tracking_uri: str, wait_s: float, holder: Holder) -> Iterator[UUID]:
    """Hold the registry's turn for the block; yields the lease id.

    Raises RegistryBusy when another run keeps the turn for longer than `wait_s` seconds.
    """
    name = limit_name(tracking_uri)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit=1)
        lease_id = _take(client, name, wait_s, holder)
    Variable.set(name, _announcement(holder), overwrite=True)
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
        yield lease_id
    finally:
        stop.set()
        renewer.join()
        Variable.unset(name)
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id)


def _announcement(holder: Holder) -> dict[str, str | int | float]:
    return {key: getattr(holder, key) for key in Holder.__dataclass_fields__}


def _lease_holder(holder: Holder) -> ConcurrencyLeaseHolder | None:
    try:
        return ConcurrencyLeaseHolder(type="flow_run", id=UUID(holder.flow_run))
    except ValueError:  # called outside a flow run
        return None


def _take(client: SyncPrefectClient, name: str, wait_s: float, holder: Holder) -> UUID:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            reply = client.increment_concurrency_slots_with_lease(
                [name], 1, "concurrency", LEASE_S, holder=_lease_holder(holder)
            )
            return UUID(reply.json()["lease_id"])
        except httpx.HTTPStatusError as err:
            if err.response.status_code != httpx.codes.LOCKED:
                raise
            if _reclaim_expired_leases(client):
                continue
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                current = _announced_holder(name)
                raise RegistryBusy(
                    f"the registry's turn ({name}) stayed taken for {wait_s:g} s "
                    f"by {current or 'a run that did not say who it is'}",
                    current,
                ) from err
            time.sleep(min(float(err.response.headers.get("Retry-After", 1)), left_s))


def _reclaim_expired_leases(client: SyncPrefectClient) -> bool:
    """What a server's repossessor does, for the temporary servers that run none; True if any."""
    if PREFECT_API_URL.value() or os.environ["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] != LEASE_STORAGE:
        return False  # a configured server, or leases genpipe cannot see
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

    storage = ConcurrencyLeaseStorage()
    reclaimed = False
    for lease_id in run_coro_as_sync(storage.read_expired_lease_ids()):
        lease = run_coro_as_sync(storage.read_lease(lease_id))
        if lease is not None and lease.expiration < datetime.now(UTC):
            logger.warning(
                "reclaiming the expired registry lease %s of a run that stopped renewing", lease_id
            )
            client.release_concurrency_slots_with_lease(lease_id)
            reclaimed = True
    return reclaimed


def _renew(lease_id: UUID, stop: threading.Event) -> None:
    with get_client(sync_client=True) as client:
        while not stop.wait(RENEW_EVERY_S):
            try:
                client.renew_concurrency_lease(lease_id, LEASE_S)
            except (httpx.HTTPError, OSError) as err:
                # The run goes on: a later renewal may get through before the lease runs out.
                logger.warning("could not renew the registry's turn (lease %s): %s", lease_id, err)
