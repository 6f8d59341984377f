"""Which workers have their model loaded, whatever the broker: the one place that knows where readiness lives.

A worker announces itself once its model is loaded and refreshes that every few seconds; the API's
``/readyz`` and its dialog routes ask who is ready. Where it lives follows the broker:

- Redis (every deployment beyond one machine): the key ``radialog:worker:<hostname>`` holding the
  worker's JSON provenance, with a TTL (compose's health check and the tests read it too);
- the embedded broker (``radialog run`` without Redis: kombu's SQLite transport in the data directory):
  one JSON file per worker under ``<data_dir>/workers/``, with its expiry inside, written atomically.
  The embedded broker is a file in that directory, so whoever reaches the broker reaches these files
  too; no schema change and nothing for other deployments to carry.

Errors reaching either are ``BrokerUnavailable``, so callers tell "broker down" from "no worker" by type.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import redis

from radialog.messaging import BrokerUnavailable, connect_redis, is_redis_url
from radialog.settings import Settings

READY_KEY_PREFIX = "radialog:worker:"
#: A worker's announcement lives this long unless refreshed (workers refresh every READY_REFRESH_S).
READY_TTL_S = 30
READY_REFRESH_S = 10
#: A readiness file expired this long ago is removed (each start of a worker leaves one: its pid is in the name).
PRUNE_AFTER_S = 3600


class Presence(Protocol):
    def announce(self, hostname: str, info: dict[str, Any]) -> None: ...
    def withdraw(self, hostname: str) -> None: ...
    def ready(self) -> list[dict[str, Any]]: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


def ready_key(hostname: str) -> str:
    """The Redis key a worker keeps alive while its model is loaded (compose's health check reads it too)."""
    return READY_KEY_PREFIX + hostname


def presence_for(settings: Settings) -> Presence:
    """Readiness for ``settings.broker_url``: Redis keys, or files beside an embedded broker."""
    if is_redis_url(settings.broker_url):
        return RedisPresence(settings.broker_url)
    return FilePresence(settings.data_dir / "workers", embedded_broker_file(settings.broker_url))


def embedded_broker_file(broker_url: str) -> Path | None:
    """The SQLite file of a ``sqla+sqlite:///...`` broker URL (None for another kind)."""
    parts = urlsplit(broker_url)
    if not parts.scheme.endswith("sqlite"):
        return None
    path = unquote(parts.path)
    return Path(path[1:] if path.startswith("//") else path)


class RedisPresence:
    """Readiness keys in the broker's Redis database (client created on first use)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._client: redis.Redis | None = None

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            self._client = connect_redis(self.url)
        return self._client

    def announce(self, hostname: str, info: dict[str, Any]) -> None:
        try:
            self.client.set(ready_key(hostname), json.dumps(info), ex=READY_TTL_S)
        except redis.RedisError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    def withdraw(self, hostname: str) -> None:
        try:
            self.client.delete(ready_key(hostname))
        except redis.RedisError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    def ready(self) -> list[dict[str, Any]]:
        workers = []
        try:
            for key in self.client.scan_iter(match=ready_key("*"), count=100):
                raw = self.client.get(key)
                if raw is not None:
                    workers.append({"worker": key.decode().removeprefix(READY_KEY_PREFIX), **_info(raw)})
        except redis.RedisError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc
        return workers

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class FilePresence:
    """Readiness files ``<directory>/<hostname>.json`` = {"expires_at": epoch seconds, "info": {...}}."""

    def __init__(self, directory: Path, broker_file: Path | None) -> None:
        self.directory = directory
        self.broker_file = broker_file

    def _path(self, hostname: str) -> Path:
        # hostnames are ours (radialog-<device>-<pid>@<host>, or -n NAME): keep them to one path component
        return self.directory / (hostname.replace("/", "_").replace("\0", "_") + ".json")

    def announce(self, hostname: str, info: dict[str, Any]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            record = json.dumps({"expires_at": time.time() + READY_TTL_S, "info": info})
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as handle:
                handle.write(record)
            os.replace(temp, self._path(hostname))
        except OSError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    def withdraw(self, hostname: str) -> None:
        try:
            self._path(hostname).unlink(missing_ok=True)
        except OSError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    def ready(self) -> list[dict[str, Any]]:
        workers = []
        now = time.time()
        try:
            paths = sorted(self.directory.glob("*.json")) if self.directory.is_dir() else []
        except OSError as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc
        for path in paths:
            try:
                record = json.loads(path.read_text())
                expires_at = float(record["expires_at"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # removed meanwhile, or not ours
            if expires_at > now:
                workers.append({"worker": path.stem, **_info(json.dumps(record.get("info")))})
            elif expires_at < now - PRUNE_AFTER_S:
                path.unlink(missing_ok=True)  # its worker is long gone; a live one would have refreshed it
        return workers

    def ping(self) -> None:
        """The embedded broker's database opens and answers (read-only: never creates it)."""
        if self.broker_file is None:
            raise BrokerUnavailable("not an embedded SQLite broker")
        try:
            with closing(sqlite3.connect(f"file:{self.broker_file}?mode=ro", uri=True, timeout=2)) as conn:
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            raise BrokerUnavailable(type(exc).__name__) from exc

    def close(self) -> None:
        pass


def _info(raw: bytes | str) -> dict[str, Any]:
    try:
        info = json.loads(raw)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}
