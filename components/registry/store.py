"""Where the registry lives and what it holds, read without importing MLflow: for `genpipe status`.

Importing MLflow and opening its SQLite store cost about 3 s on a 2-core machine, most of a
`genpipe status`, whose answer is a handful of rows. So the read-only commands read the registry
the cheapest way that stays exact: a SQLite store's tables directly (read-only, only at the schema
revision the queries were written for), a tracking server through MLflow's REST API, and any
other store, or a SQLite store at another schema revision, through MLflow's client.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

CHAMPION, CHALLENGER = "champion", "challenger"
DATA_VERSION_TAG, PRIMARY_TAG = "data_version", "primary_metric"
# The MLflow schema revision (alembic) that `SqliteRegistry`'s queries were written and tested
# against; a store at any other revision is read through MLflow. A test checks that the installed
# MLflow creates stores at this revision.
SQLITE_SCHEMA_REVISION = "dc11669786a5"
T = TypeVar("T")
_WORKSPACE = "default"  # MLflow's workspace when none is configured
_DELETED_STAGE = "Deleted_Internal"  # MLflow keeps deleted versions as rows with this stage


def resolve_tracking_uri(configured: str | None = None, workdir: str | Path = ".") -> str:
    """`configured` (params) > $MLFLOW_TRACKING_URI > a SQLite file in the working directory."""
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{(Path(workdir) / 'mlflow.db').resolve()}"


def client_for(tracking_uri: str) -> MlflowClient:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` store; None for any other store."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/:memory:"):
        return None
    return Path(unquote(parsed.path))


def registered_name(dataset: str, model: str) -> str:
    """Registered model name: the dataset and the family, e.g. `digits.vae`."""
    return f"{dataset}.{model}"


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass(frozen=True)
class VersionRecord:
    """What the read-only commands show of a registered version."""

    version: str
    created_ms: int
    tags: dict[str, str]


class RegistryReader(Protocol):
    def model_names(self) -> list[str]: ...

    def alias_version(self, name: str, alias: str) -> VersionRecord | None: ...

    def version(self, name: str, version: str) -> VersionRecord | None: ...


class UnreadableHere(Exception):
    """The light reader cannot read this store exactly; MLflow's client reads it instead."""


class MlflowRegistry:
    """The registry through MLflow's client: any store MLflow supports, at MLflow's start-up cost."""

    def __init__(self, client: MlflowClient):
        self.client = client

    def model_names(self) -> list[str]:
        return [model.name for model in self.client.search_registered_models()]

    def alias_version(self, name: str, alias: str) -> VersionRecord | None:
        found = alias_version(self.client, name, alias)
        return None if found is None else _record(found)

    def version(self, name: str, version: str) -> VersionRecord | None:
        from mlflow.exceptions import MlflowException

        try:
            return _record(self.client.get_model_version(name, version))
        except MlflowException:
            return None


def _record(version: ModelVersion) -> VersionRecord:
    return VersionRecord(str(version.version), int(version.creation_timestamp), dict(version.tags))


