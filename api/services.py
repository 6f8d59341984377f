"""The API's links to the broker: Redis (pub/sub for streamed answers, worker heartbeats) and Celery.

Tasks are sent by name ("radialog.dialog_turn", "radialog.export") through the workers' Celery app
(``workers.celery_app.app_for(settings)``) when it is importable, else through a bare Celery client on the same broker; the API never imports
model code. Redis is reached lazily so the API starts (and serves reads) while the broker is down.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from radialog.logging import get_logger
from radialog.settings import Settings

log = get_logger(__name__)

WORKER_KEY_PATTERN = "radialog:worker:*"


class Services:
    """Lazily created Redis and Celery clients for one app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: redis.Redis | None = None
        self._celery: Any = None

    @property
    def redis_url(self) -> str | None:
        url = self.settings.broker_url
        return url if url.startswith(("redis://", "rediss://", "unix://")) else None

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            if self.redis_url is None:
                raise redis.ConnectionError("the broker is not Redis: dialog streaming needs Redis")
            self._redis = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=5)
        return self._redis

    def ready_workers(self) -> list[dict[str, Any]]:
        """Provenance of every worker whose heartbeat key is alive (empty when none)."""
        workers = []
        for key in self.redis.scan_iter(match=WORKER_KEY_PATTERN, count=100):
            raw = self.redis.get(key)
            if raw is None:
                continue
            try:
                info = json.loads(raw)
            except ValueError:
                info = {}
            workers.append({"worker": key.decode().split(":", 2)[-1], **(info if isinstance(info, dict) else {})})
        return workers

    @property
    def celery(self) -> Any:
        if self._celery is None:
            try:
                from workers.celery_app import app_for

                celery_app = app_for(self.settings)  # the workers' app, for this app's broker
            except ImportError:
                from celery import Celery

                celery_app = Celery("radialog-api", broker=self.settings.broker_url)
                celery_app.conf.update(task_serializer="json", accept_content=["json"])
            self._celery = celery_app
        return self._celery

    def send_task(self, name: str, args: list[Any], queue: str, task_id: str | None = None) -> str:
        """Send a task by name to ``queue``; returns the Celery task id."""
        result = self.celery.send_task(name, args=args, queue=queue, task_id=task_id)
        return str(result.id)

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
            self._redis = None
