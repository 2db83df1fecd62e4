"""The registry's turn on a real Prefect server: one holder at a time, and a dead run's lease does not
hold up the next run of its project."""

from __future__ import annotations

import time

import pytest

import flows.registry_turn as registry_turn_module
from flows.registry_turn import LEASE_S, limit_name, registry_turn

pytestmark = pytest.mark.integration

URI = "sqlite:///registry-turn-test.db"


def lease_of_a_dead_run(uri: str) -> str:
    """What a killed run leaves behind: a granted lease that nobody releases or renews."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(limit_name(uri), limit=1)
        reply = client.increment_concurrency_slots_with_lease([limit_name(uri)], 1, "concurrency", LEASE_S)
    return reply.json()["lease_id"]


def test_a_second_holder_times_out_then_gets_the_turn_once_it_is_free(prefect_server, tmp_path):
    uri = f"{URI}-{tmp_path.name}"
    with (
        registry_turn(uri, wait_s=0),
        pytest.raises(TimeoutError, match="stayed taken for 1 s"),
        registry_turn(uri, wait_s=1),
    ):
        pass
    with registry_turn(uri, wait_s=0):
        pass


def test_the_next_run_of_a_project_releases_the_lease_its_dead_run_recorded(prefect_server, tmp_path):
    uri = f"{URI}-{tmp_path.name}"
    record = tmp_path / "outputs" / "registry-turn.lease"
    record.parent.mkdir()
    dead = lease_of_a_dead_run(uri)
    record.write_text(dead)
    with pytest.raises(TimeoutError), registry_turn(uri, wait_s=0):
        pass  # another project's run, knowing nothing of the record, has to wait for the lease
    with registry_turn(uri, wait_s=0, lease_record=record):
        assert record.read_text() not in ("", dead)  # this run's own lease, for the run after it
    assert not record.exists()


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
    with registry_turn(f"{URI}-{tmp_path.name}", wait_s=0):
        time.sleep(1.5)
    assert renewed_at and set(renewed_at) == {prefect_server}
    assert "could not renew" not in caplog.text