class SqliteRegistry:
    """A `sqlite:///` store's registry tables, opened read-only (a missing file is an empty registry)."""

    def __init__(self, database: Path):
        self.database = database

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection | None]:
        if not self.database.exists():
            yield None
            return
        connection = sqlite3.connect(f"{self.database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            try:
                (revision,) = connection.execute("SELECT version_num FROM alembic_version").fetchone()
            except (sqlite3.DatabaseError, TypeError) as err:  # not (yet) an MLflow store
                raise UnreadableHere(f"{self.database}: {err}") from err
            if revision != SQLITE_SCHEMA_REVISION:
                raise UnreadableHere(f"{self.database}: schema revision {revision}")
            yield connection
        finally:
            connection.close()

    def model_names(self) -> list[str]:
        with self._connection() as db:
            if db is None:
                return []
            rows = db.execute("SELECT name FROM registered_models WHERE workspace = ?", (_WORKSPACE,))
            return [name for (name,) in rows]

    def alias_version(self, name: str, alias: str) -> VersionRecord | None:
        with self._connection() as db:
            if db is None:
                return None
            found = db.execute(
                "SELECT version FROM registered_model_aliases WHERE workspace = ? AND name = ? AND alias = ?",
                (_WORKSPACE, name, alias),
            ).fetchone()
            return None if found is None else self._version(db, name, str(found[0]))

    def version(self, name: str, version: str) -> VersionRecord | None:
        with self._connection() as db:
            return None if db is None else self._version(db, name, version)

    @staticmethod
    def _version(db: sqlite3.Connection, name: str, version: str) -> VersionRecord | None:
        if not version.isdigit():
            return None
        found = db.execute(
            "SELECT creation_time FROM model_versions"
            " WHERE workspace = ? AND name = ? AND version = ? AND current_stage != ?",
            (_WORKSPACE, name, int(version), _DELETED_STAGE),
        ).fetchone()
        if found is None:
            return None
        tags = db.execute(
            "SELECT key, value FROM model_version_tags WHERE workspace = ? AND name = ? AND version = ?",
            (_WORKSPACE, name, int(version)),
        )
        return VersionRecord(version, int(found[0]), dict(tags.fetchall()))


class RestRegistry:
    """A tracking server's registry through MLflow's REST API (`/api/2.0/mlflow/...`), with the
    credentials MLflow's client takes from the environment (basic auth or a bearer token)."""

    def __init__(self, tracking_uri: str):
        self.base = tracking_uri.rstrip("/") + "/api/2.0/mlflow"
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS") or os.environ.get(
            "MLFLOW_TRACKING_CLIENT_CERT_PATH"
        ):
            raise UnreadableHere("TLS settings only MLflow's client applies")
        self.headers = {}
        user, password = (
            os.environ.get("MLFLOW_TRACKING_USERNAME"),
            os.environ.get("MLFLOW_TRACKING_PASSWORD"),
        )
        if user and password:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self.headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"

    def _get(self, endpoint: str, **query: str) -> dict | None:
        """The reply's JSON; None when the server says the thing asked for does not exist."""
        url = f"{self.base}/{endpoint}?{urllib.parse.urlencode(query)}"
        request = urllib.request.Request(url, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):  # MLflow may know credentials we do not (~/.mlflow/credentials)
                raise UnreadableHere(f"{url}: HTTP {err.code}") from err
            body = err.read()
            with contextlib.suppress(ValueError):
                if json.loads(body).get("error_code") in (
                    "RESOURCE_DOES_NOT_EXIST",
                    "INVALID_PARAMETER_VALUE",
                ):
                    return None
            raise RuntimeError(f"{url}: HTTP {err.code}: {body[:300]!r}") from err

    def model_names(self) -> list[str]:
        names, page = [], ""
        while True:
            reply = self._get("registered-models/search", max_results="1000", page_token=page) or {}
            names += [model["name"] for model in reply.get("registered_models", [])]
            page = reply.get("next_page_token", "")
            if not page:
                return names

    def alias_version(self, name: str, alias: str) -> VersionRecord | None:
        return self._record(self._get("registered-models/alias", name=name, alias=alias))

    def version(self, name: str, version: str) -> VersionRecord | None:
        return self._record(self._get("model-versions/get", name=name, version=version))

    @staticmethod
    def _record(reply: dict | None) -> VersionRecord | None:
        if reply is None:
            return None
        found = reply["model_version"]
        tags = {tag["key"]: tag.get("value", "") for tag in found.get("tags", [])}
        return VersionRecord(str(found["version"]), int(found["creation_timestamp"]), tags)


def reader_for(tracking_uri: str) -> RegistryReader:
    """The light reader of this store: SQLite's tables, a server's REST API, else MLflow's client."""
    database = sqlite_file(tracking_uri)
    if database is not None:
        return SqliteRegistry(database)
    if urlparse(tracking_uri).scheme in ("http", "https"):
        return RestRegistry(tracking_uri)
    return MlflowRegistry(client_for(tracking_uri))


def _read(tracking_uri: str, what: Callable[[RegistryReader], T]) -> T:
    """`what(reader)` with the store's light reader, or with MLflow's client where that cannot read it."""
    try:
        return what(reader_for(tracking_uri))
    except UnreadableHere:
        return what(MlflowRegistry(client_for(tracking_uri)))


def status_rows(tracking_uri: str) -> list[dict[str, str]]:
    """`registry_status` of the store at `tracking_uri`."""
    return _read(tracking_uri, registry_status)


def version_tags(tracking_uri: str, name: str, version: str) -> dict[str, str]:
    """The tags of one registered version (its lineage).

    Raises LookupError naming the version when the registry does not hold it.
    """
    found = _read(tracking_uri, lambda reader: reader.version(name, version))
    if found is None:
        raise LookupError(f"{name} v{version}: not in the registry at {tracking_uri}")
    return found.tags


_CHAMPION_COLUMNS = ("champion", "metric", "value", "data_version", "registered")


def registry_status(registry: RegistryReader) -> list[dict[str, str]]:
    """One row per registered model: champion version, its primary metric, data version, when."""
    rows = []
    for name in sorted(registry.model_names()):
        champion = registry.alias_version(name, CHAMPION)
        if champion is None:
            rows.append({"model": name, **dict.fromkeys(_CHAMPION_COLUMNS, "-")})
            continue
        metric = champion.tags.get(PRIMARY_TAG, "")
        rows.append(
            {
                "model": name,
                "champion": champion.version,
                "metric": metric,
                "value": _shown(champion.tags.get(f"metric.{metric}")),
                "data_version": champion.tags.get(DATA_VERSION_TAG, "-"),
                "registered": _timestamp(champion.created_ms),
            }
        )
    return rows


def _shown(value: str | None) -> str:
    """A recorded (unrounded) figure as people read it."""
    return "-" if value is None else f"{float(value):.6g}"


def _timestamp(milliseconds: int) -> str:
    return dt.datetime.fromtimestamp(milliseconds / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%MZ")
