"""The registry's turn on a real Prefect server: one holder at a time, a run that cannot get it is told
who holds it, and the lease is renewed on the server that granted it."""

from __future__ import annotations

import time

import pytest

import flows.registry_turn as registry_turn_module
from flows.journal import Holder
from flows.registry_turn import LEASE_S, RegistryBusy, limit_name, registry_turn

pytestmark = pytest.mark.integration

URI = "sqlite:///registry-turn-test.db"


def test_a_second_holder_is_told_who_holds_the_turn_then_gets_it_once_it_is_free(prefect_server, tmp_path):
    uri = f"{URI}-{tmp_path.name}"
    first, second = Holder.this_process("first-flow-run"), Holder.this_process("second-flow-run")
    with (
        registry_turn(uri, wait_s=0, holder=first),
        pytest.raises(RegistryBusy) as busy,
        registry_turn(uri, wait_s=1, holder=second),
    ):
        pass
    assert busy.value.holder == first
    assert f"stayed taken for 1 s by {first}" in str(busy.value)
    assert f"pid {first.pid}" in str(first) and first.since in str(first)
    with registry_turn(uri, wait_s=0, holder=second):
        pass


def test_with_temporary_servers_a_dead_runs_turn_comes_back_after_the_lease_duration(tmp_path):
    """The default set-up: no Prefect server configured, so each run starts a temporary one on the
    database in PREFECT_HOME, and none of them runs Prefect's repossessor of expired leases."""
    from prefect.client.orchestration import get_client
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    uri = f"{URI}-{tmp_path.name}"
    temporary_server = {
        PREFECT_HOME: str(tmp_path / "prefect-home"),
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 300,  # a busy test machine starts it slowly
    }
    with temporary_settings(updates=temporary_server, restore_defaults={PREFECT_API_URL}):
        # A run of another project, killed while it held the turn.
        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(limit_name(uri), limit=1)
            client.increment_concurrency_slots_with_lease([limit_name(uri)], 1, "concurrency", LEASE_S)
        granted = time.monotonic()
        with registry_turn(uri, wait_s=LEASE_S * 3, holder=Holder.this_process("next-run")):
            waited_s = time.monotonic() - granted
    assert LEASE_S - 5 < waited_s < LEASE_S * 2


def test_the_lease_is_renewed_on_the_server_that_granted_it(prefect_server, tmp_path, monkeypatch, caplog):
    """The server's URL is a context-local setting here, as in any `temporary_settings` block."""
    from prefect.client.orchestration import SyncPrefectClient

    renewed_at = []
    renew = SyncPrefectClient.renew_concurrency_lease

    def recording_renew(client, lease_id, lease_duration):
        renewed_at.append(str(client.api_url).rstrip("/"))
        return renew(client, lease_id, lease_duration)

    monkeypatch.setattr(SyncPrefectClient, "renew_concurrency_lease", recording_renew)
    monkeypatch.setattr(registry_turn_module, "RENEW_EVERY_S", 0.2)
    with registry_turn(f"{URI}-{tmp_path.name}", wait_s=0, holder=Holder.this_process("renewing")):
        time.sleep(1.5)
    assert renewed_at and set(renewed_at) == {prefect_server}
    assert "could not renew" not in caplog.text
