"""The read-only commands' kept reads on a real SQLite MLflow store: kept after genpipe's own reads,
dropped by any other write, written once for a batch."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from components.registry import store


@pytest.fixture
def registry(tmp_path):
    """A store with two registered models of one version each, the second its champion."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    for name in ("shapes.ae", "shapes.gan"):
        client.create_registered_model(name)
        client.create_model_version(name, str(tmp_path / "weights"), tags={"family": name.split(".")[1]})
    client.set_registered_model_alias("shapes.gan", "champion", "1")
    return uri, client, tmp_path / "mlflow.db.genpipe-reads.json"


def unreachable():
    pytest.fail("read from MLflow although the store had not changed")


def test_keep_reads_keeps_status_and_every_version_it_names(registry, monkeypatch):
    uri, _, kept_in = registry
    writes = []
    write = store._write_atomically
    monkeypatch.setattr(
        store, "_write_atomically", lambda path, content: (writes.append(path), write(path, content))
    )
    store.keep_reads(uri, [("shapes.ae", "1")])
    assert len(writes) == 2  # the status table, then every version's tags in one write
    reads = json.loads(kept_in.read_text())["reads"]
    assert set(reads) == {"status", "tags of shapes.gan v1", "tags of shapes.ae v1"}
    assert store.remembered(uri, "tags of shapes.ae v1", unreachable) == {"family": "ae"}
    assert store.remembered(uri, "status", unreachable) == store.registry_status(MlflowClient(uri, uri))


def test_another_programs_write_drops_the_kept_reads(registry):
    uri, client, _ = registry
    store.keep_reads(uri)
    client.set_model_version_tag("shapes.gan", "1", "family", "changed elsewhere")
    assert store.version_tags(uri, "shapes.gan", "1") == {"family": "changed elsewhere"}


def test_a_read_during_which_the_store_changed_is_not_kept(registry):
    uri, client, kept_in = registry

    def read_while_another_program_writes():
        client.set_model_version_tag("shapes.ae", "1", "during", "the read")
        return "stale"

    assert store.remembered(uri, "status", read_while_another_program_writes) == "stale"
    assert not kept_in.exists()
    assert store.remembered(uri, "status", lambda: "fresh") == "fresh"


def test_a_missing_version_is_named_and_nothing_is_kept(registry):
    uri, _, kept_in = registry
    with pytest.raises(LookupError, match="shapes.ae v7"):
        store.version_tags(uri, "shapes.ae", "7")
    assert not kept_in.exists()
