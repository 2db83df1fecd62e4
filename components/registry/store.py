"""Where the registry lives and what it holds, read with MLflow alone (no torch): for `genpipe status`.

MLflow is imported only by the functions that talk to it: importing it and opening a SQLite store
cost about 5 s of CPU on a 2-core machine, most of a `genpipe status`. What a read of a local
store returns depends only on the database's content, so `remembered` keeps it in a file beside
the database, keyed by the database files' sizes and modification times: any write to the store
(genpipe's, the MLflow UI's, another program's) changes the key and the next read asks MLflow again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

CHAMPION, CHALLENGER = "champion", "challenger"
DATA_VERSION_TAG, PRIMARY_TAG = "data_version", "primary_metric"


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


def remembered(tracking_uri: str, what: str, read: Callable[[], Any]) -> Any:
    """`read()` (JSON-serialisable), or what it returned before if the local store has not changed."""
    return remembered_all(tracking_uri, {what: read})[what]


def remembered_all(tracking_uri: str, reads: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each read's value by name, from what it returned before if the local store has not changed.

    The reads not kept are made and then kept with one write. A tracking server has no cheap sign
    of change, so its reads always go to MLflow; so do reads during which the store changed (their
    results are not kept).
    """
    database = sqlite_file(tracking_uri)
    if database is None:
        return {what: read() for what, read in reads.items()}
    kept_in = database.with_name(f"{database.name}.genpipe-reads.json")
    before = _store_state(database)
    kept: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        kept = json.loads(kept_in.read_text())
    known = kept.get("reads", {}) if kept.get("state") == before else {}
    fresh = {what: read() for what, read in reads.items() if what not in known}
    if fresh and _store_state(database) == before:  # unchanged while read (opening a new store creates it)
        _write_atomically(kept_in, {"state": before, "reads": {**known, **fresh}})
    return {what: known[what] if what in known else fresh[what] for what in reads}


def sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` store; None for any other store."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/:memory:"):
        return None
    return Path(unquote(parsed.path))


def _store_state(database: Path) -> list[list[int]]:
    """Size and modification time of the database and of SQLite's journal files beside it."""
    state = []
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-journal")):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            state.append([stat.st_size, stat.st_mtime_ns])
            continue
        state.append([])
    return state


def _write_atomically(path: Path, content: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # a read-only directory: the next read asks MLflow again
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
            json.dump(content, file)
        os.replace(file.name, path)


def registered_name(dataset: str, model: str) -> str:
    """Registered model name: the dataset and the family, e.g. `digits.vae`."""
    return f"{dataset}.{model}"


def alias_version(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def status_rows(tracking_uri: str) -> list[dict[str, str]]:
    """`registry_status` of the store, remembered until the store changes (see `remembered`)."""
    return remembered(tracking_uri, "status", lambda: registry_status(client_for(tracking_uri)))


def version_tags(tracking_uri: str, name: str, version: str) -> dict[str, str]:
    """The tags of one registered version (its lineage), remembered until the store changes.

    Raises LookupError naming the version when the registry does not hold it.
    """
    return remembered_all(tracking_uri, _tag_reads(tracking_uri, [(name, version)]))[_tags_key(name, version)]


def _tags_key(name: str, version: str) -> str:
    return f"tags of {name} v{version}"


def _tag_reads(tracking_uri: str, versions: Iterable[tuple[str, str]]) -> dict[str, Callable[[], Any]]:
    def read(name: str, version: str) -> dict[str, str]:
        from mlflow.exceptions import MlflowException

        try:
            return dict(client_for(tracking_uri).get_model_version(name, version).tags)
        except MlflowException as err:
            raise LookupError(f"{name} v{version}: {err.message}") from err

    return {_tags_key(name, version): functools.partial(read, name, version) for name, version in versions}


def keep_reads(tracking_uri: str, versions: Iterable[tuple[str, str]] = ()) -> None:
    """Reads, and so remembers, what `genpipe status` and `genpipe lineage` will be asked next: the
    status table, and the lineage of each champion and of `versions` (name, version).

    The commands that write to the registry call it last, while MLflow is loaded anyway, so the next
    read-only command finds the registry as they left it without importing MLflow.
    """
    champions = [
        (row["model"], row["champion"]) for row in status_rows(tracking_uri) if row["champion"] != "-"
    ]
    remembered_all(tracking_uri, _tag_reads(tracking_uri, dict.fromkeys([*champions, *versions])))


def registry_status(client: MlflowClient) -> list[dict[str, str]]:
    """One row per registered model: champion version, its primary metric, data version, when."""
    rows = []
    for model in sorted(client.search_registered_models(), key=lambda m: m.name):
        champion = alias_version(client, model.name, CHAMPION)
        if champion is None:
            rows.append(
                {
                    "model": model.name,
                    "champion": "-",
                    "metric": "-",
                    "value": "-",
                    "data_version": "-",
                    "registered": "-",
                }
            )
            continue
        metric = champion.tags.get(PRIMARY_TAG, "")
        rows.append(
            {
                "model": model.name,
                "champion": str(champion.version),
                "metric": metric,
                "value": _shown(champion.tags.get(f"metric.{metric}")),
                "data_version": champion.tags.get(DATA_VERSION_TAG, "-"),
                "registered": _timestamp(champion.creation_timestamp),
            }
        )
    return rows


def _shown(value: str | None) -> str:
    """A recorded (unrounded) figure as people read it."""
    return "-" if value is None else f"{float(value):.6g}"


def _timestamp(milliseconds: int) -> str:
    return dt.datetime.fromtimestamp(milliseconds / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%MZ")
