"""The read-only commands' registry readers give exactly what MLflow's client gives, on real stores:
a SQLite file read directly, a real `mlflow server` through its REST API."""

from __future__ import annotations

import shutil
import sqlite3

import pytest
from mlflow.tracking import MlflowClient

from components.registry import store


def fill(client: MlflowClient, weights: str, run_id: str | None = None) -> None:
    """Three models: one without champion, one whose champion is its second version, one whose only
    version was deleted; tags with a metric, a data version and an empty value."""
    for name in ("shapes.ae", "shapes.gan", "shapes.vae"):
        client.create_registered_model(name)
    client.create_model_version("shapes.ae", weights, run_id, tags={"family": "ae"})
    for value in ("40.5", "31.25"):
        client.create_model_version(
            "shapes.gan",
            weights,
            run_id,
            tags={"primary_metric": "fid", "metric.fid": value, "data_version": "ab" * 16, "note": ""},
        )
    client.set_registered_model_alias("shapes.gan", "champion", "2")
    client.create_model_version("shapes.vae", weights, run_id)
    client.delete_model_version("shapes.vae", "1")


def assert_same_reads(reader: store.RegistryReader, client: MlflowClient) -> None:
    exact = store.MlflowRegistry(client)
    assert store.registry_status(reader) == store.registry_status(exact)
    assert [row["champion"] for row in store.registry_status(reader)] == ["-", "2", "-"]
    for name, version in [("shapes.ae", "1"), ("shapes.gan", "1"), ("shapes.gan", "2")]:
        assert reader.version(name, version) == exact.version(name, version)
    for name, version in [("shapes.ae", "7"), ("shapes.vae", "1"), ("nothing.here", "1"), ("shapes.ae", "x")]:
        assert reader.version(name, version) is None and exact.version(name, version) is None
    assert reader.alias_version("shapes.ae", "champion") is None


@pytest.fixture
def sqlite_store(tmp_path, new_mlflow_store):
    database = tmp_path / "mlflow.db"
    uri = new_mlflow_store(database)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    fill(client, str(tmp_path / "weights"))
    return database, uri, client


def test_the_sqlite_reader_reads_what_mlflow_reads(sqlite_store):
    _, uri, client = sqlite_store
    reader = store.reader_for(uri)
    assert isinstance(reader, store.SqliteRegistry)
    assert_same_reads(reader, client)


def test_another_programs_write_is_read_at_once(sqlite_store):
    _, uri, client = sqlite_store
    assert store.version_tags(uri, "shapes.ae", "1") == {"family": "ae"}
    client.set_model_version_tag("shapes.ae", "1", "family", "changed elsewhere")
    client.set_registered_model_alias("shapes.ae", "champion", "1")
    assert store.version_tags(uri, "shapes.ae", "1") == {"family": "changed elsewhere"}
    assert store.status_rows(uri)[0]["champion"] == "1"


def test_mlflow_creates_stores_at_the_schema_revision_the_reader_knows(sqlite_store):
    database, _, _ = sqlite_store
    with sqlite3.connect(database) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchone() == (
            store.SQLITE_SCHEMA_REVISION,
        )


def test_a_store_at_another_schema_revision_is_read_through_mlflow(sqlite_store, tmp_path, monkeypatch):
    database, _, client = sqlite_store
    copy = tmp_path / "other" / "mlflow.db"
    copy.parent.mkdir()
    shutil.copy(database, copy)
    with sqlite3.connect(copy) as db:
        db.execute("UPDATE alembic_version SET version_num = 'somewhere-else'")
    with pytest.raises(store.UnreadableHere, match="somewhere-else"):
        store.SqliteRegistry(copy).model_names()
    asked = []
    monkeypatch.setattr(store, "client_for", lambda uri: asked.append(uri) or client)
    assert store.status_rows(f"sqlite:///{copy}") == store.registry_status(store.MlflowRegistry(client))
    assert asked == [f"sqlite:///{copy}"]


def test_reads_change_nothing_and_a_missing_store_is_empty(tmp_path):
    missing = tmp_path / "mlflow.db"
    uri = f"sqlite:///{missing}"
    assert store.status_rows(uri) == []
    with pytest.raises(LookupError, match=r"shapes\.ae v7: not in the registry at sqlite:///"):
        store.version_tags(uri, "shapes.ae", "7")
    assert list(tmp_path.iterdir()) == []


def test_the_rest_reader_reads_what_mlflow_reads_from_a_server(mlflow_server, tmp_path):
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    run = client.create_run(client.create_experiment("light-reads")).info  # the server wants a run's source
    fill(client, f"{run.artifact_uri}/model", run.run_id)
    reader = store.reader_for(mlflow_server)
    assert isinstance(reader, store.RestRegistry)
    assert_same_reads(reader, client)
